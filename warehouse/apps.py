from django.apps import AppConfig


class WarehouseConfig(AppConfig):
    name = "warehouse"
    verbose_name = "Warehouse movement ledger"

    def ready(self) -> None:
        from django.conf import settings

        from common.console import console_panel_register
        from common.health import readiness_check_register
        from common.processes import EmbeddedProcess, embedded_process_register
        from realtime.services import TopicAccess, topic_register
        from warehouse import console, queue, selectors, services

        topic_register(services.STOCK_TOPIC, access=TopicAccess.AUTHENTICATED)
        readiness_check_register("warehouse_consumer", selectors.consumer_heartbeat_check)
        console_panel_register(console.panel)
        if settings.WAREHOUSE_EMBEDDED_CONSUMER:
            embedded_process_register(
                EmbeddedProcess(
                    name="warehouse-consumer",
                    run=queue.consumer_run,
                    describe=lambda: (
                        f"{'Warehouse':<12} consumer on {queue.broker_url()} "
                        f"queue {settings.WAREHOUSE_QUEUE}"
                    ),
                )
            )
