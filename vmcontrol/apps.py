import asyncio

from django.apps import AppConfig


class VmcontrolConfig(AppConfig):
    name = "vmcontrol"
    verbose_name = "VM control plane"

    def ready(self) -> None:
        from django.conf import settings

        from common.console import console_panel_register
        from common.processes import EmbeddedProcess, embedded_process_register
        from vmcontrol import console, services

        services.topics_register()
        console_panel_register(console.panel)

        async def run(stop: asyncio.Event) -> None:
            from vmcontrol.consumers import application
            from vmcontrol.server import serve

            await serve(stop, app=application)

        embedded_process_register(
            EmbeddedProcess(
                name="vmcontrol",
                run=run,
                describe=lambda: (
                    f"VM agents   tcp://{settings.BIND_HOST}:{settings.VMCONTROL_PORT} "
                    "(line-delimited JSON, vmcontrol/PROTOCOL.md)"
                ),
                listens=lambda: [("VMCONTROL_PORT", settings.BIND_HOST, settings.VMCONTROL_PORT)],
            )
        )
