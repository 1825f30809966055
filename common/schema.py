"""OpenAPI generation: house naming for nested serializers, and the error responses every
operation can give, all in the one error envelope (`common.api.exception_handler`)."""

from typing import Any, Literal

from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.plumbing import ComponentRegistry
from rest_framework import serializers


class ErrorDetailSerializer(serializers.Serializer[Any]):
    code = serializers.CharField(help_text="Stable machine-readable code, e.g. `invalid`.")
    message = serializers.CharField(help_text="One human-readable sentence.")
    details = serializers.JSONField(
        help_text="For `invalid`: field name → list of messages (nested for nested input); "
        "otherwise an object with the error's specifics (may be empty)."
    )


class ErrorEnvelopeSerializer(serializers.Serializer[Any]):
    """Every REST error: `{"error": {"code", "message", "details"}}`."""

    error = ErrorDetailSerializer()


# status → what it means here (the codes the one exception handler gives)
_ERRORS: dict[int, str] = {
    400: "The input is invalid: `invalid` with `details` naming each field (also a malformed "
    "body, query parameter or header).",
    401: "No valid token: `not_authenticated` or `authentication_failed` (unknown, expired or "
    "revoked token). Send `Authorization: Bearer <token>` or `Token <token>`.",
    403: "Authenticated but not allowed: `permission_denied` (e.g. staff only, not your object).",
    404: "`not_found`: no such object, or one you may not see.",
    429: "`throttled` / `rate_limited`: too many requests; `Retry-After` gives the seconds.",
}


class AutoSchema(SpectacularAutoSchema):
    """Names a nested serializer after its view: `BetCreateApi.InputSerializer` → `BetCreateInput`,
    so every view's Input/Output gets its own component instead of colliding; adds the error
    responses (400/401/403/404/429, in the error envelope) an operation can give, unless the view
    declares them itself."""

    def get_serializer_name(
        self, serializer: Any, direction: Literal["request", "response"]
    ) -> str:
        qualname = type(serializer).__qualname__
        if "." not in qualname:
            return super().get_serializer_name(serializer, direction)
        outer, inner = qualname.split(".")[-2:]
        return outer.removesuffix("Api") + inner.removesuffix("Serializer")

    def get_operation(
        self,
        path: str,
        path_regex: str,
        path_prefix: str,
        method: str,
        registry: ComponentRegistry,
    ) -> dict[str, Any] | None:
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        envelope = self.resolve_serializer(ErrorEnvelopeSerializer, "response").ref
        responses = operation.setdefault("responses", {})
        for status in self._error_statuses(operation):
            responses.setdefault(
                str(status),
                {
                    "description": _ERRORS[status],
                    "content": {"application/json": {"schema": envelope}},
                },
            )
        return operation

    def _error_statuses(self, operation: dict[str, Any]) -> list[int]:
        statuses = []
        if operation.get("requestBody") or operation.get("parameters"):
            statuses.append(400)
        security = operation.get("security", [])
        if security and {} not in security:
            statuses += [401, 403]
        if "{" in self.path:
            statuses.append(404)
        if getattr(self.view, "throttle_classes", None):
            statuses.append(429)
        return statuses
