"""The core's fleet dashboard: three static files served at ``/`` and ``/dashboard/{file}``.

The files hold no data. The page reads and steers the fleet through the public API with the
visitor's own bearer token (a login form, or ``#token=...`` once), so the files need no auth and
the API still decides what each token may see or do. Plain HTML, CSS and JavaScript: no build
step and nothing loaded from elsewhere, because sites and cores are often offline. A strict
Content-Security-Policy keeps any injected markup from running script next to the token.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from federation.errors import NotFound

DASHBOARD_DIR = Path(__file__).with_name("dashboard")
STATIC_PATH = "/dashboard/{file}"
# What build_app must serve without a token (the canonical paths of the routes below).
PUBLIC_PATHS = ("/", STATIC_PATH)

_TYPES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
}


def _serve(name: str) -> web.FileResponse:
    return web.FileResponse(DASHBOARD_DIR / name,
                            headers={**_HEADERS, "Content-Type": _TYPES[name]})


async def index(request: web.Request) -> web.StreamResponse:
    return _serve("index.html")


async def static_file(request: web.Request) -> web.StreamResponse:
    # Only the known files: a name from the URL never becomes a path on disk.
    name = request.match_info["file"]
    if name not in _TYPES:
        raise NotFound(f"no dashboard file {name!r}", details={"file": name})
    return _serve(name)


def dashboard_routes() -> list[web.RouteDef]:
    """The routes to pass to ``build_app(extra_routes=...)``, with ``PUBLIC_PATHS`` public."""
    return [web.get("/", index), web.get(STATIC_PATH, static_file)]
