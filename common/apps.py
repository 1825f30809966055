from django.apps import AppConfig
from django.urls import register_converter


class CommonConfig(AppConfig):
    name = "common"
    verbose_name = "Platform"

    def ready(self) -> None:
        from django.contrib import admin

        from common.console import console_panel_register
        from common.console_platform import PLATFORM_PANEL
        from common.converters import IdConverter, IdentifierConverter

        register_converter(IdConverter, "id")
        register_converter(IdentifierConverter, "ident")
        console_panel_register(PLATFORM_PANEL)
        # The admin index links to the operator console (the template adds one module).
        admin.site.index_template = "common/admin/index.html"
