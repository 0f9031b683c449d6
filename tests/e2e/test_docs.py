"""/docs: Swagger UI from assets vendored into the package (pinned, with their licence),
no external URL anywhere in the page, a Content-Security-Policy that allows only this
server's assets and the page's inline script by hash."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi.testclient import TestClient

from loyalty.api.docs import ASSETS


def test_docs_load_nothing_from_elsewhere(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert not re.search(r"(https?:)?//[a-z0-9]", html, flags=re.I), html  # no external URL
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(assets) == [
        "/docs/static/favicon-32x32.png",
        "/docs/static/swagger-ui-bundle.js",
        "/docs/static/swagger-ui.css",
    ]
    for asset in assets:  # served by this app, byte for byte the vendored files
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert response.content == (ASSETS / Path(asset).name).read_bytes()
    assert client.get("/redoc").status_code == 404  # ReDoc would need a CDN


def test_docs_have_a_csp_allowing_only_their_own_script(client: TestClient) -> None:
    page = client.get("/docs")
    csp = dict(
        (part.strip().split(" ", 1) + [""])[:2]
        for part in page.headers["content-security-policy"].split(";")
    )
    assert csp["default-src"] == "'none'"
    assert "unsafe-inline" not in csp["script-src"] and "http" not in csp["script-src"]
    inline = re.findall(r"<script>(.*?)</script>", page.text, flags=re.S)
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert csp["script-src"] == f"'self' 'sha256-{digest}'"
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert "validatorUrl" in page.text and '"validatorUrl": null' in page.text


def test_the_vendored_assets_are_the_pinned_release_with_its_licence() -> None:
    sums = (ASSETS / "SHA256SUMS").read_text().split("\n")
    listed = {}
    for line in filter(None, sums):
        digest, name = line.split()
        listed[name] = digest
    assert {"LICENSE", "NOTICE", "swagger-ui-bundle.js", "swagger-ui.css"} <= set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == digest, name
    assert "Apache License" in (ASSETS / "LICENSE").read_text()
    assert "swagger-ui-dist" in (ASSETS / "SOURCE.md").read_text()
    assert "5.35.0" in (ASSETS / "SOURCE.md").read_text()
