"""Pagination with hard caps (kept apart from common.api to avoid an import cycle with DRF)."""

from django.conf import settings
from rest_framework import pagination


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    max_limit = settings.API_MAX_PAGE_SIZE


class CursorPagination(pagination.CursorPagination):
    page_size_query_param = "limit"
    max_page_size = settings.API_MAX_PAGE_SIZE
