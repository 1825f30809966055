"""The console's one publisher, its snapshot, and its actions (`../shared/specs/console.md`).

`console_tick` runs every CONSOLE_SAMPLE_SECONDS (the `common.console_publish` beat task in
production, the same task on `runall`'s in-process beat in embedded mode). It samples every
registered panel once, turns each counter into a rate per second against the previous sample,
keeps CONSOLE_WINDOW_SECONDS (15 minutes) of rate points per counter, stores each panel's state
in the shared cache and publishes the panel's delta on `console.<name>` through the registered
hub. Viewers cost nothing here: 1 or 50 open consoles, one sample and one publish per panel.

Published payload (the `event` frame's `payload` on `console.<name>`):
`{"panel", "sample": PanelSample | None, "status": "ok" | "unavailable", "error": str | None,
"at": epoch seconds, "ms": sampling time, "rates": {counter: {"label", "per_second",
"series": [[t, v]]}}}` where `series` holds only the newest point (a delta; the page appends
it). A panel whose `sample()` raises is logged and published `unavailable` with its last good
sample. The snapshot (`console_snapshot`) is the stored state: the same fields with the whole
series, so a reload shows what the live page shows.

Locks: a tick runs under the cache lock `console:publisher` (`cache.add`, expires after
LOCK_SECONDS should its holder die) and skips when another tick ran less than half an interval
ago, so two beats or several workers never double-sample. An action's refresh waits briefly for
the same lock, so a tick in flight cannot publish an older sample after it.
"""

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.cache import cache
from django.core.serializers.json import DjangoJSONEncoder

from common.console import ConsolePanel, console_hub, console_panel, console_panels
from common.exceptions import ApplicationError, NotFound
from common.heartbeat import process_heartbeat_now

logger = structlog.get_logger(__name__)

STATE_PREFIX = "console:panel:"
LAST_TICK_KEY = "console:last-tick"
LOCK_KEY = "console:publisher"
STATE_SECONDS = 24 * 3600
REFRESH_WAIT_SECONDS = 5.0


def sample_seconds() -> float:
    return float(getattr(settings, "CONSOLE_SAMPLE_SECONDS", 2.0))


def window_seconds() -> float:
    return float(getattr(settings, "CONSOLE_WINDOW_SECONDS", 900))


def lock_seconds() -> int:
    return max(30, int(10 * sample_seconds()))


def _plain(value: Any) -> Any:
    """JSON-plain (Decimal, datetime, UUID as the Django encoder writes them), so the stored
    snapshot and the published frame carry the very same values."""
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder))


def _lock_take() -> str | None:
    token = uuid.uuid4().hex
    return token if cache.add(LOCK_KEY, token, timeout=lock_seconds()) else None


def _lock_release(token: str) -> None:
    if cache.get(LOCK_KEY) == token:
        cache.delete(LOCK_KEY)


def _sample(panel: ConsolePanel) -> tuple[Any, str | None, float]:
    """(sample, error, ms): the panel's sample made JSON-plain, or None and a short error."""
    started = time.perf_counter()
    try:
        sample = _plain(panel.sample())
        error = None
    except Exception as exc:
        logger.exception("console_panel_failed", panel=panel.name)
        sample, error = None, f"{type(exc).__name__}: {exc}"[:200]
    return sample, error, round((time.perf_counter() - started) * 1000, 1)


def _advance(panel: ConsolePanel, previous: Mapping[str, Any] | None, now: float) -> dict[str, Any]:
    """The panel's next state: a fresh sample and each counter's rate since the last tick."""
    previous = previous or {}
    sample, error, ms = _sample(panel)
    state: dict[str, Any] = {
        "panel": panel.name,
        "title": panel.title,
        "topic": panel.topic,
        "sample": sample if sample is not None else previous.get("sample"),
        "status": "ok" if error is None else "unavailable",
        "error": error,
        "at": round(now, 3),
        "ms": ms,
        "rates": previous.get("rates", {}),
        "last": previous.get("last", {}),
    }
    if sample is None:
        return state
    horizon = now - window_seconds()
    rates: dict[str, Any] = {}
    last: dict[str, list[float]] = {}
    for key, counter in (sample.get("counters") or {}).items():
        value = int(counter["value"])
        before = state["last"].get(key)
        old = state["rates"].get(key) or {}
        series = [point for point in old.get("series", []) if point[0] >= horizon]
        per_second = None
        if before is not None and now > before[0] and value >= before[1]:
            per_second = round((value - before[1]) / (now - before[0]), 4)
            series.append([round(now, 3), per_second])
        rates[key] = {"label": counter["label"], "per_second": per_second, "series": series}
        last[key] = [round(now, 3), value]
    state["rates"], state["last"] = rates, last
    return state


def _payload(state: Mapping[str, Any], *, with_rates: bool = True) -> dict[str, Any]:
    """What goes out on the panel's topic: the state with only each series' newest point."""
    rates = {
        key: {**rate, "series": rate["series"][-1:]}
        for key, rate in (state.get("rates") or {}).items()
    }
    return {
        "panel": state["panel"],
        "sample": state["sample"],
        "status": state["status"],
        "error": state["error"],
        "at": state["at"],
        "ms": state["ms"],
        "rates": rates if with_rates else {},
    }


def _publish(topic: str, payload: Mapping[str, Any]) -> None:
    hub = console_hub()
    if hub is not None:
        hub.publish(topic, payload)


