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
import socket
import time
from urllib.parse import urlsplit

import httpx
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


def _forbidden(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or str(address) == "169.254.169.254"  # cloud metadata (link-local too)
        or str(address) == "fd00:ec2::254"
    )


def check_url(url: str, *, allow_private: bool, own_hosts: frozenset[str] = frozenset()) -> str:
    """Refuse URLs that are not http(s), carry credentials, name this service, or resolve
    to a loopback, private, link-local or metadata address (unless ``allow_private``).
    The check runs at creation and again before every delivery (DNS may change)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlRefused("the URL must be http:// or https:// with a host")
    if parts.username or parts.password:
        raise UrlRefused("the URL must not carry credentials")
    if len(url) > 2048:
        raise UrlRefused("the URL is longer than 2048 characters")
    if allow_private:
        return url
    host = parts.hostname.lower().rstrip(".")
    if host in own_hosts or host == "localhost" or host.endswith(".localhost"):
        raise UrlRefused("the URL points at this service or at loopback")
    try:
        infos = socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise UrlRefused(f"the host {host} does not resolve") from None
    for info in infos:
        if _forbidden(ipaddress.ip_address(str(info[4][0]).split("%")[0])):
            raise UrlRefused(
                "the URL resolves to a loopback, private, link-local or metadata address "
                "(LOYALTY_WEBHOOK_ALLOW_PRIVATE_URLS=true allows it)"
            )
    return url


class HttpWebhookSender:
    """POSTs a signed event; any 2xx is a delivery, anything else (or a timeout) fails.
    Redirects are not followed (they could lead to a refused address)."""

    def __init__(self, *, timeout: float = 10.0, allow_private: bool = False) -> None:
        self._timeout = timeout
        self._allow_private = allow_private
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False
        )

    def deliver(self, subscription: Subscription, event: FeedEvent) -> Attempt:
        try:
            check_url(subscription.url, allow_private=self._allow_private)
        except UrlRefused as exc:
            return Attempt(False, f"refused: {exc}")
        body, headers = signed_request(subscription, event)
        try:
            response = self._client.post(subscription.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return Attempt(False, f"{type(exc).__name__}: {exc}"[:500])
        return Attempt(200 <= response.status_code < 300, f"HTTP {response.status_code}")

    def close(self) -> None:
        self._client.close()
