"""The API app: `create_app` composes the page, the metrics, the routers of daemon.http.routes,
the error answers and the body limits around one service.

Paths and field names are the ones bots already call (`/api/system/ports`,
`/api/traffic/ports/exact`, `rx_bytes`, `total_formatted`, ...; README, "API"), so they keep
working; key management adds `/api/keys`. Every error is JSON `{"detail": "..."}` with a 4xx
status; an unexpected one is a logged 500 with no details. Routers are included in a fixed
order: it is the order of the OpenAPI document's paths.
"""

from __future__ import annotations

import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from daemon.errors import OperationError
from daemon.http import metrics, page
from daemon.http.keyfields import describe_errors
from daemon.http.middleware.audit import AuditLog
from daemon.http.middleware.bodies import JsonBodies
from daemon.http.middleware.head import HeadAsGet
from daemon.http.routes import fleet, keys, subscription, system, traffic, usage, xray
from daemon.http.shared import SharedAnswers
from daemon.service import Service
from daemon.store.reported import HistoryReports

# After the usage routes (which exist only with a history), in this order.
ROUTERS = (
    keys.router,
    system.router,
    traffic.router,
    subscription.router,
    xray.router,
    traffic.summary,
    fleet.router,
)


def served_app(service: Service, log: structlog.typing.FilteringBoundLogger) -> ASGIApp:
    """The app as the Unix socket serves it: HEAD answered as GET, changing calls audited. The
    in-process tests call this too, so they see exactly what a client of the socket sees."""
    return HeadAsGet(AuditLog(create_app(service), log))


def create_app(service: Service) -> FastAPI:
    """The app answering for `service`; the routes find it in `app.state`."""
    app = FastAPI(
        title="portmeter",
        summary="Exact per-key traffic accounting for Xray servers",
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # a redirect would echo the client's Host header
    )
    history = service.usage_history()
    app.state.service = service
    app.state.traffic_answers = SharedAnswers()
    app.state.history = history
    reported = None if history is None else HistoryReports(history)
    app.state.reported = service.fleet_reads or reported
    app.add_middleware(JsonBodies)
    _install_error_handlers(app)
    _add_routes(app, page.router)
    app.mount("/static", page.static_files(), name="static")
    _add_routes(app, metrics.router)
    if history is not None:
        _add_routes(app, usage.router)
    for router in ROUTERS:
        _add_routes(app, router)
    return app


def _add_routes(app: FastAPI, router: APIRouter) -> None:
    """The router's routes, added to the app's own list. FastAPI's include_router keeps a router
    as a nested one that each request is matched against twice (some 40 µs a request here);
    flat, a request is matched once. Each router carries the error responses itself."""
    app.router.routes.extend(router.routes)


def _install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OperationError, _operation_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


async def _operation_error(_: Request, exc: OperationError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"detail": "request body is not valid JSON"}, status_code=400)
    return JSONResponse({"detail": describe_errors(errors)}, status_code=422)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback, answered without details."""
    service: Service = request.app.state.service
    service.log.error("request_failed", path=request.url.path, error=repr(exc), exc_info=exc)
    return JSONResponse({"detail": "internal error; see the daemon log"}, status_code=500)
