"""What a request must pass before the API does any work for it: a body within MAX_REQUEST_BYTES
(413), an API key when API_AUTH is on (401 without one, 403 for an unknown one), and the rate
limit of its key or address (429). Probes, metrics and docs stay open: orchestrators and
scrapers carry no keys. The token limit is charged later, by the service, once it has measured
the texts (`charge_tokens`); the gate reports both limits in the answer's headers.

Refusals are JSON like every other error of the API and are logged with the reason, the key's
name and the request id; never with the key."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubesentiment.api.errors import API_PREFIX
from kubesentiment.api.keys import KEY_NAME_STATE, KeyRing
from kubesentiment.api.rate_limits import Decision, RateLimiter, policy_headers
from kubesentiment.observability import get_metrics
from kubesentiment.settings import get_settings

log = structlog.get_logger("kubesentiment.gate")
REALM = 'Bearer realm="kubesentiment"'
ANONYMOUS = "anonymous"
ALLOWANCE = "rate_limits"  # where the gate leaves a guarded request's Allowance in its state
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


def ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address, an IPv4 one for an IPv4-mapped IPv6 address (a dual-stack listener's view of
    an IPv4 peer); None for anything else."""
    try:
        parsed = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def client_address(scope: Scope, trusted: Sequence[Network]) -> str:
    """The address the limits know a client by when there are no keys: the peer's; or, when the
    peer is a trusted proxy, the right-most address in X-Forwarded-For that is not one (the walk
    from the right). Entries left of that one are the client's to write, so they are never read;
    an entry that is not an address ends the walk at the last trusted hop."""
    peer = scope.get("client")
    address = peer[0] if peer else ANONYMOUS
    if not trusted:
        return address
    forwarded = b",".join(v for k, v in scope["headers"] if k == b"x-forwarded-for")
    for hop in reversed(forwarded.decode("latin-1").split(",")):
        current = ip(address)
        if current is None or not any(current in network for network in trusted):
            break
        if (previous := ip(hop)) is None:
            break
        address = str(previous)
    return address


@dataclass
class Allowance:
    """A guarded request's standing with the rate limits, left in its scope's state for
    `charge_tokens`: the client its buckets are keyed on (the key's name, or the address) and
    the latest decision of each limit, which the answer's headers report."""

    limiter: RateLimiter
    client: str
    decisions: dict[str, Decision] = field(default_factory=dict)

    def charge(self, policy: str, cost: float) -> Decision:
        decision = self.decisions[policy] = self.limiter.charge(self.client, policy, cost)
        return decision

    def headers(self) -> dict[str, str]:
        """RateLimit-Limit, -Remaining and -Reset of the request limit (what clients read before
        there was a token limit), the draft's structured fields naming every limit that is on,
        and Retry-After on a refusal."""
        decisions = self.decisions.values()
        requests = self.decisions.get("requests")
        headers = requests.headers() if requests is not None else {}
        headers.update(policy_headers(decisions))
        if waits := [d.retry_after_s for d in decisions if not d.allowed]:
            headers["Retry-After"] = str(max(waits))
        return headers


def charge_tokens(request: Request, tokens: int) -> str | None:
    """Charge the tokens of a request's texts to its client's token bucket, once the service has
    measured them (the gate does not read bodies). None when allowed, when the token limit is off
    or when the gate did not guard the path; otherwise the reason to answer 429 with (the gate
    adds Retry-After and the RateLimit fields)."""
    allowance: Allowance | None = request.scope.get("state", {}).get(ALLOWANCE)
    if allowance is None or "tokens" not in allowance.limiter.limits:
        return None
    decision = allowance.charge("tokens", tokens)
    if decision.allowed:
        return None
    return (
        f"token rate limit exceeded: {decision.limit} tokens per minute "
        f"(RATE_LIMIT_TOKENS_PER_MINUTE); retry in {decision.retry_after_s} s"
    )


@dataclass(frozen=True)
class GatePolicy:
    """What the gate asks of requests, from the settings (the OpenAPI document says the same)."""

    auth: bool
    open_paths: frozenset[str]
    max_bytes: int
    rate: float
    burst: int
    tokens_per_minute: int
    trusted: tuple[Network, ...]

    @classmethod
    def from_settings(cls) -> GatePolicy:
        s = get_settings()
        return cls(
            auth=s.api_auth,
            open_paths=frozenset(s.api_open_paths),
            max_bytes=s.max_request_bytes,
            rate=s.rate_limit_per_second,
            burst=s.rate_limit_burst,
            tokens_per_minute=s.rate_limit_tokens_per_minute,
            trusted=tuple(ipaddress.ip_network(n) for n in s.trusted_proxies),
        )

    def guarded(self, path: str) -> bool:
        """Whether a request to this path must pass the key and rate checks."""
        return path.startswith(API_PREFIX) and path.rstrip("/") not in self.open_paths


class ApiGate:
    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app, self.keys = app, keys
        self.policy = policy = GatePolicy.from_settings()
        self.limiter: RateLimiter | None = None
        if policy.rate > 0 or policy.tokens_per_minute > 0:
            # The directory BentoML shares among the workers of one server: one table per pod.
            shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            self.limiter = RateLimiter(
                policy.rate,
                policy.burst,
                policy.tokens_per_minute,
                Path(shared) if shared else None,
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.policy.max_bytes:
            await self.refuse(scope, receive, send, 413, self.too_large())
            return
        allowance = None
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
                scope.setdefault("state", {})[KEY_NAME_STATE] = name  # whose jobs it may see
            if self.limiter is not None:
                # Without keys, buckets go by address; the metric keeps one label for all.
                keyed_on = (
                    client if self.policy.auth else client_address(scope, self.policy.trusted)
                )
                allowance = Allowance(self.limiter, keyed_on)
                if "requests" in self.limiter.limits:
                    decision = allowance.charge("requests", 1)
                    if not decision.allowed:
                        message = f"rate limit exceeded; retry in {decision.retry_after_s} s"
                        await self.refuse(scope, receive, send, 429, message, allowance.headers())
                        return
                if "tokens" in self.limiter.limits:
                    allowance.charge("tokens", 0)  # what is left, for the headers
                scope.setdefault("state", {})[ALLOWANCE] = allowance
            get_metrics().requests_by_key.labels(client).inc()
        await self.pass_on(scope, receive, send, allowance)

    async def pass_on(
        self, scope: Scope, receive: Receive, send: Send, allowance: Allowance | None
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
                extra = allowance.headers() if allowance is not None else {}
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
