"""Sending webhooks: Standard Webhooks signatures, an httpx client, and the URL guard.

Signing (https://www.standardwebhooks.com/, spec ``standard-webhooks.md``): headers
``webhook-id`` (the event id: the same on every retry, for the receiver's dedup),
``webhook-timestamp`` (integer seconds) and ``webhook-signature: v1,<base64>`` where the
signature is HMAC-SHA256, keyed with the base64-decoded part of ``whsec_<base64>``, of
``<id>.<timestamp>.<body>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
import idna
import orjson

from loyalty.application.delivery import Attempt, FeedEvent, Subscription

USER_AGENT = "loyalty-webhooks/1"


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_request(
    subscription: Subscription, event: FeedEvent, now: float | None = None
) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(event.body())
    timestamp = int(now if now is not None else time.time())
    return body, {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": event.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(subscription.secret, event.id, timestamp, body),
    }


class UrlRefused(ValueError):
    """A webhook URL that may not be used."""


Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Every block of the IANA special-purpose address registries (iana-ipv4-special-registry,
# iana-ipv6-special-registry), whatever their "globally reachable" column says: none of
# them is where a webhook receiver lives. An address is public only outside all of them,
# and (IPv4) outside multicast 224.0.0.0/4, (IPv6) inside global unicast 2000::/3.
# The transition prefixes (NAT64 64:ff9b::/96 and 64:ff9b:1::/48, 6to4 2002::/16, Teredo
# 2001::/32, IPv4-mapped ::ffff:0:0/96) are refused whole, not unwrapped: whatever IPv4
# address they embed, a receiver reachable only through one is not a plain public host.
SPECIAL_IPV4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.31.196.0/24",
        "192.52.193.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "192.175.48.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast (its own registry)
        "240.0.0.0/4",  # reserved, and 255.255.255.255/32 within it
    )
)
SPECIAL_IPV6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/128",
        "::1/128",
        "::ffff:0:0/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "100::/64",
        "100:0:0:1::/64",
        "2001::/23",  # IETF protocol assignments: Teredo, ORCHID, benchmarking, AMT, ...
        "2001:db8::/32",
        "2002::/16",
        "2620:4f:8000::/48",
        "3fff::/20",
        "5f00::/16",
        "fc00::/7",
        "fe80::/10",
    )
)
GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")


def is_public(address: Address) -> bool:
    """Whether ``address`` is a public unicast address (see SPECIAL_IPV4/SPECIAL_IPV6)."""
    if isinstance(address, ipaddress.IPv4Address):
        return not any(address in net for net in SPECIAL_IPV4)
    if address.scope_id is not None or address not in GLOBAL_UNICAST_V6:
        return False  # ::/8 (IPv4-compatible, loopback, ...), ULA, link-local, multicast
    return not any(address in net for net in SPECIAL_IPV6)


_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


@dataclass(frozen=True, slots=True)
class Target:
    """A webhook URL taken apart strictly: the ASCII (IDNA) host the client connects to."""

    url: str
    scheme: str
    host: str
    """Lower case, IDNA-encoded; an IPv6 literal without brackets."""
    port: int
    literal: Address | None
    """The address when the host is an IP literal."""


def _ip_literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _idna_host(host: str) -> str:
    """The ASCII form of a host name (IDNA 2008 with UTS 46 mapping), each label a plain
    DNS label."""
    try:
        ascii_host = idna.encode(host.rstrip("."), uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise UrlRefused("the URL's host is not a valid host name") from None
    if not all(_HOST_LABEL.match(label) for label in ascii_host.split(".")):
        raise UrlRefused("the URL's host is not a valid host name")
    return ascii_host


def parse_url(url: str) -> Target:
    """Refuse any URL the HTTP client would read differently from us: control or
    non-ASCII characters outside the host, a host that is not an IP literal or a valid
    IDNA name, credentials, a scheme other than http(s)."""
    if len(url) > 2048:
        raise UrlRefused("the URL is longer than 2048 characters")
    if any(not ch.isprintable() or ch.isspace() for ch in url):
        raise UrlRefused("the URL holds control, space or non-printable characters")
    try:
        parts = urlsplit(url)
        port = parts.port
        hostname = parts.hostname
    except ValueError:
        raise UrlRefused("the URL does not parse") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise UrlRefused("the URL must be http:// or https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("the URL must not carry credentials")
    host = hostname.lower()
    literal = _ip_literal(host)
    if literal is None:
        if "[" in parts.netloc:
            raise UrlRefused("the URL's host is not a valid IP literal")
        host = _idna_host(host)
    elif isinstance(literal, ipaddress.IPv6Address) and literal.scope_id is not None:
        raise UrlRefused("the URL's host carries an IPv6 zone")
    try:
        client_host = httpx.URL(url).raw_host.decode("ascii").lower().rstrip(".")
    except (httpx.InvalidURL, UnicodeError):
        raise UrlRefused("the URL does not parse") from None
    if literal is not None:
        # the host as the client writes it (the pinning backend is asked for that one)
        if _ip_literal(client_host) != literal:
            raise UrlRefused("the URL's host is ambiguous")
        host = client_host
    elif client_host != host:
        raise UrlRefused("the URL's host is ambiguous")
    default = 443 if parts.scheme == "https" else 80
    return Target(url, parts.scheme, host, port or default, literal)


Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to now (getaddrinfo; a zone suffix removed)."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]).split("%")[0] for info in infos]


def resolve_checked(
    target: Target,
    *,
    allow_private: bool,
    resolver: Resolver = system_resolver,
    permitted: Callable[[Address], bool] = is_public,
) -> Address:
    """The address to connect to: the literal, or the first address the host resolves
    to, every one of which must be ``permitted`` (public) unless ``allow_private``."""
    if target.literal is not None:
        addresses: list[Address] = [target.literal]
    else:
        try:
            addresses = [ipaddress.ip_address(a) for a in resolver(target.host, target.port)]
        except (OSError, UnicodeError, ValueError):
            raise UrlRefused(f"the host {target.host} does not resolve") from None
        if not addresses:
            raise UrlRefused(f"the host {target.host} does not resolve")
    if not allow_private and not all(permitted(a) for a in addresses):
        raise UrlRefused(
            "the URL resolves to an address that is not public unicast (loopback, private, "
            "shared, link-local, reserved, documentation, multicast, transition or metadata; "
            "LOYALTY_WEBHOOK_ALLOW_PRIVATE_URLS=true allows it)"
        )
    return addresses[0]


def check_url(
    url: str,
    *,
    allow_private: bool,
    own_hosts: frozenset[str] = frozenset(),
    resolver: Resolver = system_resolver,
) -> str:
    """Refuse URLs that do not parse strictly (:func:`parse_url`), name this service, or
    resolve to anything but public unicast addresses (unless ``allow_private``). The
    check runs at creation; each delivery checks again and connects to the address it
    checked (:class:`HttpWebhookSender`)."""
    target = parse_url(url)
    if allow_private:
        return url
    if target.host in own_hosts or target.host == "localhost" or target.host.endswith(".localhost"):
        raise UrlRefused("the URL points at this service or at loopback")
    resolve_checked(target, allow_private=False, resolver=resolver)
    return url


class _PinnedBackend(httpcore.SyncBackend):
    """Connects to the address this thread's delivery checked, never resolving the host
    again (a name that answers differently at connect time cannot redirect the POST).
    TLS still names the URL's host (SNI and certificate check: httpcore's origin)."""

    def __init__(self) -> None:
        self._pin = threading.local()

    @contextmanager
    def pinned(self, host: str, address: Address) -> Iterator[None]:
        self._pin.value = (host, str(address))
        try:
            yield
        finally:
            self._pin.value = None

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        pin = getattr(self._pin, "value", None)
        if pin is None or pin[0] != host.lower().rstrip("."):
            raise httpcore.ConnectError("no checked address for this host")
        return super().connect_tcp(pin[1], port, timeout, local_address, socket_options)


class HttpWebhookSender:
    """POSTs a signed event; any 2xx is a delivery, anything else (or a timeout) fails.
    Each delivery resolves and checks the host again and connects to the address it
    checked. Redirects are not followed (they could lead to a refused address)."""

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        allow_private: bool = False,
        resolver: Resolver = system_resolver,
        permitted: Callable[[Address], bool] = is_public,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._timeout = timeout
        self._allow_private = allow_private
        self._resolver = resolver
        self._permitted = permitted
        self._backend = _PinnedBackend()
        transport = httpx.HTTPTransport(trust_env=False)
        # The same pool httpx builds, with a network backend that connects to the
        # checked address (httpx has no public parameter for it).
        transport._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=self._backend,
        )
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            trust_env=False,
            transport=transport,
        )

    def deliver(self, subscription: Subscription, event: FeedEvent) -> Attempt:
        try:
            target = parse_url(subscription.url)
            address = resolve_checked(
                target,
                allow_private=self._allow_private,
                resolver=self._resolver,
                permitted=self._permitted,
            )
        except UrlRefused as exc:
            return Attempt(False, f"refused: {exc}")
        body, headers = signed_request(subscription, event)
        try:
            with self._backend.pinned(target.host, address):
                response = self._client.post(subscription.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            detail = f"{type(exc).__name__}: {exc}".replace(subscription.url, "<url>")
            return Attempt(False, detail[:500])
        return Attempt(200 <= response.status_code < 300, f"HTTP {response.status_code}")

    def close(self) -> None:
        self._client.close()
