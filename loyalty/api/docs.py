"""Interactive API docs at ``/docs``, from Swagger UI vendored into the package
(``static/swagger-ui``, a pinned ``swagger-ui-dist`` from the npm registry; see its
``SOURCE.md``): nothing is loaded from another site, it works offline, and the page
carries a Content-Security-Policy that allows only this server's own assets and the
page's one inline script (by its hash)."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.staticfiles import StaticFiles

ASSETS = Path(__file__).parent / "static" / "swagger-ui"
STATIC_PATH = "/docs/static"


def _inline_script_hashes(html: str) -> list[str]:
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in scripts
    ]


def install_docs(app: FastAPI) -> None:
    """``GET /docs`` (Swagger UI) and its assets under ``/docs/static/``."""
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} - API docs",
        swagger_js_url=f"{STATIC_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{STATIC_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{STATIC_PATH}/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},  # never the online validator
    ).body
    html = bytes(page).decode()
    csp = "; ".join(
        [
            "default-src 'none'",
            "script-src 'self' " + " ".join(_inline_script_hashes(html)),
            "style-src 'self' 'unsafe-inline'",  # Swagger UI sets style attributes
            "img-src 'self' data:",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'none'",
        ]
    )

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return Response(html, media_type="text/html", headers={"Content-Security-Policy": csp})

    app.mount(STATIC_PATH, StaticFiles(directory=ASSETS), name="swagger-ui")
