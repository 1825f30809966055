"""Per-process heartbeat for the console's platform panel, and the flush of global counters.

Every long-running process calls `process_heartbeat_start(kind)` once (the web and ASGI entry
modules, the Celery worker and beat signals, each `run_*` command, `runall`). A daemon thread
then, every CONSOLE_FLUSH_SECONDS, adds this process's `console_count` increments and its HTTP
request and 5xx counts (read from django-prometheus' process-local counters, so a request pays
nothing extra) to the global counters in the cache, and every CONSOLE_HEARTBEAT_SECONDS writes
the process record `{kind, host, pid, names, started, at, gauges}`. A process that exits
normally removes its record; one that dies leaves it to go silent, which the platform panel
reports after three heartbeats and forgets after CONSOLE_PROCESS_FORGET_SECONDS.

One heartbeat per process: the first call names it (`runall` names the embedded process before
uvicorn imports the ASGI module, whose own call is then a no-op); a forked child (a Celery
prefork worker) starts its own.
"""

import atexit
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog
from django.conf import settings

from common import console_store
from common.console import console_count, console_counts_take, console_gauges_read

logger = structlog.get_logger(__name__)

PROCESSES_KEY = "console:processes"
HTTP_REQUESTS = "platform.http_requests"
HTTP_SERVER_ERRORS = "platform.http_5xx"
LOG_EVERY_SECONDS = 30.0


def _setting(name: str, default: float) -> float:
    return float(getattr(settings, name, default))


def heartbeat_seconds() -> float:
    return _setting("CONSOLE_HEARTBEAT_SECONDS", 5.0)


def silent_after_seconds() -> float:
    """A process is silent once its last heartbeat is older than three heartbeats."""
    return 3 * heartbeat_seconds()


class _Heartbeat:
    def __init__(self, kind: str, names: Sequence[str]) -> None:
        self.kind = kind
        self.names = list(names)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()
        self.stop = threading.Event()
        self.last_beat = 0.0
        self.thread = threading.Thread(target=self._run, name=f"heartbeat:{kind}", daemon=True)

    @property
    def field(self) -> str:
        return f"{self.kind}:{self.host}:{self.pid}"

    def record(self, now: float) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "host": self.host,
            "pid": self.pid,
            "names": self.names,
            "started": round(self.started, 3),
            "at": round(now, 3),
            "gauges": console_gauges_read(),
        }

    def beat(self) -> None:
        now = time.time()
        keep = int(_setting("CONSOLE_PROCESS_FORGET_SECONDS", 3600.0))
        console_store.record_put(PROCESSES_KEY, self.field, self.record(now), keep_seconds=keep)
        self.last_beat = now

    def _run(self) -> None:
        failing_since_log = 0.0
        while not self.stop.wait(_setting("CONSOLE_FLUSH_SECONDS", 1.0)):
            try:
                console_flush()
                if time.time() - self.last_beat >= heartbeat_seconds():
                    self.beat()
            except Exception as error:
                # The cache is down or refusing: counts are kept for the next flush; one line
                # per LOG_EVERY_SECONDS, not one per second.
                if time.monotonic() - failing_since_log >= LOG_EVERY_SECONDS:
                    failing_since_log = time.monotonic()
                    logger.warning("console_heartbeat_failed", kind=self.kind, error=repr(error))

    def finish(self) -> None:
        """Stop the thread, flush what is left and remove this process's record."""
        self.stop.set()
        try:
            console_flush()
            console_store.records_drop(PROCESSES_KEY, [self.field])
        except Exception:
            logger.info("console_heartbeat_final_flush_failed", kind=self.kind)


_CURRENT: list[_Heartbeat] = []
_START_LOCK = threading.Lock()


def process_heartbeat_start(kind: str, *, names: Sequence[str] = ()) -> None:
    """Start this process's heartbeat thread as `kind` (`web`, `asgi`, `worker`, `beat`,
    `consumer`, `tcp`, `grpc`, `bot`, `embedded`); `names` lists what an embedded process runs.
    The record is removed at a normal exit (`atexit`; `process_heartbeat_stop` where that is
    skipped); a process replaced by a newer one of its kind on its host is dropped as well.
    Idempotent per process: a second call (any kind) does nothing. The first beat is written at
    once; a failure there is logged, never raised."""
    with _START_LOCK:
        current = _CURRENT[0] if _CURRENT else None
        if current is not None and current.pid == os.getpid():
            return
        heartbeat = _Heartbeat(kind, names)
        _CURRENT[:] = [heartbeat]
    try:
        heartbeat.beat()
    except Exception as error:
        logger.warning("console_heartbeat_failed", kind=kind, error=repr(error))
    heartbeat.thread.start()
    atexit.register(heartbeat.finish)


