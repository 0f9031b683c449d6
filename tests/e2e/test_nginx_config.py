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
from tests.e2e.live import METRICS_TOKEN, env_for, free_port, serve_process, wait_healthy

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


def test_the_proxy_balances_across_several_api_processes(tmp_path: Path) -> None:
    """docs/nginx.conf's upstream with three addresses (what Docker's DNS gives it for
    the ``api`` service's replicas in docs/compose.yaml): requests reach every API
    process, round-robin, and one stopped API process is passed over."""
    from tests.e2e.scale_out import Proc, nginx

    nginx_bin = required_tool("nginx", "/usr/sbin/nginx")
    url = f"sqlite:///{tmp_path / 'p.db'}"
    ports = [free_port() for _ in range(3)]
    apis = [
        Proc(
            ["serve", "--no-worker", "--port", str(port)],
            env_for(url, LOYALTY_ACCESS_LOG="true"),
            f"api-{i}",
        )
        for i, port in enumerate(ports)
    ]
    try:
        for api, port in zip(apis, ports, strict=True):
            wait_healthy(api.popen, f"http://127.0.0.1:{port}", api.output)
        with nginx(nginx_bin, ports) as base, httpx.Client(base_url=base) as client:
            for n in range(30):
                assert client.get(f"/healthz?via=nginx-{n}").status_code == 200
            seen = [api.output().count("GET /healthz?via=nginx-") for api in apis]
            # round-robin (per nginx worker process: a third each on one connection)
            assert sum(seen) == 30 and min(seen) >= 5, seen
            apis[1].stop()
            for n in range(12):
                assert client.get(f"/healthz?after=stop-{n}").status_code == 200
            after = [api.output().count("GET /healthz?after=stop-") for api in apis]
            assert after[1] == 0 and after[0] + after[2] == 12 and min(after[0], after[2]) >= 3
    finally:
        for api in apis:
            api.stop()
