"""Pagination with hard caps (kept apart from common.api to avoid an import cycle with DRF).

DRF's own classes read `limit`/`offset` with `int()` (so Arabic-Indic digits pass) and fall
back to defaults on garbage, and feed a cursor's position straight into a filter. Here every
page parameter goes through the shared integer parser (a bad one is a 400), and a cursor whose
position does not fit its ordering field is "Invalid cursor" (404, DRF's contract) not a 500.
"""

from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from rest_framework import pagination
from rest_framework.exceptions import NotFound
from rest_framework.request import Request

from common import parsers

MAX_OFFSET = parsers.INT32_MAX


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    max_limit = settings.API_MAX_PAGE_SIZE

    def get_limit(self, request: Request) -> int | None:
        raw = request.query_params.get(self.limit_query_param)
        if raw is None:
            return self.default_limit
        limit = parsers.integer(raw, field=self.limit_query_param, min_value=1, max_value=10**9)
        return min(limit, self.max_limit) if self.max_limit else limit

    def get_offset(self, request: Request) -> int:
        raw = request.query_params.get(self.offset_query_param)
        if raw is None:
            return 0
        return parsers.integer(raw, field=self.offset_query_param, max_value=MAX_OFFSET)


class CursorPagination(pagination.CursorPagination):
    page_size_query_param = "limit"
    max_page_size = settings.API_MAX_PAGE_SIZE
    _model: Any = None

    def paginate_queryset(
        self, queryset: QuerySet[Any], request: Request, view: Any = None
    ) -> list[Any] | None:
        self._model = queryset.model
        return super().paginate_queryset(queryset, request, view)

    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.get(self.page_size_query_param or "limit")
        if raw is None:
            return int(self.page_size or settings.API_MAX_PAGE_SIZE)
        size = parsers.integer(raw, field=self.page_size_query_param or "limit", min_value=1)
        return min(size, self.max_page_size or size)

    def decode_cursor(self, request: Request) -> pagination.Cursor | None:
        cursor = super().decode_cursor(request)
        if cursor is None or cursor.position is None or self._model is None:
            return cursor
        ordering = self.ordering  # settled by paginate_queryset before it decodes the cursor
        name = (ordering if isinstance(ordering, str) else ordering[0]).lstrip("-")
        field = self._model._meta.get_field("id" if name == "pk" else name)
        try:
            parsers.text(cursor.position, field="cursor", max_length=64)
            field.to_python(cursor.position)
        except (parsers.InvalidValue, ValidationError, ValueError, TypeError):
            raise NotFound(self.invalid_cursor_message) from None
        return cursor
