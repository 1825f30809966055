import asyncio

from django.apps import AppConfig


class BettingConfig(AppConfig):
    name = "betting"
    verbose_name = "Betting: line provider and bet maker"

    def ready(self) -> None:
        from django.conf import settings

        from betting import console
        from betting.grpc.server import serve
        from betting.grpc.transport import configured_mode
        from common.console import console_panel_register
        from common.processes import EmbeddedProcess, embedded_process_register
        from realtime.services import TopicAccess, topic_register

        topic_register("betting.events", access=TopicAccess.AUTHENTICATED)
        topic_register("betting.bets", access=TopicAccess.OWNER)
        console_panel_register(console.panel)

        async def run(stop: asyncio.Event) -> None:
            await serve(stop, host=settings.BIND_HOST, port=settings.GRPC_PORT)

        embedded_process_register(
            EmbeddedProcess(
                name="betting-line-provider",
                run=run,
                describe=lambda: (
                    f"{'gRPC betting':<12} {settings.BIND_HOST}:{settings.GRPC_PORT}"
                    f" (betting.v1.LineProvider, {configured_mode()})"
                ),
                listens=lambda: [("GRPC_PORT", settings.BIND_HOST, settings.GRPC_PORT)],
            )
        )
