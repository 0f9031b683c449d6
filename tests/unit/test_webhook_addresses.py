"""The webhook URL guard against every block of the IANA special-purpose address
registries (https://www.iana.org/assignments/iana-ipv4-special-registry and
.../iana-ipv6-special-registry, as of 2025), multicast, and the transition prefixes
(6to4, Teredo, NAT64, IPv4-mapped) wrapping private IPv4 addresses. IP literals only: no
name is resolved, nothing leaves the machine. Policy: every special-purpose block is
refused whole, whatever its "globally reachable" column says, and the transition
prefixes are refused whole (not unwrapped)."""

from __future__ import annotations

import ipaddress

import pytest

from loyalty.adapters.webhook_sender import UrlRefused, check_url

# (block, name in the registry), copied from the registries, one row per entry.
IANA_IPV4_SPECIAL = [
    ("0.0.0.0/8", "This network"),
    ("0.0.0.0/32", "This host on this network"),
    ("10.0.0.0/8", "Private-Use"),
    ("100.64.0.0/10", "Shared Address Space"),
    ("127.0.0.0/8", "Loopback"),
    ("169.254.0.0/16", "Link Local"),
    ("172.16.0.0/12", "Private-Use"),
    ("192.0.0.0/24", "IETF Protocol Assignments"),
    ("192.0.0.0/29", "IPv4 Service Continuity Prefix"),
    ("192.0.0.8/32", "IPv4 dummy address"),
    ("192.0.0.9/32", "Port Control Protocol Anycast"),
    ("192.0.0.10/32", "Traversal Using Relays around NAT Anycast"),
    ("192.0.0.170/32", "NAT64/DNS64 Discovery"),
    ("192.0.0.171/32", "NAT64/DNS64 Discovery"),
    ("192.0.2.0/24", "Documentation (TEST-NET-1)"),
    ("192.31.196.0/24", "AS112-v4"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)"),
    ("192.88.99.2/32", "6a44-relay anycast address"),
    ("192.168.0.0/16", "Private-Use"),
    ("192.175.48.0/24", "Direct Delegation AS112 Service"),
    ("198.18.0.0/15", "Benchmarking"),
    ("198.51.100.0/24", "Documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "Documentation (TEST-NET-3)"),
    ("240.0.0.0/4", "Reserved"),
    ("255.255.255.255/32", "Limited Broadcast"),
]
IANA_IPV6_SPECIAL = [
    ("::1/128", "Loopback Address"),
    ("::/128", "Unspecified Address"),
    ("::ffff:0:0/96", "IPv4-mapped Address"),
    ("64:ff9b::/96", "IPv4-IPv6 Translat."),
    ("64:ff9b:1::/48", "IPv4-IPv6 Translat."),
    ("100::/64", "Discard-Only Address Block"),
    ("100:0:0:1::/64", "Dummy IPv6 Prefix"),
    ("2001::/23", "IETF Protocol Assignments"),
    ("2001::/32", "TEREDO"),
    ("2001:1::1/128", "Port Control Protocol Anycast"),
    ("2001:1::2/128", "Traversal Using Relays around NAT Anycast"),
    ("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast"),
    ("2001:2::/48", "Benchmarking"),
    ("2001:3::/32", "AMT"),
    ("2001:4:112::/48", "AS112-v6"),
    ("2001:10::/28", "Deprecated (previously ORCHID)"),
    ("2001:20::/28", "ORCHIDv2"),
    ("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix"),
    ("2001:db8::/32", "Documentation"),
    ("2002::/16", "6to4"),
    ("2620:4f:8000::/48", "Direct Delegation AS112 Service"),
    ("3fff::/20", "Documentation"),
    ("5f00::/16", "Segment Routing (SRv6) SIDs"),
    ("fc00::/7", "Unique-Local"),
    ("fe80::/10", "Link-Local Unicast"),
]
OTHER_NON_PUBLIC = [
    ("224.0.0.0/4", "IPv4 multicast"),
    ("ff00::/8", "IPv6 multicast"),
    ("fec0::/10", "site-local (deprecated)"),
    ("::/96", "IPv4-compatible (deprecated)"),
]
# Transition prefixes wrapping the non-public IPv4 addresses of issue 26.
WRAPPED = [
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
    "2002:0a00:0001::",  # 6to4 of 10.0.0.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b:1::a00:1",  # local-use NAT64 of 10.0.0.1
    "::ffff:127.0.0.1",
    "::ffff:100.100.100.200",
    "::127.0.0.1",  # IPv4-compatible
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "100.63.255.255",  # just below 100.64.0.0/10
    "100.128.0.0",  # just above
    "192.0.1.1",
    "198.20.0.1",
    "223.255.255.254",
    "2001:4860:4860::8888",
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "2001:200::1",  # just above 2001::/23
]


def url(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}/hook"


def samples(block: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The first, a middle and the last address of ``block``."""
    net = ipaddress.ip_network(block)
    return [net[0], net[net.num_addresses // 2], net[-1]]


@pytest.mark.parametrize(
    ("block", "name"), IANA_IPV4_SPECIAL + IANA_IPV6_SPECIAL + OTHER_NON_PUBLIC
)
def test_every_special_purpose_block_is_refused(block: str, name: str) -> None:
    for address in samples(block):
        with pytest.raises(UrlRefused):
            check_url(url(address), allow_private=False)


@pytest.mark.parametrize("address", WRAPPED)
def test_transition_prefixes_are_refused_whole(address: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(url(ipaddress.ip_address(address)), allow_private=False)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_unicast_addresses_pass(address: str) -> None:
    target = url(ipaddress.ip_address(address))
    assert check_url(target, allow_private=False) == target


def test_issue_26_addresses_and_names_resolving_to_them() -> None:
    for refused in (
        "http://100.100.100.200/latest/meta-data/",
        "http://192.0.0.192/",
        "http://[2002:7f00:1::]/",
        "http://[2002:a9fe:a9fe::]/",
    ):
        with pytest.raises(UrlRefused):
            check_url(refused, allow_private=False)
    # a name is judged by every address it resolves to (an injected resolver: no DNS)
    with pytest.raises(UrlRefused):
        check_url(
            "https://hooks.example.com/x",
            allow_private=False,
            resolver=lambda _h, _p: ["93.184.215.14", "100.100.100.200"],
        )
    ok = "https://hooks.example.com/x"
    assert check_url(ok, allow_private=False, resolver=lambda _h, _p: ["93.184.215.14"]) == ok


@pytest.mark.parametrize(
    "bad",
    [
        "http://8.8.8.8\u0000.x/",
        "http://8.8.8.8\x00/",
        "http://exa\tmple.com/",
        "http://example.com/\r\nX-Injected: 1",
        "http://exa mple.com/",
        "http://[::1/",
        "http://example.com:99999/",
        "http://-bad-.example.com/",
        "http://exa%00mple.com/",
        "http://[fe80::1%25eth0]/",
        "http://xn--a.com/",
    ],
)
def test_malformed_urls_are_refused_even_where_private_addresses_are_allowed(bad: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(bad, allow_private=True)