def process_heartbeat_stop() -> None:
    """Stop this process's heartbeat and remove its record (for exits that skip `atexit`, such
    as a Celery prefork child's). Idempotent; never raises."""
    heartbeat = _CURRENT[0] if _CURRENT else None
    if heartbeat is not None and heartbeat.pid == os.getpid() and not heartbeat.stop.is_set():
        heartbeat.finish()


def process_heartbeat_now() -> None:
    """Flush this process's counts and write its heartbeat record now (the publisher does this
    before sampling, so its own process is never a heartbeat behind). Raises the cache's error."""
    console_flush()
    heartbeat = _CURRENT[0] if _CURRENT else None
    if heartbeat is not None and heartbeat.pid == os.getpid():
        heartbeat.beat()


_HTTP_SEEN = {"requests": 0.0, "errors": 0.0, "rebase": 0.0}
_HTTP_LOCK = threading.Lock()


def _rebase_in_child() -> None:
    # A forked child inherits the parent's counter values, which the parent reports itself:
    # the child's first read only sets its baseline.
    global _HTTP_LOCK, _START_LOCK
    _HTTP_LOCK = threading.Lock()
    _START_LOCK = threading.Lock()
    _HTTP_SEEN["rebase"] = 1.0


os.register_at_fork(after_in_child=_rebase_in_child)


def _http_counts_take() -> dict[str, int]:
    """This process's HTTP responses and 5xx answers since the last call, from
    django-prometheus' counters (nothing when this process serves no HTTP)."""
    from django_prometheus.middleware import Metrics

    metrics = Metrics._instance
    if metrics is None:
        return {}
    total = errors = 0.0
    for family in metrics.responses_by_status.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total += sample.value
                if str(sample.labels.get("status", "")).startswith("5"):
                    errors += sample.value
    with _HTTP_LOCK:
        if _HTTP_SEEN["rebase"]:
            _HTTP_SEEN.update(requests=total, errors=errors, rebase=0.0)
            return {}
        taken = {
            HTTP_REQUESTS: int(total - _HTTP_SEEN["requests"]),
            HTTP_SERVER_ERRORS: int(errors - _HTTP_SEEN["errors"]),
        }
        _HTTP_SEEN["requests"], _HTTP_SEEN["errors"] = total, errors
    return {key: amount for key, amount in taken.items() if amount > 0}


def console_flush() -> None:
    """Add this process's pending `console_count` increments and HTTP counts to the global
    counters (one cache round trip, none when there is nothing to add). On failure the
    increments are put back for the next flush and the error is raised."""
    counts = console_counts_take()
    for key, amount in _http_counts_take().items():
        counts[key] = counts.get(key, 0) + amount
    if not counts:
        return
    try:
        console_store.counters_add(counts)
    except Exception:
        for key, amount in counts.items():
            console_count(key, amount)
        raise


def processes_read() -> list[dict[str, Any]]:
    """Every process record younger than CONSOLE_PROCESS_FORGET_SECONDS, with `age` (seconds
    since its last heartbeat) and `silent` (older than three heartbeats) added; the older ones
    are removed. Ordered by kind, host, pid."""
    now = time.time()
    forget = _setting("CONSOLE_PROCESS_FORGET_SECONDS", 3600.0)
    silent = silent_after_seconds()
    records = console_store.records_get(PROCESSES_KEY)
    alive: list[dict[str, Any]] = []
    forgotten: list[str] = []
    for field, record in records.items():
        age = max(0.0, now - float(record.get("at", 0)))
        if age > forget or _replaced(record, records.values(), now - silent):
            forgotten.append(field)
            continue
        alive.append({**record, "age": round(age, 1), "silent": age > silent})
    if forgotten:
        try:
            console_store.records_drop(PROCESSES_KEY, forgotten)
        except Exception:
            logger.info("console_processes_forget_failed")
    return sorted(alive, key=lambda r: (str(r["kind"]), str(r["host"]), int(r["pid"])))


def _replaced(record: dict[str, Any], records: Any, fresh_after: float) -> bool:
    """A silent process that a fresh one of the same kind on the same host started after its
    last heartbeat has been replaced (a restart, a server respawning its workers, a killed
    prefork child): it needs no human, so it is dropped at once."""
    last = float(record.get("at", 0))
    if last > fresh_after:
        return False
    return any(
        other.get("kind") == record.get("kind")
        and other.get("host") == record.get("host")
        and float(other.get("at", 0)) > fresh_after
        and float(other.get("started", 0)) >= last - 1
        for other in records
    )


def processes_alive() -> list[dict[str, Any]]:
    """The processes whose last heartbeat is at most three heartbeats old."""
    return [record for record in processes_read() if not record["silent"]]
