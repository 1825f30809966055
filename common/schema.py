"""OpenAPI naming for the house style's nested `InputSerializer`/`OutputSerializer` classes."""

from typing import Any, Literal

from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema


class AutoSchema(SpectacularAutoSchema):
    """Names a nested serializer after its view: `BetCreateApi.InputSerializer` → `BetCreateInput`,
    so every view's Input/Output gets its own component instead of colliding."""

    def get_serializer_name(
        self, serializer: Any, direction: Literal["request", "response"]
    ) -> str:
        qualname = type(serializer).__qualname__
        if "." not in qualname:
            return super().get_serializer_name(serializer, direction)
        outer, inner = qualname.split(".")[-2:]
        return outer.removesuffix("Api") + inner.removesuffix("Serializer")
