"""docs/nginx.conf, the proxy of docs/compose.yaml: valid (``nginx -t``) and, run for
real in front of a live ``loyalty serve``, it proxies the API, refuses oversized
headers and bodies itself, and never forwards /metrics. Skipped where nginx is not
installed (``apt-get install nginx-light``); with CI set, that fails (.ci/run installs it)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import required_tool
from tests.e2e.live import METRICS_TOKEN, free_port, serve_process, wait_healthy

CONF = Path(__file__).resolve().parents[2] / "docs" / "nginx.conf"


def local_conf(tmp: Path, api_port: int, port: int) -> Path:
    text = CONF.read_text()
    for old, new in [
        ("server api:8000;", f"server 127.0.0.1:{api_port};"),
        ("listen 8000;", f"listen 127.0.0.1:{port};"),
        ("pid /tmp/nginx-loyalty.pid;", f"pid {tmp}/nginx.pid;"),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    conf = tmp / "nginx.conf"
    conf.write_text(text)
    return conf


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    nginx = required_tool("nginx", "/usr/sbin/nginx")
    tmp = tmp_path_factory.mktemp("nginx")
    tmp.chmod(0o755)
    with serve_process(
        f"sqlite:///{tmp / 'p.db'}",
        "--no-worker",
        stop_timeout=15,
        LOYALTY_METRICS_TOKEN=METRICS_TOKEN,
    ) as api:
        port = free_port()
        conf = local_conf(tmp, api.port, port)
        checked = subprocess.run(
            [nginx, "-t", "-c", str(conf), "-p", str(tmp), "-e", "stderr"],
            capture_output=True,
            text=True,
        )
        assert checked.returncode == 0, checked.stderr
        proxy = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(tmp), "-e", "stderr", "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(proxy, base, lambda: "nginx")
            yield base
        finally:
            proxy.terminate()
            try:
                proxy.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()


def raw(base: str, request: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return data


def test_the_proxy_forwards_the_api_and_applies_its_limits(proxied: str) -> None:
    assert httpx.get(proxied + "/healthz").json() == {"status": "ok"}
    headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    assert httpx.get(proxied + "/metrics", headers=headers).status_code == 404  # never proxied
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 * 1024) + b"\r\n\r\n"
    started = time.monotonic()
    answer = raw(proxied, big)
    assert answer.split(b" ", 2)[1] in (b"400", b"431", b"494"), answer[:200]
    assert time.monotonic() - started < 5
    huge = (
        b"POST /v1/ingress/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 9000000\r\nConnection: close\r\n\r\n"
    )
    assert raw(proxied, huge).split(b" ", 2)[1] == b"413"
