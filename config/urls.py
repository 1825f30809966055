from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from common import api as common_api
from common import console_api, health
from common.console_views import console_page
from common.metrics_view import metrics
from common.views import landing

urlpatterns = [
    path("", landing, name="landing"),
    path("admin/", admin.site.urls),
    path("console/", console_page, name="console"),
    path("health", health.health, name="health"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics, name="prometheus-django-metrics"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/auth/token", common_api.AuthTokenCreateApi.as_view(), name="auth-token"),
    path("api/auth/register", common_api.AuthRegisterApi.as_view(), name="auth-register"),
    path("api/auth/logout", common_api.AuthLogoutApi.as_view(), name="auth-logout"),
    path("api/auth/logout-all", common_api.AuthLogoutAllApi.as_view(), name="auth-logout-all"),
    path("api/auth/me", common_api.MeApi.as_view(), name="auth-me"),
    path("api/console/snapshot", console_api.ConsoleSnapshotApi.as_view(), name="console-snapshot"),
    path("api/console/actions", console_api.ConsoleActionRunApi.as_view(), name="console-actions"),
    path("api/realtime/", include("realtime.urls")),
    path("api/vmcontrol/", include("vmcontrol.urls")),
    path("api/betting/", include("betting.urls")),
    path("api/docbot/", include("docbot.urls")),
    path("docbot/", include("docbot.public_urls")),
    path("api/", include("warehouse.urls")),
]

handler400 = "common.api.json_bad_request"
handler403 = "common.api.json_permission_denied"
handler404 = "common.api.json_not_found"
handler500 = "common.api.json_server_error"
