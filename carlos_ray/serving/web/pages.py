"""Serving the pages: static package files, offline Swagger UI, security headers, a per-version catalog cache.

The ingress adds :func:`add_page_routes` to its FastAPI app and :class:`SecurityHeaders` as middleware;
the ranker deployment holds a :class:`CatalogCache`. Nothing here renders data into HTML: a page is
one shell (`static/shell.html`: head, header and navigation) around a static body (`<name>.body.html`),
put together once at start-up; the pages read the JSON API.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from html import escape
from importlib import resources
from string import Template
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from carlos_ray.serving.errors import ServiceError
from carlos_ray.serving.web.catalog import Catalog
from carlos_ray.store import Index

logger = logging.getLogger(__name__)

STATIC = Path(str(resources.files("carlos_ray.serving.web") / "static"))


@dataclass(frozen=True)
class Page:
    """One HTML page: its body file `<name>.body.html`, title, scripts and the navigation entry it is."""

    name: str
    title: str
    scripts: tuple[str, ...]
    nav: str | None = None  # the navigation entry marked current; None: no entry is
    links: tuple[str, ...] = ("static/app.css",)
    icon: str = "data:,"
    header: bool = True


NAV = (("./", "Search"), ("overview", "Index"), ("docs", "API"))
SWAGGER = "static/swagger/"
PAGES = {
    "/": Page("index", "search LoRAs by what they do", ("static/common.js", "static/search.js"), nav="Search"),
    "/lora": Page("lora", "LoRA", ("static/common.js", "static/lora.js")),
    "/overview": Page("overview", "index", ("static/common.js", "static/overview.js"), nav="Index"),
    "/docs": Page("docs", "API", (SWAGGER + "swagger-ui-bundle.js", SWAGGER + "swagger-ui-standalone-preset.js", "static/docs.js"),
                  links=(SWAGGER + "swagger-ui.css",), icon=SWAGGER + "favicon-32x32.png", header=False),
}
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css", "favicon-32x32.png")
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png",
                 ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml"}
_ASSET = re.compile(r"^[a-z0-9][a-z0-9-]*\.(js|css|png|svg)$")

# No inline script, no eval, nothing from another origin; images only from here (and data: URIs Swagger UI's CSS uses).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}


def swagger_static_dir() -> Path:
    """Swagger UI's files as shipped by the ``swagger-ui-py`` package (nothing from a CDN)."""
    import swagger_ui

    return Path(swagger_ui.__file__).parent / "static"


class SecurityHeaders:
    """ASGI middleware: the Content-Security-Policy and friends on every response."""

    def __init__(self, app: Any):
        self.app = app
        self._headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in self._headers if k not in present)]}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def render_page(page: Page) -> bytes:
    """The page's HTML: the shell with its title, stylesheets, deferred scripts, header and body (each route
    renders its page once, when the app is built)."""
    png = ' type="image/png"' if page.icon.endswith(".png") else ""
    icon = f'<link rel="icon"{png} href="{escape(page.icon)}">'
    head = [icon, *(f'<link rel="stylesheet" href="{escape(h)}">' for h in page.links),
            *(f'<script src="{escape(src)}" defer></script>' for src in page.scripts)]
    body = (STATIC / f"{page.name}.body.html").read_text(encoding="utf-8")
    if page.header:
        current = ' aria-current="page"'
        nav = "".join(f'<a href="{href}"{current if label == page.nav else ""}>{label}</a>' for href, label in NAV)
        body = f'<header class="top">\n  <a class="brand" href="./">carlos-ray</a>\n  <nav>{nav}</nav>\n</header>\n' + body
    shell = Template((STATIC / "shell.html").read_text(encoding="utf-8"))
    return shell.substitute(title=escape(page.title), head="\n".join(head), body=body).encode("utf-8")


def _file(path: Path, cache: str) -> FileResponse:
    return FileResponse(path, media_type=CONTENT_TYPES[path.suffix], headers={"Cache-Control": cache})


def add_page_routes(api: FastAPI) -> None:
    """GET /, /lora, /overview, /docs (static HTML), /static/{file} and /static/swagger/{file}; none in the OpenAPI schema."""

    def page_route(route: str, spec: Page) -> None:
        html = render_page(spec)

        async def page(request: Request) -> Response:
            path = request.url.path
            if route == "/" and not path.endswith("/"):  # under a route prefix (/ref): relative links need the slash
                query = f"?{request.url.query}" if request.url.query else ""
                return RedirectResponse(path + "/" + query, status_code=307)
            return Response(html, media_type=CONTENT_TYPES[".html"], headers={"Cache-Control": "no-cache"})

        api.add_api_route(route, page, methods=["GET"], include_in_schema=False, name=f"page_{spec.name}")

    for route, spec in PAGES.items():
        page_route(route, spec)

    @api.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = STATIC / name
        if not _ASSET.match(name) or not path.is_file():
            raise ServiceError(404, "not_found", f"no static file {name!r}")
        return _file(path, "no-cache")

    @api.get("/static/swagger/{name}", include_in_schema=False)
    async def swagger(name: str) -> Response:
        if name not in SWAGGER_FILES:
            raise ServiceError(404, "not_found", f"no Swagger UI file {name!r}")
        return _file(swagger_static_dir() / name, "public, max-age=86400")


class CatalogCache:
    """The :class:`Catalog` of the index version the ranker serves, rebuilt when that version changes."""

    def __init__(self, index_uri: str):
        self.index = Index(index_uri)
        self._catalog: Catalog | None = None
        self._lock = threading.Lock()

    def get(self, version: int) -> Catalog:
        with self._lock:
            if self._catalog is None or self._catalog.version != version:
                self._catalog = Catalog(self.index.snapshot())
                logger.info("page catalog of version %s built (%d LoRAs)", self._catalog.version, len(self._catalog))
            return self._catalog
