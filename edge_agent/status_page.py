"""The edge's own ``/`` page: who this agent is and what it runs, for a person on site.

A static page; it reads the API with the token the visitor gives (``#token=...`` or a form),
so the page itself needs no auth and leaks nothing.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

_PAGE = Path(__file__).with_name("status.html")


async def status_page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(_PAGE, headers={"Cache-Control": "no-cache"})
