"""Who may talk to the `stemsep ui` server: an ASGI middleware in front of every route.

- The Host header must name the address the server is bound to, or `localhost` / a
  loopback address when it is bound to loopback, with its port: a page of another site
  that rebinds its DNS name to 127.0.0.1 sends its own name and is refused.
- A request that changes anything (every method but GET and HEAD) must carry an Origin
  header equal to the page's own origin: another site's form or fetch is refused.
- Off loopback, every request needs the token printed at start: in the URL once
  (``?token=...``, which sets a cookie and redirects to the address without it), then in
  that cookie or in an ``X-Stemsep-Token`` header.
- Every answer carries a Content-Security-Policy that lets the page load nothing from
  another host.
"""

from __future__ import annotations

import ipaddress
import secrets
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKEN_COOKIE = "stemsep_ui_token"
TOKEN_HEADER = "x-stemsep-token"
SAFE_METHODS = ("GET", "HEAD")
HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
     b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_names(host: str, port: int) -> set[str]:
    """The Host header values that name a server bound to `host`:`port` (empty: any, for a
    wildcard address, whose names cannot be known; the token guards it)."""
    if host in ("0.0.0.0", "::", ""):
        return set()
    names = {host, f"[{host}]" if ":" in host else host}
    if is_loopback(host):
        names |= {"localhost", "127.0.0.1", "[::1]"}
    return {f"{name}:{port}" for name in names}


class Guard:
    """The checks above around `app`, for a server bound to `host`:`port`; `token` is None on loopback."""

    def __init__(self, app: ASGIApp, host: str, port: int, token: str | None):
        self.app, self.token = app, token
        self.hosts = host_names(host, port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.hosts and host.lower() not in self.hosts:
            await _refuse(403, "this server does not answer to that host name", scope, receive, send)
            return
        if scope["method"] not in SAFE_METHODS and headers.get("origin") != f"http://{host}":
            await _refuse(403, "requests that change anything must come from this page", scope, receive, send)
            return
        if self.token is not None:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            if secrets.compare_digest(query.get("token", ""), self.token):
                rest = urlencode({k: v for k, v in query.items() if k != "token"})
                response = RedirectResponse(scope["path"] + (f"?{rest}" if rest else ""), status_code=303)
                response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
                await response(scope, receive, send)
                return
            cookie = SimpleCookie(headers.get("cookie", "")).get(TOKEN_COOKIE)
            given = headers.get(TOKEN_HEADER) or (cookie.value if cookie else "")
            if not secrets.compare_digest(given, self.token):
                await _refuse(401, "open the address with the token that the server printed at start", scope, receive, send)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _refuse(status: int, error: str, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse({"error": error}, status_code=status, headers=dict((k.decode(), v.decode()) for k, v in HEADERS))(
        scope, receive, send)
