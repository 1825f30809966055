"""`/metrics`: the django-prometheus exporter, for staff or the scraper's bearer token."""

from django.http import HttpRequest, HttpResponse, JsonResponse
from django_prometheus.exports import ExportToDjangoView

from common.api import error_body
from common.ops_access import ops_access_allowed


def metrics(request: HttpRequest) -> HttpResponse:
    if not ops_access_allowed(request):
        response = JsonResponse(
            error_body(
                "not_authenticated",
                "Staff credentials or `Authorization: Bearer <METRICS_BEARER_TOKEN>` required.",
            ),
            status=401,
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return ExportToDjangoView(request)
