"""What a request must pass before the API does any work for it: a body within MAX_REQUEST_BYTES
(413), an API key when API_AUTH is on (401 without one, 403 for an unknown one), and the rate
limit of its key or address (429). Probes, metrics and docs stay open: orchestrators and
scrapers carry no keys.

Refusals are JSON like every other error of the API and are logged with the reason, the key's
name and the request id; never with the key."""

from __future__ import annotations

import json
from typing import Any

import structlog
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_errors import API_PREFIX
from api_keys import KeyRing
from observability import get_metrics
from rate_limits import RateLimiter
from settings import get_settings

log = structlog.get_logger("kubesentiment.gate")
REALM = 'Bearer realm="kubesentiment"'
ANONYMOUS = "anonymous"
OPENAPI_PATH = "/docs.json"
SECURITY_SCHEMES = {
    "bearerKey": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
    "headerKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {"type": "string"},
        "detail": {
            "type": "array",
            "items": {"type": "object"},
            "description": "Invalid input (400): one entry per broken field, for programs",
        },
    },
    "required": ["error"],
}
# BentoML documents every @bentoml.api answer as 200; these operations succeed with another status.
SUCCESS_STATUS = {("/api/v1/batch/predict", "post"): "202"}


def error_response(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


class ApiGate:
    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app, self.keys = app, keys
        settings = get_settings()
        self.auth = settings.api_auth
        self.open_paths = frozenset(settings.api_open_paths)
        self.max_bytes = settings.max_request_bytes
        rate = settings.rate_limit_per_second
        self.limiter = RateLimiter(rate, settings.rate_limit_burst) if rate > 0 else None

    def guarded(self, path: str) -> bool:
        return path.startswith(API_PREFIX) and path.rstrip("/") not in self.open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == OPENAPI_PATH:
            await self.app(scope, receive, self.documenting(send))
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(scope, receive, send, 413, self.too_large())
            return
        extra: dict[str, str] = {}
        if self.guarded(scope["path"]):
            client = ANONYMOUS
            if self.auth:
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
                decision = self.limiter.take(client if self.auth else self.address(scope))
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
            if received > self.max_bytes:
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

    def documenting(self, send: Send) -> Send:
        """BentoML writes the OpenAPI document and cannot declare security schemes: add them to
        its answer, with the refusals each guarded operation can get, so that Swagger UI offers
        to try the API with a key and clients generated from the document know the errors."""
        head: Message | None = None
        body = b""

        async def send_documented(message: Message) -> None:
            nonlocal head, body
            if message["type"] == "http.response.start":
                head = message
                return
            body += message.get("body", b"")
            if message.get("more_body") or head is None:
                return
            if head["status"] == 200:
                body = json.dumps(self.document(json.loads(body))).encode()
            headers = [(k, v) for k, v in head["headers"] if k.lower() != b"content-length"]
            await send(
                {**head, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
            )
            await send({"type": "http.response.body", "body": body})

        return send_documented

    def document(self, spec: dict[str, Any]) -> dict[str, Any]:
        components = spec.setdefault("components", {})
        components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        if self.auth:
            components["securitySchemes"] = SECURITY_SCHEMES
        refusals = {"413": "Request body larger than MAX_REQUEST_BYTES"}
        if self.auth:
            refusals |= {"401": "No API key", "403": "Unknown API key"}
        if self.limiter is not None:
            refusals["429"] = "Rate limit of the key (or address) exceeded; see Retry-After"
        for path, operations in spec.get("paths", {}).items():
            if not path.startswith(API_PREFIX):
                continue
            for method, operation in operations.items():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                self.document_errors(operation, SUCCESS_STATUS.get((path, method)))
                if not self.guarded(path):
                    continue
                if self.auth:
                    operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
                for status, description in refusals.items():
                    operation["responses"].setdefault(status, error_response(description))
        return spec

    @staticmethod
    def document_errors(operation: dict[str, Any], success: str | None) -> None:
        """What the generated entries get wrong about our answers: every invalid input is 400
        with {"error", "detail": [...]} (ApiErrors; FastAPI documents 422, BentoML a string
        detail), a JSON body is required (ApiErrors answers 415 without one) and some
        operations succeed with another status than BentoML's 200."""
        responses = operation["responses"]
        if responses.pop("422", None) is not None or "400" in responses:
            responses["400"] = error_response("Invalid input; `error` names the field and limit")
        if "requestBody" in operation:
            operation["requestBody"]["required"] = True
            responses["415"] = error_response("Content-Type is not application/json")
        if success is not None and "200" in responses:
            responses[success] = responses.pop("200")

    def too_large(self) -> str:
        return f"request body larger than {self.max_bytes} bytes (MAX_REQUEST_BYTES)"

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
