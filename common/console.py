"""The operator console's registry (`../shared/specs/console.md`).

Each app contributes one panel from its `AppConfig.ready`, the way it contributes readiness
checks: `console_panel_register(ConsolePanel(...))`. The console (page, snapshot API, publisher)
knows no app by name, and this module imports no app: the live-event hub is handed in by the app
that owns it (`console_hub_register`), which also declares each panel's topic staff-only.

A panel's `sample()` returns a `PanelSample`, small JSON (at most a few KB):

- `counters`: monotonic totals (`{key: {"label": str, "value": int}}`); the publisher turns each
  into a rate per second with a 15-minute sparkline, so an app never computes a rate itself;
- `numbers`: gauges now (`[{"key", "label", "value", "link"?}]`);
- `attention`: what needs a human, newest first (`[{"key", "text", "link"?, "actions"?}]`);
- `tables`: rows an operator acts on (`[{"key", "title", "columns": [str],
  "rows": [{"key", "cells": [str|int], "link"?, "actions"?}]}]`).

An action reference in a row is `{"action": name, "label": str, "params": {...}}`; pressing it
posts `{"panel", "action", "params"}` to `POST /api/console/actions`, which runs the panel's
`ConsoleAction.run(params=..., user=...)`. `run` parses `params` with `common.parsers`, calls
the app's service, returns one line for the operator and raises `ApplicationError` to refuse.

Global numbers a panel reads without a query: `console_count` (monotonic counters, totals from
`console_count_totals`) and `console_gauge_register` (a process-local level such as open
sockets, reported in each process's heartbeat and summed over the live processes by
`console_gauge_totals`). The page, the snapshot API and the publisher live in `console_*`
modules beside this one (`common.console_publisher` holds the contract of what is published).
"""

import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NotRequired, TypedDict

import structlog
from django.utils import timezone

logger = structlog.get_logger(__name__)


class ActionRef(TypedDict):
    action: str
    label: str
    params: dict[str, Any]


class Counter(TypedDict):
    label: str
    value: int


class Number(TypedDict):
    key: str
    label: str
    value: int | float | str | None
    link: NotRequired[str]


class Attention(TypedDict):
    key: str
    text: str
    link: NotRequired[str]
    actions: NotRequired[list[ActionRef]]


class Row(TypedDict):
    key: str
    cells: list[str | int | float | None]
    link: NotRequired[str]
    actions: NotRequired[list[ActionRef]]


class Table(TypedDict):
    key: str
    title: str
    columns: list[str]
    rows: list[Row]


class PanelSample(TypedDict):
    counters: dict[str, Counter]
    numbers: list[Number]
    attention: list[Attention]
    tables: list[Table]


@dataclass(frozen=True)
class ConsoleAction:
    label: str
    run: Callable[..., str]
    """`run(*, params: Mapping[str, Any], user: AbstractBaseUser) -> str`: parse the params,
    call one service, return a one-line result; raise `ApplicationError` to refuse."""


@dataclass(frozen=True)
class ConsolePanel:
    name: str
    """Identifier, also the topic suffix: the panel streams on `console.<name>`."""
    title: str
    sample: Callable[[], PanelSample]
    """Read-only (a selector); called by the publisher every `CONSOLE_SAMPLE_SECONDS`."""
    order: int = 100
    actions: Mapping[str, ConsoleAction] = field(default_factory=dict)

    @property
    def topic(self) -> str:
        return f"console.{self.name}"


@dataclass(frozen=True)
class ConsoleHub:
    """How the console reaches the live-event hub, handed in by the app that owns the hub."""

    declare_staff_topic: Callable[[str], None]
    publish: Callable[[str, Any], None]
    """Send now (not on commit), at-most-once, never raises."""
    hello: Sequence[Mapping[str, Any]] = ()
    """Frames the console page sends right after its socket opens, before subscribing (e.g.
    leaving a room the hub joins every socket to, so a console gets no chat traffic)."""


_PANELS: dict[str, ConsolePanel] = {}
_COUNTS: dict[str, int] = {}
_COUNTS_LOCK = threading.Lock()


