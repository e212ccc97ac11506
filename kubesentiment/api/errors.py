"""ASGI middleware for the API's error contract: a POST whose body is not declared as JSON gets
415; BentoML's validation errors are rewritten so that the `error` line itself names the field
and the broken limit; every error answer is counted by reason."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubesentiment.observability import get_metrics

API_PREFIX = "/api/v1/"
REASONS = {
    400: "invalid_input",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    499: "client_closed_request",
    503: "unavailable",
}


def reason(status: int) -> str:
    return REASONS.get(status, "internal" if status >= 500 else "client_error")


def readable(body: dict[str, Any]) -> dict[str, Any]:
    """'1 validation error for Input' becomes 'text: String should have at most 20000
    characters'; the structured detail stays for programs."""
    details = body.get("detail")
    if not isinstance(details, list) or not details:
        return body
    parts = []
    for item in details:
        where = ".".join(str(p) for p in item.get("loc", ())) or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return {**body, "error": "; ".join(parts)}


def routed(scope: Scope) -> bool:
    """Whether a route of the app takes this method at this path; without one the app answers
    404 or 405 itself, which say more than 415 would."""
    routes = getattr(scope.get("app"), "routes", None)
    if routes is None:
        return True
    return any(route.matches(scope)[0] is Match.FULL for route in routes)


def json_rewriter(send: Send, when: Callable[[int], bool], rewrite: Callable[[Any], Any]) -> Send:
    """A `send` that holds back an answer whose status passes `when` until its whole body is in,
    then sends it with its JSON body rewritten (and Content-Length to match). A body that is not
    JSON, or that `rewrite` cannot read, goes out as it came."""
    held: Message | None = None
    body = b""

    async def send_rewritten(message: Message) -> None:
        nonlocal held, body
        if message["type"] == "http.response.start" and when(message["status"]):
            held = message  # the head waits for the new Content-Length
            return
        if held is None or message["type"] != "http.response.body":
            await send(message)
            return
        body += message.get("body", b"")
        if message.get("more_body"):
            return
        try:
            new_body = json.dumps(rewrite(json.loads(body))).encode()
        except (ValueError, AttributeError):
            new_body = body
        headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(new_body)).encode()))
        await send({**held, "headers": headers})
        await send({"type": "http.response.body", "body": new_body})

    return send_rewritten


class ApiErrors:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST":
            declared = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            media_type = declared.split(";")[0].strip().lower()
            if media_type != "application/json" and routed(scope):
                get_metrics().errors.labels(reason(415)).inc()
                got = media_type or "no Content-Type"
                response = JSONResponse(
                    {"error": f"Content-Type must be application/json, got {got}"}, 415
                )
                await response(scope, receive, send)
                return

        rewritten = json_rewriter(send, lambda status: status == 400, readable)

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                get_metrics().errors.labels(reason(message["status"])).inc()
            await rewritten(message)

        await self.app(scope, receive, send_counted)
