"""`/metrics`: the django-prometheus exporter, behind METRICS_BEARER_TOKEN when set."""

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django_prometheus.exports import ExportToDjangoView

from common.api import error_body


def metrics(request: HttpRequest) -> HttpResponse:
    expected = settings.METRICS_BEARER_TOKEN
    if expected:
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(supplied.encode(), expected.encode()):
            return JsonResponse(
                error_body("not_authenticated", "Bearer token required."), status=401
            )
    return ExportToDjangoView(request)