def console_count(key: str, amount: int = 1) -> None:
    """Add to a global monotonic counter (e.g. `vmcontrol.heartbeats`) that a panel reports in
    `counters`. Process-local and lock-cheap: this process's heartbeat flushes the increments
    to the shared cache every few seconds (`console_counts_take`), so a hot path never pays a
    round trip; read the global totals with `console_count_totals`."""
    with _COUNTS_LOCK:
        _COUNTS[key] = _COUNTS.get(key, 0) + amount


def _forget_in_child() -> None:
    # A forked child (a Celery prefork worker) starts with its parent's pending increments,
    # which the parent flushes itself, and possibly a lock another parent thread held.
    global _COUNTS_LOCK
    _COUNTS_LOCK = threading.Lock()
    _COUNTS.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def console_counts_take() -> dict[str, int]:
    """This process's increments since the last call (the flusher adds them to the cache)."""
    with _COUNTS_LOCK:
        taken = dict(_COUNTS)
        _COUNTS.clear()
    return taken


def console_count_totals(keys: Iterable[str]) -> dict[str, int]:
    """The global totals of `console_count` keys (every process's flushed increments, from the
    shared cache in one round trip); a key never counted reads 0. Lags the hot path by at most
    CONSOLE_FLUSH_SECONDS (the publisher flushes its own process first). Reads 0 while the
    cache is unreachable."""
    from common.console_store import counters_get

    return counters_get(list(keys))


_GAUGES: dict[str, Callable[[], int | float]] = {}


def console_gauge_register(key: str, read: Callable[[], int | float]) -> None:
    """Declare a process-local gauge (e.g. `realtime.sockets`, the sockets this process holds);
    `read` is called from the heartbeat thread every CONSOLE_HEARTBEAT_SECONDS, so it must be
    cheap and thread-safe (read, never lock or query). Registering a key again replaces it."""
    _GAUGES[key] = read


def console_gauges_read() -> dict[str, float]:
    """This process's gauges now; a gauge whose `read` raises is left out (and logged)."""
    values: dict[str, float] = {}
    for key, read in list(_GAUGES.items()):
        try:
            values[key] = float(read())
        except Exception:
            logger.exception("console_gauge_failed", gauge=key)
    return values


def console_gauge_totals(keys: Iterable[str]) -> dict[str, float]:
    """Each gauge summed over the processes whose heartbeat is fresh (at most three heartbeats
    old); a gauge no live process reports reads 0. One cache round trip."""
    from common.heartbeat import processes_alive

    wanted = list(keys)
    totals = dict.fromkeys(wanted, 0.0)
    for process in processes_alive():
        gauges = process.get("gauges") or {}
        for key in wanted:
            totals[key] += float(gauges.get(key, 0))
    return totals


_HUB: list[ConsoleHub] = []


def console_when(moment: datetime | None) -> str:
    """A moment for a panel cell: local time, with the date only when it is not today (the
    cells stay narrow); "" for None."""
    if moment is None:
        return ""
    local = timezone.localtime(moment)
    return local.strftime("%H:%M:%S" if local.date() == timezone.localdate() else "%Y-%m-%d %H:%M")


def console_panel_register(panel: ConsolePanel) -> None:
    """Add (or replace) a panel; declares its topic staff-only once a hub is registered."""
    _PANELS[panel.name] = panel
    for hub in _HUB:
        hub.declare_staff_topic(panel.topic)


def console_hub_register(hub: ConsoleHub) -> None:
    """Hand in the live-event hub (the realtime app does, in its `ready`)."""
    _HUB[:] = [hub]
    for panel in _PANELS.values():
        hub.declare_staff_topic(panel.topic)


def console_panels() -> list[ConsolePanel]:
    return sorted(_PANELS.values(), key=lambda panel: (panel.order, panel.name))


def console_panel(name: str) -> ConsolePanel | None:
    return _PANELS.get(name)


def console_hub() -> ConsoleHub | None:
    return _HUB[0] if _HUB else None


__all__ = [
    "ActionRef",
    "Attention",
    "ConsoleAction",
    "ConsoleHub",
    "ConsolePanel",
    "Counter",
    "Number",
    "PanelSample",
    "Row",
    "Table",
    "console_count",
    "console_count_totals",
    "console_counts_take",
    "console_gauge_register",
    "console_gauge_totals",
    "console_gauges_read",
    "console_hub",
    "console_hub_register",
    "console_panel",
    "console_panel_register",
    "console_panels",
    "console_when",
]
