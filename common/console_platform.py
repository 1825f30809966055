"""The console's platform panel: processes and their heartbeats, HTTP traffic, dependencies.

Registered by `common.apps`. Reads only the shared cache (process records, global counters)
and, at most every CONSOLE_READINESS_SECONDS, the `/readyz` checks (`common.health`), whose
last result is kept in the cache so every publisher process shows the same verdict.
"""

import time
from typing import Any

from django.conf import settings
from django.core.cache import cache

from common.console import (
    Attention,
    ConsolePanel,
    Number,
    PanelSample,
    Row,
    console_count_totals,
)
from common.health import readiness_results
from common.heartbeat import HTTP_REQUESTS, HTTP_SERVER_ERRORS, processes_read

READINESS_KEY = "console:readiness"

KIND_LABELS = {
    "embedded": "embedded (one process)",
    "web": "web (HTTP)",
    "asgi": "WebSocket (ASGI)",
    "worker": "Celery worker",
    "beat": "Celery beat",
    "consumer": "queue consumer",
    "tcp": "TCP server",
    "grpc": "gRPC server",
    "bot": "bot",
}


def _label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind)


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _readiness() -> tuple[dict[str, dict[str, Any]], float]:
    """The readiness checks' last results and when they ran (re-run when older than
    CONSOLE_READINESS_SECONDS)."""
    every = float(getattr(settings, "CONSOLE_READINESS_SECONDS", 10.0))
    cached = cache.get(READINESS_KEY)
    now = time.time()
    if cached is not None and now - cached["at"] < every:
        return cached["results"], cached["at"]
    results = readiness_results()
    cache.set(READINESS_KEY, {"at": now, "results": results}, timeout=int(max(every * 3, 60)))
    return results, now


def platform_sample() -> PanelSample:
    """Processes by kind (up / known, last heartbeat), HTTP requests and 5xx as counters, each
    dependency's readiness; attention: silent processes, expected kinds never seen, dependencies
    down."""
    processes = processes_read()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for process in processes:
        by_kind.setdefault(str(process["kind"]), []).append(process)
    attention: list[Attention] = []
    rows: list[Row] = []
    for kind in getattr(settings, "CONSOLE_EXPECTED_PROCESSES", []):
        if kind not in by_kind:
            rows.append({"key": kind, "cells": [_label(kind), "0/0", "never", "—"]})
            attention.append(
                {"key": f"missing:{kind}", "text": f"No {_label(kind)} process has reported."}
            )
    for kind, members in sorted(by_kind.items()):
        alive = [p for p in members if not p["silent"]]
        newest = min(float(p["age"]) for p in members)
        if kind == "embedded":
            where = ", ".join(name for p in members for name in p.get("names", []))
        else:
            where = ", ".join(f"{p['host']}:{p['pid']}" for p in members)
        rows.append(
            {
                "key": kind,
                "cells": [_label(kind), f"{len(alive)}/{len(members)}", _ago(newest), where],
            }
        )
        for process in members:
            if process["silent"]:
                attention.append(
                    {
                        "key": f"silent:{kind}:{process['host']}:{process['pid']}",
                        "text": f"{_label(kind)} {process['host']}:{process['pid']} silent "
                        f"since {_ago(float(process['age']))}.",
                    }
                )
    readiness, checked_at = _readiness()
    dependency_rows: list[Row] = []
    for name, result in readiness.items():
        ok = bool(result.get("ok"))
        error = str(result.get("error", ""))
        dependency_rows.append(
            {
                "key": name,
                "cells": [name, "ready" if ok else "DOWN", result.get("ms"), error or "—"],
                "link": "/readyz",
            }
        )
        if not ok:
            attention.append(
                {
                    "key": f"dependency:{name}",
                    "text": f"{name} is not ready: {error}",
                    "link": "/readyz",
                }
            )
    totals = console_count_totals([HTTP_REQUESTS, HTTP_SERVER_ERRORS])
    ready = sum(1 for result in readiness.values() if result.get("ok"))
    numbers: list[Number] = [
        {
            "key": "processes_up",
            "label": "processes up",
            "value": sum(1 for p in processes if not p["silent"]),
        },
        {
            "key": "processes_silent",
            "label": "processes silent",
            "value": sum(1 for p in processes if p["silent"]),
        },
        {
            "key": "dependencies_ready",
            "label": "dependencies ready",
            "value": f"{ready}/{len(readiness)}",
            "link": "/readyz",
        },
        {
            "key": "readiness_checked",
            "label": "readiness checked",
            "value": _ago(time.time() - checked_at),
        },
    ]
    return {
        "counters": {
            "http_requests": {"label": "HTTP requests", "value": totals[HTTP_REQUESTS]},
            "http_5xx": {"label": "HTTP 5xx answers", "value": totals[HTTP_SERVER_ERRORS]},
        },
        "numbers": numbers,
        "attention": attention,
        "tables": [
            {
                "key": "processes",
                "title": "Processes",
                "columns": ["process", "up", "last heartbeat", "where"],
                "rows": rows,
            },
            {
                "key": "dependencies",
                "title": "Dependencies (/readyz)",
                "columns": ["dependency", "status", "ms", "error"],
                "rows": dependency_rows,
            },
        ],
    }


PLATFORM_PANEL = ConsolePanel(name="platform", title="Platform", sample=platform_sample, order=10)
