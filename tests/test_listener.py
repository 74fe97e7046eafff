"""The optional TCP listener: same API, every request needs X-API-Key (constant-time compare)."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon
from tests.netlab import SERVER_V4, Lab, inside

pytestmark = pytest.mark.kernel
API_KEY = "k" * 24
PORT = 18080


def over_tcp(net: Lab, path: str, key: str | None) -> httpx.Response:
    headers = {} if key is None else {"X-API-Key": key}
    with inside(net.client), httpx.Client(timeout=10) as client:  # a client on the other host
        return client.get(f"http://{SERVER_V4}:{PORT}{path}", headers=headers)


def test_tcp_listener_requires_the_api_key(net: Lab, make_daemon: Any) -> None:
    daemon: Daemon = make_daemon(
        PORTMETER_HTTP_LISTEN=f"{SERVER_V4}:{PORT}", PORTMETER_API_KEY=API_KEY
    )
    key = daemon.create("remote")
    for supplied in (None, "", "wrong", API_KEY[:-1], API_KEY + "x"):
        refused = over_tcp(net, "/api/keys", supplied)
        assert refused.status_code == 401 and refused.json() == {
            "detail": "missing or wrong X-API-Key header"
        }
    allowed = over_tcp(net, "/api/keys", API_KEY)
    assert allowed.status_code == 200 and allowed.json()["keys"][0]["name"] == "remote"
    # VPN apps fetch subscriptions without headers
    sub = over_tcp(net, key["subscription_url"], None)
    assert sub.status_code == 200 and base64.b64decode(sub.text).decode() == key["link"]
    assert over_tcp(net, "/sub/not-a-token", None).status_code == 404


def test_listener_without_a_key_refuses_to_start(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon(start=False, PORTMETER_HTTP_LISTEN=f"{SERVER_V4}:{PORT}")
    daemon.start(wait=False)
    assert daemon.process is not None and daemon.process.wait(15) != 0
    assert "PORTMETER_API_KEY (16 characters or more) is required" in daemon.log()
