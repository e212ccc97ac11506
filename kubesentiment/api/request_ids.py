"""X-Request-ID: every request has one, chosen by the client or made here, returned in the
response and carried by every log line written while the request is served (ours, BentoML's
access log, uvicorn's) so that one grep finds a request's whole story."""

from __future__ import annotations

import random
import re

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
# What a proxy or a client may send; anything else (too long, control characters) is replaced,
# since it would end up verbatim in log lines.
ACCEPTED = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")


def new_request_id() -> bytes:
    """128 random bits as 32 hex digits, like a uuid4's. An id must be unique, not secret: the
    process's Mersenne Twister (reseeded in every forked worker) costs no system call, where
    uuid4's os.urandom was a visible share of the single-text path (docs/performance.md)."""
    return b"%032x" % random.getrandbits(128)


class RequestIds:
    """Outermost of our middlewares, so that every answer, errors included, has the header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(HEADER, b"")
        request_id = sent if ACCEPTED.fullmatch(sent) else new_request_id()
        if request_id != sent:  # handlers downstream read the one the response will carry
            headers = [(k, v) for k, v in scope["headers"] if k != HEADER]
            scope = {**scope, "headers": [*headers, (HEADER, request_id)]}
        # Each request runs in a task of its own, so the binding ends with the request. It is
        # not reset on the way out: BentoML's access log line is written after we return.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id.decode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (HEADER, request_id)],
                }
            await send(message)

        await self.app(scope, receive, send_with_id)
