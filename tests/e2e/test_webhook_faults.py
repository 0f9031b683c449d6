"""Webhook egress under attack and faults (issue 26): a name that rebinds to loopback
between the check and the connection, receivers that fail in every way, a sender that
raises what nobody listed, a URL the HTTP client refuses: every delivery loop stays
alive, says it is failing, counts it, and catches up when the receiver recovers."""

from __future__ import annotations

import ipaddress
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.adapters.delivery_store import SqlDeliveryStore
from loyalty.adapters.webhook_sender import HttpWebhookSender, is_public
from loyalty.api.app import create_app
from loyalty.application.delivery import (
    Attempt,
    FeedEvent,
    RetryPolicy,
    Subscription,
    WebhookDispatcher,
)
from loyalty.bootstrap import build_forget_service, build_webhook_dispatcher
from loyalty.config import Settings
from loyalty.observability import Metrics
from tests.conftest import Clock
from tests.e2e.live import free_port
from tests.e2e.test_webhooks import (
    HOOKS,
    Receiver,
    adjust,
    count_notices,
    sample,
    subscribe,
    wait_for,
)


@pytest.fixture
def api(settings: Settings, db: Database, clock: Clock) -> Iterator[TestClient]:
    allow = settings.model_copy(
        update={
            "webhook_allow_private_urls": True,
            "webhook_timeout_seconds": 1.0,
            "forget_settle_seconds": 0.0,
            "marker_refresh_seconds": 0.01,
        }
    )
    db.settings = allow  # type: ignore[misc]
    with TestClient(create_app(allow, db=db, clock=clock)) as c:
        yield c


# -- DNS rebinding -----------------------------------------------------------------------


