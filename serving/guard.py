"""ASGI middleware in front of every route: the API key (Authorization: Bearer) and the request-body limit, both
checked before a route reads a byte of the body. (Starlette's own body limit answers in plain text; every error
here is JSON.)"""
from __future__ import annotations

import json
import secrets

from starlette.exceptions import HTTPException


def error_body(error: str, detail: str) -> dict:
    """Every error the server sends: {"error": kind, "detail": what is wrong}, as A1111's API middleware does."""
    return {"error": error, "detail": detail}


class RequestGuard:
    """api_key None: no key needed. open_paths are served without the key: the static page, which holds no data
    and asks the user for the key its own requests send."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, open_paths: tuple[str, ...] = ("/",)):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in self.open_paths:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.api_key):
                return await respond(send, 401, error_body(
                    "Unauthorized", "this server needs an API key: send the header 'Authorization: Bearer <key>'"),
                    [(b"www-authenticate", b"Bearer")])
        too_large = f"the request body is larger than {self.max_body_bytes} bytes"
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return await respond(send, 413, error_body("PayloadTooLarge", too_large))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:   # a chunked body that never said its length
                raise HTTPException(413, too_large)   # FastAPI passes it on to the app's handler
            return message

        await self.app(scope, limited_receive, send)


async def respond(send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})
