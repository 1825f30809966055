from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class RealtimeConfig(AppConfig):
    name = "realtime"
    verbose_name = "Realtime: messenger and live-event hub"

    def ready(self) -> None:
        from common.console import (
            console_gauge_register,
            console_hub_register,
            console_panel_register,
        )
        from realtime import console
        from realtime.protocol import origin_parse

        for entry in settings.WS_ALLOWED_ORIGINS:
            if entry != "*" and origin_parse(entry) is None:
                raise ImproperlyConfigured(
                    f"WS_ALLOWED_ORIGINS: {entry!r} is not `*` or an origin "
                    "`http(s)://host[:port]` (no path)"
                )
        # The operator console: the hub it publishes through (its topics staff-only), this
        # app's panel, and the per-process gauges the panel sums.
        console_hub_register(console.console_hub())
        console_panel_register(console.REALTIME_PANEL)
        console_gauge_register(console.SOCKETS, console.sockets_here)
        console_gauge_register(console.TOPIC_SUBSCRIPTIONS, console.topic_subscriptions_here)
