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
"""

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict


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


def console_counts_take() -> dict[str, int]:
    """This process's increments since the last call (the flusher adds them to the cache)."""
    with _COUNTS_LOCK:
        taken = dict(_COUNTS)
        _COUNTS.clear()
    return taken


_HUB: list[ConsoleHub] = []


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
    "console_counts_take",
    "console_hub",
    "console_hub_register",
    "console_panel",
    "console_panel_register",
    "console_panels",
]
