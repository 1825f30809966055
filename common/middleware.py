"""Correlation id: one per request, taken from X-Request-ID when the caller sent a safe one.

django-structlog binds it to every log line (and carries it into Celery tasks); this middleware
settles the id first and echoes it on the response so clients can quote it."""

import re
import uuid
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class CorrelationIdMiddleware:
    """Sits before django-structlog's middleware, which reads the id from the same header."""

    sync_capable = True
    async_capable = True

    def __init__(
        self, get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]
    ) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    @staticmethod
    def _settle(request: HttpRequest) -> str:
        incoming = request.META.get("HTTP_X_REQUEST_ID")
        if incoming is None or not _SAFE_ID.match(incoming):
            incoming = uuid.uuid4().hex
            request.META["HTTP_X_REQUEST_ID"] = incoming
        return str(incoming)

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self.is_async:
            return self.__acall__(request)
        request_id = self._settle(request)
        response = self.get_response(request)
        assert isinstance(response, HttpResponseBase)  # streaming responses included
        response["X-Request-ID"] = request_id
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        request_id = self._settle(request)
        response = self.get_response(request)
        assert not isinstance(response, HttpResponse)
        result = await response
        result["X-Request-ID"] = request_id
        return result


class SyncChainMiddleware:
    """Innermost and sync-only on purpose: Django then runs the whole middleware chain in one
    worker thread per request instead of hopping between the event loop and a thread twice per
    middleware (measured: about 20x faster for a trivial view under uvicorn)."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)
