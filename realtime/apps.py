from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class RealtimeConfig(AppConfig):
    name = "realtime"
    verbose_name = "Realtime: messenger and live-event hub"

    def ready(self) -> None:
        from realtime.protocol import origin_parse

        for entry in settings.WS_ALLOWED_ORIGINS:
            if entry != "*" and origin_parse(entry) is None:
                raise ImproperlyConfigured(
                    f"WS_ALLOWED_ORIGINS: {entry!r} is not `*` or an origin "
                    "`http(s)://host[:port]` (no path)"
                )
