"""The review page's guards, as Jupyter has them: a token on every request, files confined.

:class:`TokenGuard` is ASGI middleware: every request must carry the server's random
token (``?token=`` in the URL, the ``X-SuperDML-Token`` header, or the cookie the page
gets with its first load: ``SameSite=Strict``, so no other site's page sends it), every write
(anything but GET/HEAD) the header itself, which a page of another site cannot send
(custom headers need CORS, which this server never grants); the ``Host`` must be the
loopback name the server printed (no DNS rebinding). :func:`confined` resolves a file
request inside a served folder or refuses it.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs

HEADER = "x-superdml-token"
COOKIE = "superdml_token"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def new_token() -> str:
    """Return a random token for the printed URL (48 hex digits)."""
    return secrets.token_hex(24)


def confined(root: Path, relative: str) -> Path | None:
    """Return the file `relative` names under `root`, or None when it points anywhere else.

    Refused: absolute paths, ``..`` components, backslashes, NUL, and paths that resolve
    (through symbolic links) outside `root`; None also when no such file exists.
    """
    if not relative or "\\" in relative or "\x00" in relative:
        return None
    parts = PurePosixPath(relative)
    if parts.is_absolute() or ".." in parts.parts or relative.startswith("~"):
        return None
    root = root.resolve()
    path = (root / parts).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


class TokenGuard:
    """ASGI middleware refusing requests without the token (403) or from another host (400).

    Parameters
    ----------
    app : ASGI application
    token : str
    """

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Pass the request on, or answer it with a refusal."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1").rsplit(":", 1)[0]
        if host not in LOCAL_HOSTS:
            await _refuse(send, 400, "unknown host")
            return
        given = headers.get(HEADER.encode())
        if given is None and scope.get("method") in ("GET", "HEAD"):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = query.get("token", [""])[0].encode() or _cookie(headers)
        if given is None or not hmac.compare_digest(given, self.token):
            await _refuse(send, 403, "missing or wrong token (use the URL superdml serve printed)")
            return
        await self.app(scope, receive, self._with_cookie(send))

    def _with_cookie(self, send: Any) -> Any:
        """Send the token cookie with every answer (the page's assets then need no query)."""
        cookie = f"{COOKIE}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict".encode()

        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"set-cookie", cookie)],
                }
            await send(message)

        return wrapped


def _cookie(headers: dict[bytes, bytes]) -> bytes:
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value.encode()
    return b""


async def _refuse(send: Any, status: int, text: str) -> None:
    body = f"{text}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
