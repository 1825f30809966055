"""The landing page at `/`: every interface of this deployment with its address (public)."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from common.processes import embedded_processes


@require_GET
def landing(request: HttpRequest) -> HttpResponse:
    """HTML list of the HTTP doors (links on this host) and each registered server's address
    line (the same lines `runall` prints). No data, so no login."""
    host = request.get_host()
    scheme = "wss" if request.is_secure() else "ws"
    http_doors = [
        ("Console", "/console/", "operators: every system live on one page, with actions"),
        ("Admin", "/admin/", "operators: every table, actions through the apps' services"),
        ("API docs", "/api/docs/", "every REST operation, its errors; Authorize with a token"),
        ("OpenAPI schema", "/api/schema/", "machine-readable"),
        ("Health", "/health", "liveness (public)"),
        ("Readiness", "/readyz", "dependencies (detail for staff or the scraper token)"),
        ("Metrics", "/metrics", "Prometheus (staff or the scraper token)"),
    ]
    return render(
        request,
        "common/landing.html",
        {
            "http_doors": http_doors,
            "websocket": f"{scheme}://{host}/ws/",
            "servers": [process.describe() for process in embedded_processes()],
        },
    )
