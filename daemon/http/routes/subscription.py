"""A key's vless:// link and its subscription (`/sub/{token}`), which VPN apps fetch without
headers: the unguessable token is the secret, compared in constant time."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse

from daemon.errors import Invalid, NotFound
from daemon.http.routes import ServiceDep
from daemon.http.schemas import ERROR_RESPONSES, KeyRef
from daemon.limits import Status
from daemon.xray.links import subscription as subscription_text

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/api/keys/{key_id}/link")
async def key_link(key_id: KeyRef, service: ServiceDep) -> dict[str, Any]:
    key = service.find(key_id)
    if not service.xray_enabled():
        raise Invalid("the Xray integration is off (PORTMETER_XRAY_CONFIG is empty): no links")
    return {
        "key_id": key.id,
        "name": key.name,
        "link": service.link(key),
        "subscription_url": f"/sub/{key.sub_token}",
    }


@router.get("/sub/{token}", response_class=PlainTextResponse)
async def subscription(
    token: Annotated[str, PathParam(max_length=64)], service: ServiceDep
) -> PlainTextResponse:
    fleet = service.fleet_keys  # a link per server of the fleet (README "Keys created once")
    if fleet is not None and (found := await fleet.subscription(token)) is not None:
        return PlainTextResponse(found.body, headers={"subscription-userinfo": found.userinfo})
    key = service.key_with_token(token)
    if key is None:
        raise NotFound("no such subscription")
    link = service.link(key) if key.status is Status.ACTIVE else None
    return PlainTextResponse(subscription_text([] if link is None else [link]))
