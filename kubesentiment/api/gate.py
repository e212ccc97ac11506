"""What a request must pass before the API does any work for it: a body within MAX_REQUEST_BYTES
(413), an API key when API_AUTH is on (401 without one, 403 for an unknown one), and the rate
limit of its key or address (429). Probes, metrics and docs stay open: orchestrators and
scrapers carry no keys.

Refusals are JSON like every other error of the API and are logged with the reason, the key's
name and the request id; never with the key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubesentiment.api.errors import API_PREFIX
from kubesentiment.api.keys import KeyRing
from kubesentiment.api.rate_limits import RateLimiter
from kubesentiment.observability import get_metrics
from kubesentiment.settings import get_settings

log = structlog.get_logger("kubesentiment.gate")
REALM = 'Bearer realm="kubesentiment"'
ANONYMOUS = "anonymous"


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


@dataclass(frozen=True)
class GatePolicy:
    """What the gate asks of requests, from the settings (the OpenAPI document says the same)."""

    auth: bool
    open_paths: frozenset[str]
    max_bytes: int
    rate: float
    burst: int

    @classmethod
    def from_settings(cls) -> GatePolicy:
        s = get_settings()
        return cls(
            auth=s.api_auth,
            open_paths=frozenset(s.api_open_paths),
            max_bytes=s.max_request_bytes,
            rate=s.rate_limit_per_second,
            burst=s.rate_limit_burst,
        )

    def guarded(self, path: str) -> bool:
        """Whether a request to this path must pass the key and rate checks."""
        return path.startswith(API_PREFIX) and path.rstrip("/") not in self.open_paths


class ApiGate:
    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app, self.keys = app, keys
        self.policy = policy = GatePolicy.from_settings()
        self.limiter = RateLimiter(policy.rate, policy.burst) if policy.rate > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.policy.max_bytes:
            await self.refuse(scope, receive, send, 413, self.too_large())
            return
        extra: dict[str, str] = {}
        if self.policy.guarded(scope["path"]):
            client = ANONYMOUS
            if self.policy.auth:
                key = presented_key(headers)
                name = self.keys.identify(key) if key else None
                if key is None:
                    message = "an API key is required: Authorization: Bearer <key> or X-API-Key"
                    await self.refuse(
                        scope, receive, send, 401, message, {"WWW-Authenticate": REALM}
                    )
                    return
                if name is None:
                    await self.refuse(scope, receive, send, 403, "unknown API key")
                    return
                client = name
                structlog.contextvars.bind_contextvars(api_key=name)
            if self.limiter is not None:
                decision = self.limiter.take(client if self.policy.auth else self.address(scope))
                extra = decision.headers()
                if not decision.allowed:
                    message = f"rate limit exceeded; retry in {decision.retry_after_s} s"
                    await self.refuse(scope, receive, send, 429, message, extra)
                    return
            get_metrics().requests_by_key.labels(client).inc()
        await self.pass_on(scope, receive, send, extra)

    async def pass_on(
        self, scope: Scope, receive: Receive, send: Send, extra: dict[str, str]
    ) -> None:
        """Call the API, counting the body as it arrives: a body without Content-Length (chunked)
        that grows past the limit is cut off there and answered 413, whatever the API made of
        the truncated read."""
        received = 0
        too_large = False
        started = False

        async def counted() -> Message:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.policy.max_bytes:
                too_large = True
                return {"type": "http.disconnect"}
            return message

        async def with_headers(message: Message) -> None:
            nonlocal started
            if too_large:
                return  # the API's answer to a cut-off body is replaced by the 413 below
            if message["type"] == "http.response.start":
                started = True
                added = [(k.lower().encode(), v.encode()) for k, v in extra.items()]
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        try:
            await self.app(scope, counted, with_headers)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await self.refuse(scope, receive, send, 413, self.too_large())

    def too_large(self) -> str:
        return f"request body larger than {self.policy.max_bytes} bytes (MAX_REQUEST_BYTES)"

    @staticmethod
    def address(scope: Scope) -> str:
        client = scope.get("client")
        return client[0] if client else ANONYMOUS

    @staticmethod
    async def refuse(
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        message: str,
        headers: dict[str, Any] | None = None,
    ) -> None:
        log.warning("request refused", status=status, reason=message, path=scope["path"])
        await JSONResponse({"error": message}, status, headers=headers)(scope, receive, send)
