"""The OpenAPI document as served at /docs.json: BentoML generates it but cannot declare security
schemes, documents FastAPI's 422 and its own string `detail` where we answer 400, knows no
success status but 200, and declares OpenAPI 3.0 while pydantic writes its schemas in the 3.1
dialect (`examples` lists, `anyOf` with a null type), which 3.0 validators and code generators
reject. This middleware corrects the document on its way out, so that Swagger
UI offers to try the API with a key, and clients generated from the document (and schemathesis,
tests/test_fuzz.py) know every answer the API gives."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from kubesentiment.api.errors import API_PREFIX, json_rewriter
from kubesentiment.api.gate import GatePolicy

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


class OpenApiDocument:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.policy = GatePolicy.from_settings()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == OPENAPI_PATH:
            send = json_rewriter(send, lambda status: status == 200, self.document)
        await self.app(scope, receive, send)

    def document(self, spec: dict[str, Any]) -> dict[str, Any]:
        as_openapi_30(spec)
        components = spec.setdefault("components", {})
        components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        if self.policy.auth:
            components["securitySchemes"] = SECURITY_SCHEMES
        refusals = {"413": "Request body larger than MAX_REQUEST_BYTES"}
        if self.policy.auth:
            refusals |= {"401": "No API key", "403": "Unknown API key"}
        if self.policy.rate > 0 or self.policy.tokens_per_minute > 0:
            refusals["429"] = "Rate limit of the key (or address) exceeded; see Retry-After"
        for path, operations in spec.get("paths", {}).items():
            if not path.startswith(API_PREFIX):
                continue
            for method, operation in operations.items():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                self.document_errors(operation, SUCCESS_STATUS.get((path, method)))
                if not self.policy.guarded(path):
                    continue
                if self.policy.auth:
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


def as_openapi_30(node: Any) -> None:
    """Rewrite, in place, the JSON Schema 2020-12 keywords that pydantic emits into their OpenAPI
    3.0 forms: `examples: [a, ...]` -> `example: a`, `const: a` -> `enum: [a]`, and
    `anyOf: [X, {type: null}]` -> X with `nullable: true`. A media type's `examples` (a map of
    Example objects, valid in 3.0) is left alone."""
    if isinstance(node, list):
        for item in node:
            as_openapi_30(item)
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("examples"), list):
        examples = node.pop("examples")
        if examples:
            node["example"] = examples[0]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if isinstance(node.get("anyOf"), list) and {"type": "null"} in node["anyOf"]:
        others = [option for option in node.pop("anyOf") if option != {"type": "null"}]
        node["nullable"] = True
        if len(others) == 1 and "$ref" not in others[0]:
            node.update(others[0])
        elif len(others) == 1:  # siblings of a $ref are ignored in 3.0
            node["allOf"] = others
        else:
            node["anyOf"] = others
    for value in node.values():
        as_openapi_30(value)
