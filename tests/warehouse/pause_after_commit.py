"""`python -m tests.warehouse.pause_after_commit MARKER [run_warehouse_consumer options]`: the
real consumer command, in a process whose consumer stops between commit and ack.

After its first batch is committed (and its after-commit effects are done), the consumer writes
its pid to MARKER and sleeps a minute before acking, so a test can SIGKILL it at exactly that point
and watch the broker redeliver the batch. The pause is patched in here, in the test's own
entrypoint: production code has no hook for it."""

import os
import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    marker, options = Path(sys.argv[1]), sys.argv[2:]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.core.management import call_command

    from warehouse import queue

    ack = queue.MovementConsumer._ack

    def pause_before_ack(self: queue.MovementConsumer, batch: list[Any]) -> None:
        marker.write_text(str(os.getpid()))
        time.sleep(60)
        ack(self, batch)

    queue.MovementConsumer._ack = pause_before_ack  # type: ignore[method-assign]
    call_command("run_warehouse_consumer", *options)


if __name__ == "__main__":
    main()