def console_tick(*, min_gap: float | None = None, now: float | None = None) -> bool:
    """Sample, store and publish every panel once; True when this call did it, False when
    another tick holds the lock or ran less than `min_gap` seconds ago (default: half of
    CONSOLE_SAMPLE_SECONDS). `now` (epoch seconds) is the sample time, the clock by default.
    Never raises for a panel's failure; the lock is released on every exit."""
    token = _lock_take()
    if token is None:
        return False
    try:
        now = time.time() if now is None else now
        gap = sample_seconds() / 2 if min_gap is None else min_gap
        last = cache.get(LAST_TICK_KEY)
        if last is not None and now - float(last) < gap:
            return False
        cache.set(LAST_TICK_KEY, now, timeout=STATE_SECONDS)
        try:
            process_heartbeat_now()
        except Exception as error:
            logger.warning("console_flush_failed", error=repr(error))
        panels = console_panels()
        keys = [STATE_PREFIX + panel.name for panel in panels]
        previous = cache.get_many(keys)
        states = {
            key: _advance(panel, previous.get(key), now)
            for key, panel in zip(keys, panels, strict=True)
        }
        cache.set_many(states, timeout=STATE_SECONDS)
        for panel, key in zip(panels, keys, strict=True):
            _publish(panel.topic, _payload(states[key]))
        return True
    finally:
        _lock_release(token)


def console_panel_refresh(panel: ConsolePanel) -> dict[str, Any]:
    """Sample one panel now, store its sample (rates untouched: they advance on ticks only) and
    publish it at once; returns the published payload. Waits up to REFRESH_WAIT_SECONDS for a
    tick in flight, then goes ahead regardless."""
    deadline = time.monotonic() + REFRESH_WAIT_SECONDS
    token = _lock_take()
    while token is None and time.monotonic() < deadline:
        time.sleep(0.02)
        token = _lock_take()
    try:
        key = STATE_PREFIX + panel.name
        state = dict(cache.get(key) or {})
        sample, error, ms = _sample(panel)
        state.update(
            panel=panel.name,
            title=panel.title,
            topic=panel.topic,
            sample=sample if sample is not None else state.get("sample"),
            status="ok" if error is None else "unavailable",
            error=error,
            at=round(time.time(), 3),
            ms=ms,
        )
        state.setdefault("rates", {})
        state.setdefault("last", {})
        cache.set(key, state, timeout=STATE_SECONDS)
        payload = _payload(state, with_rates=False)
        _publish(panel.topic, payload)
        return payload
    finally:
        if token is not None:
            _lock_release(token)


def console_ws() -> dict[str, Any]:
    """How a console follows the panels live: the `/ws/` path, the frames to send first
    (`hello`), one `subscribe` frame per panel topic, and what arrives."""
    hub = console_hub()
    return {
        "path": "/ws/",
        "auth": "the session cookie (same origin), or `?ticket=` from POST /api/realtime/ticket",
        "hello": [dict(frame) for frame in hub.hello] if hub is not None else [],
        "subscribe": [{"type": "subscribe", "topic": panel.topic} for panel in console_panels()],
        "event": "`{type: event, topic: console.<name>, payload}`: payload is a panel delta "
        "(sample, status, error, at, ms, rates with the newest point only)",
    }


def console_snapshot() -> dict[str, Any]:
    """What the publisher last stored for every panel, in page order, plus how to subscribe:
    `{"panels": [{"name", "title", "topic", "sample", "status", "error", "at", "ms",
    "rates": {key: {"label", "per_second", "series": [[t, v], ...]}}}], "ws": {...},
    "sample_seconds", "window_seconds"}`. A panel not sampled yet has `sample`/`at` None. One
    cache round trip; no panel is sampled here."""
    panels = console_panels()
    stored = cache.get_many([STATE_PREFIX + panel.name for panel in panels])
    body = []
    for panel in panels:
        state = stored.get(STATE_PREFIX + panel.name) or {}
        body.append(
            {
                "name": panel.name,
                "title": panel.title,
                "topic": panel.topic,
                "sample": state.get("sample"),
                "status": state.get("status", "waiting"),
                "error": state.get("error"),
                "at": state.get("at"),
                "ms": state.get("ms"),
                "rates": state.get("rates", {}),
            }
        )
    return {
        "panels": body,
        "ws": console_ws(),
        "sample_seconds": sample_seconds(),
        "window_seconds": window_seconds(),
        "now": round(time.time(), 3),
    }


def console_action_run(
    *, panel_name: str, action_name: str, params: Mapping[str, Any], user: AbstractBaseUser
) -> str:
    """Run the panel's action for `user` (the caller has checked staff), then publish a fresh
    sample of that panel at once; returns the action's line for the operator. Raises `NotFound`
    (`unknown_panel`, `unknown_action`) and whatever `ApplicationError` the action raises to
    refuse. Logs who did what either way."""
    panel = console_panel(panel_name)
    if panel is None:
        raise NotFound(f"No console panel {panel_name!r}.", code="unknown_panel")
    action = panel.actions.get(action_name)
    if action is None:
        raise NotFound(
            f"Panel {panel_name!r} has no action {action_name!r}.", code="unknown_action"
        )
    who = {"user": user.get_username(), "user_id": user.pk}
    shown = json.dumps(params, cls=DjangoJSONEncoder)[:500]
    try:
        detail = action.run(params=params, user=user)
    except ApplicationError as error:
        logger.info(
            "console_action_refused",
            **who,
            panel=panel_name,
            action=action_name,
            params=shown,
            code=error.code,
        )
        raise
    logger.info(
        "console_action", **who, panel=panel_name, action=action_name, params=shown, detail=detail
    )
    try:
        console_panel_refresh(panel)
    except Exception:
        logger.exception("console_refresh_failed", panel=panel_name)
    return str(detail)
