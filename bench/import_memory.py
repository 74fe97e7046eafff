"""Memory of `portmeter keys import` (issue 23): the command's peak RSS importing a 50 MB CSV file.

The file: 860,000 keys of about 58 bytes (a name, a 40-character note, a limit). The daemon is a
stand-in on a Unix socket that takes every batch and answers 201 with key objects of a real
answer's size, so what is measured is the command alone (a real daemon holds at most one key per
port of its range, and would refuse the rest). Peak RSS from the kernel's accounting of the
finished process (getrusage, ru_maxrss).
Usage: .venv/bin/python -m bench.import_memory [--quick] [--code DIR]
  --code DIR: run the command from another tree (e.g. an older commit exported with git archive)
On demand, not part of `make bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from bench.common import append_results, print_table, scratch

REPO = Path(__file__).resolve().parent.parent
NOTE = "n" * 40
FULL_KEYS, QUICK_KEYS = 860_000, 50_000


def write_csv(path: Path, keys: int) -> int:
    with path.open("w") as out:
        out.write("name,note,data_limit_bytes\n")
        for n in range(keys):
            out.write(f"user{n:07},{NOTE},50GB\n")
    return path.stat().st_size


def key_object(name: str, port: int) -> dict[str, object]:
    """A key as the daemon answers it (the fields of POST /api/keys), about 900 bytes."""
    key_uuid = str(uuid.uuid4())
    return {
        "id": key_uuid[:8],
        "name": name,
        "uuid": key_uuid,
        "port": port,
        "created_at": "2026-12-07T18:00:00.000000+00:00",
        "is_active": True,
        "status": "active",
        "enabled": True,
        "note": NOTE,
        "data_limit_bytes": 50 * 10**9,
        "used_bytes": 0,
        "dropped_bytes": 0,
        "expire_at": None,
        "reset_strategy": "no_reset",
        "next_reset_at": None,
        "last_reset_at": None,
        "used_before_reset": None,
        "rx_bytes": 0,
        "tx_bytes": 0,
        "total_bytes": 0,
        "groups": [],
        "fleet": False,
        "speed_limit_bps": None,
        "max_connections": None,
        "max_ips": None,
        "refused_connections": 0,
        "link": f"vless://{key_uuid}@vpn.example.net:{port}?type=tcp&headerType=none"
        "&encryption=none&security=reality&pbk=AfQpIKYRh3mkdb1B0ZT4lynZHMJn5bmvINI8B12HCSk"
        f"&fp=chrome&sni=www.example.org&sid=d67cf56fcdcd21aa&flow=xtls-rprx-vision#{name}",
        "subscription_url": "/sub/PAbCjxn7sd8khmRmjF09AlusvQRLWrvF",
        "error": None,
    }


class StandIn(BaseHTTPRequestHandler):
    """POST /api/keys/batch: 201 with every key created, on ports counted up from 10,000."""

    protocol_version = "HTTP/1.1"
    ports = iter(range(10_000, 10**9))

    def do_POST(self) -> None:  # http.server's name for it
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        made = [key_object(k["name"], next(self.ports)) for k in body["keys"]]
        answer = json.dumps({"keys": made}).encode()
        self.send_response(201)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_: object) -> None:
        pass


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def peak_rss(code: Path, socket_path: Path, csv: Path) -> tuple[float, float, str]:
    """Run the command from `code`; its peak RSS in MiB, seconds and its last line."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    argv = [
        sys.executable,
        "-m",
        "daemon",
        "--socket",
        str(socket_path),
        "keys",
        "import",
        str(csv),
    ]
    started = time.monotonic()
    process = subprocess.Popen(
        argv, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    output = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the import failed: {output[-500:]}")
    return usage.ru_maxrss / 1024, seconds, output.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_KEYS} keys (smoke run)")
    parser.add_argument("--code", type=Path, default=REPO, help="the tree to run the command from")
    args = parser.parse_args()
    keys = QUICK_KEYS if args.quick else FULL_KEYS
    with scratch() as workdir:
        csv = workdir / "keys.csv"
        size = write_csv(csv, keys)
        socket_path = workdir / "pm.sock"
        server = UnixServer(str(socket_path), StandIn)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            rss, seconds, said = peak_rss(args.code.resolve(), socket_path, csv)
        finally:
            server.shutdown()
            server.server_close()
    code = "this tree" if args.code.resolve() == REPO else str(args.code)
    print_table(
        f"portmeter keys import of a {size / 1e6:.0f} MB CSV file ({keys} keys), {code}",
        ["file", "peak RSS", "took", "said"],
        [[f"{size / 1e6:.1f} MB", f"{rss:.0f} MiB", f"{seconds:.1f} s", said]],
    )
    append_results(
        "keys import memory",
        [
            (
                f"{size / 1e6:.0f} MB CSV, {keys} keys, {code}",
                f"peak RSS {rss:.0f} MiB, {seconds:.1f} s",
            )
        ],
        args.quick,
    )


if __name__ == "__main__":
    main()
