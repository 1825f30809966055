"""The REST door's JSON body parser (`DEFAULT_PARSER_CLASSES`), kept out of `common.api`, which
imports DRF views that in turn read this setting."""

from typing import Any

from rest_framework import parsers as drf_parsers

from common import parsers


class JSONParser(drf_parsers.JSONParser):
    """DRF's JSON parser through the shared document parser: invalid UTF-8, lone surrogates,
    NUL, NaN/Infinity and nesting deeper than 32 are a 400 (`InvalidValue`) naming the path,
    never a 500. Fractional numbers arrive as `parsers.JsonNumber` (exact, with their literal
    text), never as float: a field that accepts JSON numbers judges the digits the client sent."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        raw = stream.read() if stream is not None else b""
        return parsers.json_document(raw, field="body", exact=True)
