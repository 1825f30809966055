"""Registry of the long-running servers that `manage.py runall` starts in one process.

Each app registers its embedded server in `AppConfig.ready()`; runall knows no app.
"""

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EmbeddedProcess:
    name: str
    run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
    """Runs until the event is set, then finishes its unit of work and returns."""
    describe: Callable[[], str]
    """One line for the startup banner, e.g. the address it serves."""
    listens: Callable[[], list[tuple[str, str, int]]] = field(default=lambda: [])
    """The sockets it will bind, as (setting that chooses the port, host, port); runall checks
    them before starting anything, so a busy port is one clear line instead of a traceback."""


_REGISTRY: dict[str, EmbeddedProcess] = {}


def embedded_process_register(process: EmbeddedProcess) -> None:
    _REGISTRY[process.name] = process


def embedded_processes() -> list[EmbeddedProcess]:
    return list(_REGISTRY.values())
