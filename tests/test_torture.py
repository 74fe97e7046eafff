"""Crash consistency: random operations, each interrupted by kill -9 at a random moment.

After every restart: every acknowledged operation is there, an interrupted one is either whole
or absent (no orphan counter, port, Xray inbound or state entry), and every key's totals equal
the bytes the kernel counted for it since its creation or last reset: nothing lost or doubled.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon
from tests.netlab import SERVER_V4, Lab

pytestmark = pytest.mark.kernel
ROUNDS = 100
PAYLOAD = 200
WIRE = PAYLOAD + 28


@dataclass
class Model:
    """What the test knows for sure: keys it saw acknowledged, bytes it sent to each."""

    keys: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> key object
    sent: dict[str, int] = field(default_factory=dict)  # name -> bytes since creation/reset
    ops_checked: int = 0
    bytes_compared: int = 0


def call(
    daemon: Daemon, method: str, path: str, body: dict[str, Any] | None, out: list[Any]
) -> None:
    """One API call in its own connection; records the response if one arrived before the kill."""
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=10) as c:
            out.append(c.request(method, f"http://pm{path}", json=body))
    except httpx.HTTPError:
        pass


def pick_operation(
    rng: random.Random, model: Model, counter: int
) -> tuple[str, str, str, dict[str, Any] | None]:
    names = sorted(model.keys)
    choice = rng.choice(["create", "create", "delete", "reset", "limit"] if names else ["create"])
    if choice == "create":
        return choice, "POST", "/api/keys", {"name": f"t{counter}"}
    name = rng.choice(names)
    key_id = model.keys[name]["id"]
    if choice == "delete":
        return choice, "DELETE", f"/api/keys/{key_id}", None
    if choice == "reset":
        return choice, "POST", f"/api/keys/{key_id}/traffic/port/reset", None
    return choice, "PATCH", f"/api/keys/{key_id}", {"data_limit_bytes": rng.randint(10**7, 10**8)}


def settle_interrupted(
    daemon: Daemon,
    model: Model,
    op: str,
    body: dict[str, Any] | None,
    path: str,
    answer: Any,
    before: dict[str, Any],
) -> None:
    """Fold one operation's outcome into the model: acknowledged, or whatever the daemon kept."""
    listed = {k["name"]: k for k in daemon.api("GET", "/api/keys")["keys"]}
    acknowledged = answer is not None and answer.status_code < 300
    if op == "create":
        name = body["name"]  # type: ignore[index]
        if acknowledged:
            assert name in listed, f"acknowledged create of {name} lost"
        if name in listed:
            model.keys[name] = listed[name]
            model.sent[name] = 0
    elif op == "delete":
        name = next(n for n, k in model.keys.items() if path.endswith(k["id"]))
        if acknowledged:
            assert name not in listed, f"acknowledged delete of {name} undone"
        if name not in listed:
            del model.keys[name]
            del model.sent[name]
    elif op == "reset":
        name = next(
            n for n, k in model.keys.items() if path.endswith(f"{k['id']}/traffic/port/reset")
        )
        was_reset = listed[name]["last_reset_at"] != before[name]["last_reset_at"]
        if acknowledged:
            assert was_reset, f"acknowledged reset of {name} lost"
        if was_reset:
            model.sent[name] = 0
    elif op == "limit":
        name = next(n for n, k in model.keys.items() if path.endswith(k["id"]))
        if acknowledged:
            assert listed[name]["data_limit_bytes"] == body["data_limit_bytes"]  # type: ignore[index]
    assert set(listed) == set(model.keys), (op, set(listed) ^ set(model.keys))
    model.ops_checked += 1


def send_traffic(sender: socket.socket, rng: random.Random, model: Model) -> dict[str, int]:
    """Datagrams to a few keys' ports; returns the bytes sent to each."""
    sent: dict[str, int] = {}
    for name in rng.sample(sorted(model.keys), k=min(3, len(model.keys))):
        count = rng.randint(1, 4)
        for _ in range(count):
            sender.sendto(b"t" * PAYLOAD, (SERVER_V4, model.keys[name]["port"]))
        sent[name] = count * WIRE
    return sent


def add_sent(model: Model, sent: dict[str, int]) -> None:
    for name, count in sent.items():
        if name in model.sent:
            model.sent[name] += count


def verify(daemon: Daemon, model: Model) -> None:
    status = daemon.api("GET", "/api/system/ports/status")
    assert status["valid"], status["problems"]
    assert daemon.api("GET", "/api/system/xray/validate-sync")["in_sync"]
    table = daemon.api("GET", "/api/traffic/ports/exact")["ports_traffic"]["ports_traffic"]
    for name, key in model.keys.items():
        counted = table[key["uuid"]]["traffic"]
        assert counted["rx_bytes"] == model.sent[name], (name, counted, model.sent[name])
        assert counted["tx_bytes"] == 0
        model.bytes_compared += counted["rx_bytes"]


def test_kill9_at_random_moments_never_loses_or_half_does_anything(
    net: Lab, make_daemon: Any
) -> None:
    rng = random.Random(20261123)
    daemon: Daemon = make_daemon(size=200, PORTMETER_POLL_INTERVAL="0.3")
    sender = net.udp(net.client)
    model = Model()
    started = time.monotonic()
    try:
        for round_no in range(ROUNDS):
            add_sent(model, send_traffic(sender, rng, model))
            before = {k["name"]: k for k in daemon.api("GET", "/api/keys")["keys"]}
            op, method, path, body = pick_operation(rng, model, round_no)
            answer: list[Any] = []
            worker = threading.Thread(target=call, args=(daemon, method, path, body, answer))
            worker.start()
            moment = rng.random()
            if moment < 0.4:
                worker.join(10)  # the kill comes after the answer
            else:
                time.sleep(rng.uniform(0, 0.06))  # ... or somewhere in the middle of it
            daemon.kill9()
            worker.join(10)
            # the kernel counts while the daemon is down
            while_down = send_traffic(sender, rng, model)
            daemon.start()
            settle_interrupted(daemon, model, op, body, path, answer[0] if answer else None, before)
            add_sent(model, while_down)  # after any reset: these bytes came after it
            verify(daemon, model)
    finally:
        sender.close()
    elapsed = time.monotonic() - started
    print(
        f"\ntorture: {ROUNDS} rounds survived in {elapsed:.0f} s, {model.ops_checked} operations "
        f"checked, {model.bytes_compared} bytes compared, {len(model.keys)} keys at the end"
    )
    assert model.ops_checked == ROUNDS
    assert model.keys and model.bytes_compared > 0  # the run exercised keys and traffic
