"""The Traffic Manager page: static files shipped in the package (daemon/web/), served at `/` and
`/static/*`. Plain HTML, CSS and JavaScript with no CDN, fonts or framework, so it works on a
server without internet. The page reads the JSON API of the same app; on the TCP listener it
sends the X-API-Key the user typed, on the Unix socket nothing (the socket's permissions guard it).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# The page loads nothing from elsewhere and is never framed; browsers revalidate (ETag) so an
# upgraded daemon's files are picked up at once.
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _StaticFiles(StaticFiles):
    """Starlette's static files with the page's headers on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response


router = APIRouter()


@router.get("/", include_in_schema=False)
async def traffic_manager() -> FileResponse:
    """The page itself; it loads its script and style from /static/."""
    return FileResponse(
        WEB_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS
    )


def static_files() -> StaticFiles:
    """The page's files, for `app.mount("/static", ...)`; each answer carries HEADERS."""
    return _StaticFiles(directory=WEB_DIR)
