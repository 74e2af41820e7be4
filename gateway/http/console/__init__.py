"""The web console at /console: static HTML, JS and CSS, no build step.

The files hold no data; every figure they show is fetched from /api with the operator's
bearer token (pasted at login, kept in the tab's sessionStorage). That is why these files are
served without a token, while /api answers 401/403 to anyone but an operator.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from gateway.core.errors import NotFound

_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
_FILES = ("index.html", "app.js", "style.css")
# Scripts and styles from this origin only, and nothing inline: an injected value cannot run.
# Plots are SVG fetched with the token and shown through blob: URLs (an image runs no script).
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob:; frame-ancestors 'none'; base-uri 'none';"
        " form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _load() -> dict[str, bytes]:
    root = resources.files(__name__)
    return {name: root.joinpath(name).read_bytes() for name in _FILES}


async def _serve(request: web.Request) -> web.Response:
    name = request.match_info.get("name") or "index.html"
    files: dict[str, bytes] = request.app[_CONSOLE_FILES]
    if name not in files:
        raise NotFound(f"no console file {name!r}")
    suffix = name[name.rfind(".") :]
    return web.Response(body=files[name], content_type=_TYPES[suffix], charset="utf-8", headers=_HEADERS)


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/console/")


_CONSOLE_FILES: web.AppKey[dict[str, bytes]] = web.AppKey("console_files", dict)


def add_console_routes(app: web.Application) -> None:
    app[_CONSOLE_FILES] = _load()
    app.router.add_get("/console", _redirect)
    app.router.add_get("/console/", _serve)
    app.router.add_get("/console/{name}", _serve)