def bound(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def test_a_name_rebinding_to_loopback_never_gets_the_post() -> None:
    """The resolver (our sender's seam) answers a "public" address first (127.0.0.2,
    declared public for this test only: nothing leaves the machine) and 127.0.0.1 from
    then on. The POST goes to the address that was checked; every later delivery checks
    again and is refused; the receiver on loopback, same port, never hears a thing."""
    if not bound("127.0.0.2"):
        pytest.skip("127.0.0.2 is not usable here")
    from http.server import ThreadingHTTPServer

    port = free_port()
    receivers = {}  # on the same port: 127.0.0.2 ("public") and 127.0.0.1 (loopback)
    for host in ("127.0.0.2", "127.0.0.1"):
        receiver = Receiver()
        receiver.server.shutdown()
        receiver.server.server_close()
        receiver.server = ThreadingHTTPServer((host, port), receiver.server.RequestHandlerClass)
        receiver.thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
        receiver.thread.start()
        receivers[host] = receiver
    answers: list[str] = []

    def resolver(host: str, _port: int) -> list[str]:
        assert host == "hooks.rebind.test"
        answers.append("127.0.0.2" if not answers else "127.0.0.1")
        return [answers[-1]]

    def permitted(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return str(address) == "127.0.0.2" or is_public(address)

    sender = HttpWebhookSender(timeout=2.0, resolver=resolver, permitted=permitted)
    subscription = Subscription(
        "a" * 32,
        f"http://hooks.rebind.test:{port}/hook",
        (),
        "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=",
        datetime.now(UTC),
    )
    try:
        results = [
            sender.deliver(
                subscription,
                FeedEvent(f"e{n}", n, "member.adjusted", "u", datetime.now(UTC), {}),
            )
            for n in range(3)
        ]
        assert results[0] == Attempt(True, "HTTP 204")
        assert [r.ok for r in results[1:]] == [False, False]
        assert all(r.detail.startswith("refused:") for r in results[1:])
        assert [b["id"] for b in receivers["127.0.0.2"].bodies()] == ["e0"]
        assert receivers["127.0.0.2"].received[0]["headers"]["host"] == (
            f"hooks.rebind.test:{port}"
        )
        assert receivers["127.0.0.1"].attempts == {}  # loopback never reached
        assert len(answers) == 3  # resolved once per delivery, never again at connect
    finally:
        sender.close()
        for receiver in receivers.values():
            receiver.close()


# -- faults ------------------------------------------------------------------------------


class FlakySender:
    """The real sender, behind a switch that makes it raise what no caller expects."""

    def __init__(self, real: HttpWebhookSender) -> None:
        self.real = real
        self.broken = True
        self.raised = 0

    def deliver(self, subscription: Subscription, event: FeedEvent) -> Attempt:
        if self.broken and random.random() < 0.5:
            self.raised += 1
            raise random.choice([KeyError("boom"), RuntimeError("bug"), ZeroDivisionError()])
        return self.real.deliver(subscription, event)

    def close(self) -> None:
        self.real.close()


@contextmanager
def running(dispatcher: WebhookDispatcher) -> Iterator[WebhookDispatcher]:
    thread = threading.Thread(target=dispatcher.run, daemon=True)
    thread.start()
    try:
        yield dispatcher
    finally:
        dispatcher.stop()
        thread.join(timeout=20)


def loop_threads(dispatcher: WebhookDispatcher) -> dict[str, bool]:
    return {sid: t.is_alive() for sid, (_loop, t) in dispatcher._loops.items()}


def test_loops_survive_any_error_say_they_fail_and_catch_up(
    api: TestClient, db: Database, make_key: Callable[..., dict[str, str]]
) -> None:
    """For 3 s the receiver answers 500/503, resets connections, writes garbage, hangs
    past the timeout or cuts a response short, and the sender raises KeyError,
    RuntimeError or ZeroDivisionError at random; then both recover. The loop is alive
    throughout, the subscription shows as failing (API and console) with the errors
    counted, and every event then arrives, in order."""
    ops, feed = make_key("operator", "ops"), make_key("feed", "f")
    receiver = FaultyReceiver()
    metrics = Metrics(process=False)
    sender = FlakySender(HttpWebhookSender(timeout=1.0, allow_private=True))
    dispatcher = build_webhook_dispatcher(
        db,
        sender=sender,
        policy=RetryPolicy(0.02, 0.1, 3600.0),
        metrics=metrics,
        refresh=0.1,
        poll_seconds=0.05,
        max_pause=0.2,
    )
    try:
        sid = subscribe(api, ops, receiver.url, ["member.adjusted"])["subscription_id"]
        with running(dispatcher):
            for n in range(12):
                adjust(api, ops, f"f{n % 3}", n)
            wait_for(lambda: sender.raised >= 3 and len(receiver.faults) >= 6)
            listed = api.get(HOOKS, headers=ops).json()["subscriptions"][0]
            assert listed["status"] == "failing" and listed["failing_since"], listed
            assert loop_threads(dispatcher) == {sid: True}
            page = console_page(api, db)
            assert f'id="failing-{sid}"' in page
            receiver.broken, sender.broken = False, False
            expected = [
                e["id"]
                for e in api.get("/v1/feed", params={"limit": 1000}, headers=feed).json()["events"]
                if e["type"] == "member.adjusted"
            ]
            wait_for(lambda: set(expected) <= {b["id"] for b in receiver.bodies()}, 30)
            wait_for(
                lambda: (
                    api.get(HOOKS, headers=ops).json()["subscriptions"][0]["status"] == "delivering"
                )
            )
            assert loop_threads(dispatcher) == {sid: True}
        first: list[str] = []
        for body in receiver.bodies():
            if body["id"] not in first:
                first.append(body["id"])
        assert first == expected  # in commit order, nothing lost
        errors = sum(
            sample(metrics, "loyalty_delivery_errors_total", kind=k)
            for k in ("KeyError", "RuntimeError", "ZeroDivisionError")
            if sample(metrics, "loyalty_delivery_errors_total", kind=k) > 0
        )
        assert errors == sender.raised
        assert sample(metrics, "loyalty_deliveries_total", outcome="failed") >= len(receiver.faults)
        print(f"\nfaults: {sorted(set(receiver.faults))}, sender raised {sender.raised}")
    finally:
        receiver.close()
        sender.close()


class FaultyReceiver:
    """A real HTTP endpoint on 127.0.0.1 that, while ``broken``, fails each request in one
    of these ways at random: 500, 503, a reset connection, bytes that are not HTTP, a
    hang past the sender's timeout, a response cut short. Otherwise it answers 200 and
    keeps the body."""

    FAULTS = ("500", "503", "reset", "garbage", "hang", "half")

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import orjson

        self.broken = True
        self.faults: list[str] = []
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                if not receiver.broken:
                    with receiver.lock:
                        receiver.received.append(orjson.loads(body))
                    self.send_response(200)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                fault = random.choice(FaultyReceiver.FAULTS)
                with receiver.lock:
                    receiver.faults.append(fault)
                self.close_connection = True
                if fault.isdigit():
                    self.send_response(int(fault))
                    self.send_header("content-length", "0")
                    self.end_headers()
                elif fault == "reset":
                    linger = (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                elif fault == "garbage":
                    self.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")
                elif fault == "hang":
                    time.sleep(1.5)  # beyond the sender's 1 s timeout
                else:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def console_page(api: TestClient, db: Database) -> str:
    import re

    from loyalty.adapters.keys import KeyStore
    from loyalty.application.access import Role

    key = KeyStore(db).create(Role.OPERATOR, "console")
    form = api.get("/console/sign-in").text
    token = re.search(r'name="csrf" value="([^"]+)"', form)
    assert token is not None
    api.post("/console/sign-in", data={"csrf": token.group(1), "key": key})
    return api.get("/console/webhooks").text


def test_a_url_the_client_refuses_keeps_its_loop_and_drops_its_forgotten_notice(
    api: TestClient, db: Database, make_key: Callable[..., dict[str, str]]
) -> None:
    """A subscription stored before URLs were parsed strictly (NUL in the host): the
    HTTP client raises InvalidURL on each attempt. Its loop stays alive, shows failing,
    and its member.forgotten notice is given up (not kept forever holding the user id)."""
    if db.settings.backend != "sqlite":
        pytest.skip("PostgreSQL text cannot hold a NUL: such a row exists only on SQLite")
    ops = make_key("operator", "ops")
    store = SqlDeliveryStore(db)
    bad = store.create_subscription("http://8.8.8.8\u0000.x/", ("member.forgotten",), 0)
    refused = api.post(HOOKS, json={"url": "http://8.8.8.8\u0000.x/"}, headers=ops)
    assert refused.status_code == 422
    adjust(api, ops, "nul-user", 1)
    service = build_forget_service(db)
    service.request("nul-user")
    assert service.run_pending() == 1
    assert count_notices(db) == 1
    metrics = Metrics(process=False)
    dispatcher = build_webhook_dispatcher(
        db,
        refresh=0.1,
        poll_seconds=0.05,
        policy=RetryPolicy(0.02, 0.05, 0.5),
        metrics=metrics,
        max_pause=0.2,
    )
    with running(dispatcher):
        wait_for(lambda: count_notices(db) == 0, 20)
        assert loop_threads(dispatcher) == {bad.subscription_id: True}
        listed = api.get(HOOKS, headers=ops).json()["subscriptions"]
        assert listed[0]["status"] == "failing"
        assert "\x00" not in listed[0]["last_error"]
    assert sample(metrics, "loyalty_deliveries_total", outcome="forgotten_dropped") == 1


# -- TLS through the pinned address --------------------------------------------------------


def make_certificates(tmp: Path) -> dict[str, Path]:
    """A test CA and two server certificates it signed (openssl): one for the webhook's
    host name, one for another name."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=loyalty test CA",
    )
    for name in ("hooks.rebind.test", "other.test"):
        (tmp / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}\n")
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {"ca": tmp / "ca.pem", **{n: tmp / n for n in ("hooks.rebind.test", "other.test")}}


def test_https_to_the_pinned_address_keeps_the_host_for_sni_and_the_certificate(
    tmp_path: Path,
) -> None:
    """The POST goes to the checked address (127.0.0.2, declared public for this test)
    while TLS names the URL's host: the receiver sees that SNI, the certificate is
    verified for that host (a certificate for another name fails), and the Host header is
    the URL's."""
    if not bound("127.0.0.2") or shutil.which("openssl") is None:
        pytest.skip("needs 127.0.0.2 and openssl")
    from http.server import ThreadingHTTPServer

    certs = make_certificates(tmp_path)
    seen_sni: list[str | None] = []
    results = {}
    for cert_name in ("hooks.rebind.test", "other.test"):
        receiver = Receiver()
        receiver.server.shutdown()
        receiver.server.server_close()
        server = ThreadingHTTPServer(("127.0.0.2", 0), receiver.server.RequestHandlerClass)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(f"{certs[cert_name]}.pem", f"{certs[cert_name]}.key")
        context.sni_callback = lambda _sock, name, _ctx: seen_sni.append(name)  # type: ignore[assignment,misc,return-value]
        server.socket = context.wrap_socket(server.socket, server_side=True)
        receiver.server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        client_context = ssl.create_default_context(cafile=str(certs["ca"]))
        sender = HttpWebhookSender(
            timeout=3.0,
            resolver=lambda _h, _p: ["127.0.0.2"],
            permitted=lambda a: str(a) == "127.0.0.2",
            ssl_context=client_context,
        )
        subscription = Subscription(
            "b" * 32,
            f"https://hooks.rebind.test:{port}/hook",
            (),
            "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=",
            datetime.now(UTC),
        )
        try:
            event = FeedEvent("t1", 1, "member.adjusted", "u", datetime.now(UTC), {})
            results[cert_name] = (sender.deliver(subscription, event), receiver.received[:])
        finally:
            sender.close()
            receiver.close()
    ok, received = results["hooks.rebind.test"]
    assert ok == Attempt(True, "HTTP 204"), ok
    assert received[0]["headers"]["host"].startswith("hooks.rebind.test:")
    wrong, nothing = results["other.test"]
    assert not wrong.ok and "CERTIFICATE_VERIFY_FAILED" in wrong.detail, wrong
    assert nothing == []
    assert seen_sni == ["hooks.rebind.test", "hooks.rebind.test"]
