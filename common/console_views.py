"""The console page at `/console/`: staff only through the admin session; anyone else is sent
to the admin login page (`?next=/console/`). The page is a template and one plain script
(`static/console/console.js`) that loads `/api/console/snapshot`, then follows the panels'
staff-only topics on `/ws/`."""

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_GET

from common.console import console_panels
from common.console_publisher import console_ws, sample_seconds, window_seconds


@require_GET
@staff_member_required
@ensure_csrf_cookie
def console_page(request: HttpRequest) -> HttpResponse:
    """One card per registered panel (in `console_panels()` order), filled by the script."""
    panels = [{"name": p.name, "title": p.title, "topic": p.topic} for p in console_panels()]
    config = {
        "snapshot_url": reverse("console-snapshot"),
        "actions_url": reverse("console-actions"),
        "login_url": f"{reverse('admin:login')}?next={request.path}",
        "sample_seconds": sample_seconds(),
        "window_seconds": window_seconds(),
        "panels": panels,
        "ws": console_ws(),
    }
    return render(request, "console/index.html", {"panels": panels, "config": config})
