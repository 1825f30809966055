"""ASGI fast path for the assignment's two public reads.

A plain Django request through the project's middleware stack costs ~2.5 ms of CPU, which caps a
process at a few hundred requests per second; the stock read must hold p99 <= 25 ms at 500 req/s
while the consumer ingests on the same two cores. Anonymous GETs of
`/api/warehouses/<uuid>/products/<uuid>` and `/api/movements/<uuid>` are therefore answered
here, from the same selectors (cache, then database), without Django's request handler.

Whatever it answers, it answers as the Django stack would, and it answers only the view's own
outcomes: 200, 404 and the throttle's 429, with the DRF view's exact body. Everything else goes
to Django untouched: other paths and methods, query strings, tokens and cookies, an `Accept`
that does not take JSON, ids the shared UUID parser refuses, a request that a middleware would
answer before the view (a Host outside ALLOWED_HOSTS, the HTTPS redirect, a refused user agent),
WAREHOUSE_PUBLIC_READS=false and WAREHOUSE_READ_FASTPATH=false.

Every entry of settings.MIDDLEWARE is accounted for in `MIDDLEWARE_ON_FASTPATH`: the fast path
runs its hooks on its own request and response (the Host check, the HTTPS redirect, security
headers with HSTS when configured, X-Frame-Options, Content-Length), does its work itself (the
X-Request-ID correlation id; django-prometheus's request metrics, whose hooks would cost more
than the rest of the fast path), or it has nothing to do for an anonymous GET of these paths. A
middleware missing from the table switches the fast path off, logged once, until it has been
classified. The view's own headers (DRF's `Allow`, the `Vary: Cookie` its session
authentication causes) are added as DRF adds them. `X-Served-By: warehouse-fastpath` is the one
header the Django path does not send. tests/warehouse/test_fastpath.py compares every answer,
header and metric with the Django path's for the same request.

Reads are throttled per client in the budget the DRF views draw on (`read_limits`). With a
Redis cache the throttle count and the cache lookup are one pipelined round trip on the event
loop, and a miss takes one worker-thread hop to the selectors; without Redis the whole read
takes that hop. Redis unreachable: the throttle fails open and reads come from the database,
with one warning per LOG_EVERY_SECONDS and Redis retried every REDIS_RETRY_SECONDS; never a
500. An unexpected failure while answering gets this door's catch-all (the JSON 500 envelope,
logged once with the correlation id).
"""

import asyncio
import contextlib
import functools
import io
import re
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from timeit import default_timer
from typing import Any

import redis.asyncio
import redis.exceptions
import structlog
from django.conf import settings
from django.core.cache import cache
from django.core.cache.backends.redis import RedisCache, RedisSerializer
from django.core.exceptions import PermissionDenied, SuspiciousOperation
from django.core.handlers.asgi import ASGIRequest
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http import HttpResponse
from django.http.response import HttpResponseBase
from django.utils.cache import patch_vary_headers
from django.utils.module_loading import import_string
from django_prometheus.middleware import Metrics
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from rest_framework.exceptions import Throttled
from rest_framework.renderers import JSONRenderer

from common import parsers
from common.api import exception_handler
from common.cache import OUTAGE_ERRORS
from common.db import orm_async
from common.exceptions import NotFound
from common.network import client_ip, client_key
from warehouse import read_cache, read_limits, selectors

logger = structlog.get_logger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]

LOG_EVERY_SECONDS = 10.0
REDIS_RETRY_SECONDS = 1.0

# What the fast path does for each middleware of the Django stack.
CHECK = "check"  # process_request first; when it answers or raises, Django answers the request
RESPONSE = "response"  # process_response on the fast path's response
CORRELATION = "correlation"  # done here: X-Request-ID settled and echoed
METRICS = "metrics"  # done here: django-prometheus's request metrics (`_count_request`)
MIDDLEWARE_ON_FASTPATH: dict[str, frozenset[str]] = {
    "django_prometheus.middleware.PrometheusBeforeMiddleware": frozenset({METRICS}),
    "django.middleware.security.SecurityMiddleware": frozenset({CHECK, RESPONSE}),
    # Serves static files only.
    "servestatic.middleware.ServeStaticMiddleware": frozenset(),
    "common.middleware.CorrelationIdMiddleware": frozenset({CORRELATION}),
    # The fast path's catch-all answers the same envelope.
    "common.middleware.JsonErrorMiddleware": frozenset(),
    # Binds the request id to log lines (the fast path binds it too); its request lines are
    # below the default LOG_LEVEL_REQUESTS.
    "django_structlog.middlewares.RequestMiddleware": frozenset(),
    # No cookie and no token reach the fast path: no session, CSRF cookie, messages or user.
    "django.contrib.sessions.middleware.SessionMiddleware": frozenset(),
    "django.middleware.common.CommonMiddleware": frozenset({CHECK, RESPONSE}),
    "django.middleware.csrf.CsrfViewMiddleware": frozenset(),
    "django.contrib.auth.middleware.AuthenticationMiddleware": frozenset(),
    "django.contrib.messages.middleware.MessageMiddleware": frozenset(),
    "django.middleware.clickjacking.XFrameOptionsMiddleware": frozenset({RESPONSE}),
    "django_prometheus.middleware.PrometheusAfterMiddleware": frozenset({METRICS}),
    # Acts on the login views' lockouts only.
    "axes.middleware.AxesMiddleware": frozenset(),
    # Changes how Django runs the chain, not what it answers.
    "common.middleware.SyncChainMiddleware": frozenset(),
}

_UUID = r"[0-9a-fA-F-]{32,36}"
STOCK_PATH = re.compile(rf"^/api/warehouses/({_UUID})/products/({_UUID})$")
MOVEMENT_PATH = re.compile(rf"^/api/movements/({_UUID})$")
_URL_NAMES = {"stock": "warehouse-stock-detail", "movement": "warehouse-movement-detail"}
_NOT_FOUND = {"stock": selectors.STOCK_NOT_FOUND, "movement": selectors.MOVEMENT_NOT_FOUND}
_ID_FIELDS = {"stock": ("warehouse_id", "product_id"), "movement": ("movement_id",)}
# What DRF's APIView answers for these GET-only views (`Allow`), and the `Vary: Cookie` that its
# SessionAuthentication causes by reading the session.
_VIEW_ALLOW = "GET, HEAD, OPTIONS"
_JSON_MEDIA_RANGES = {"*/*", "application/*", "application/json"}
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)
_SERVER_ERROR = (
    b'{"error":{"code":"server_error","message":"Internal server error. Quote the X-Request-ID '
    b'when reporting it.","details":{}}}'
)
_MISS = object()
_renderer = JSONRenderer()
_serializer = RedisSerializer()
_redis_scripts: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]]" = (
    weakref.WeakKeyDictionary()
)
_redis_retry_at = 0.0
_last_logged: dict[str, float] = {}


def _log_now(event: str) -> bool:
    """Rate limit for a log line that could repeat on every request."""
    now = time.monotonic()
    if now - _last_logged.get(event, -LOG_EVERY_SECONDS) < LOG_EVERY_SECONDS:
        return False
    _last_logged[event] = now
    return True


@dataclass(frozen=True)
class _Plan:
    """The Django stack as the fast path honours it: the middleware whose process_request
    must pass, those whose process_response shape the answer (innermost first, None standing
    for the correlation id), and whether the request metrics are counted."""

    checks: tuple[Any, ...]
    responders: tuple[Any, ...]
    metrics: bool


@functools.lru_cache(maxsize=4)
def _plan(middleware: tuple[str, ...]) -> _Plan | None:
    """The plan for settings.MIDDLEWARE, its middleware instantiated once as Django's handler
    instantiates them (they read their settings then); None (fast path off) when one is not
    in MIDDLEWARE_ON_FASTPATH."""
    unknown = [path for path in middleware if path not in MIDDLEWARE_ON_FASTPATH]
    if unknown:
        logger.warning("warehouse_fastpath_disabled", unclassified_middleware=unknown)
        return None
    instances = {
        path: import_string(path)(_no_view)
        for path in middleware
        if MIDDLEWARE_ON_FASTPATH[path] & {CHECK, RESPONSE}
    }
    return _Plan(
        checks=tuple(instances[p] for p in middleware if CHECK in MIDDLEWARE_ON_FASTPATH[p]),
        responders=tuple(
            None if CORRELATION in MIDDLEWARE_ON_FASTPATH[p] else instances[p]
            for p in reversed(middleware)
            if MIDDLEWARE_ON_FASTPATH[p] & {RESPONSE, CORRELATION}
        ),
        metrics=any(METRICS in MIDDLEWARE_ON_FASTPATH[p] for p in middleware),
    )


@receiver(setting_changed)
def _settings_changed(**kwargs: Any) -> None:
    # Only tests change settings at run time; the middleware are built again from them.
    _plan.cache_clear()


@dataclass
class _Read:
    kind: str
    ids: tuple[uuid.UUID, ...]
    request: ASGIRequest
    request_id: str
    plan: _Plan
    client: str
    started: float = 0.0


def _match(scope: Scope) -> tuple[str, tuple[uuid.UUID, ...]] | None:
    if scope["type"] != "http" or scope["method"] != "GET" or scope.get("query_string"):
        return None
    if not (settings.WAREHOUSE_READ_FASTPATH and settings.WAREHOUSE_PUBLIC_READS):
        return None
    for name, value in scope.get("headers", []):
        if name in (b"authorization", b"cookie"):
            return None
        if name == b"accept" and not _takes_json(value):
            return None
    path = scope["path"]
    found = STOCK_PATH.match(path)
    kind = "stock"
    if found is None:
        found, kind = MOVEMENT_PATH.match(path), "movement"
    if found is None:
        return None
    try:
        return kind, tuple(
            parsers.uuid_value(group, field=name)
            for group, name in zip(found.groups(), _ID_FIELDS[kind], strict=True)
        )
    except parsers.InvalidValue:
        return None


def _takes_json(accept: bytes) -> bool:
    """Whether DRF's negotiation would pick its JSON renderer, unindented, for this Accept."""
    text = accept.decode("latin-1")
    if "indent" in text:
        return False
    return any(part.split(";")[0].strip() in _JSON_MEDIA_RANGES for part in text.split(","))


def _prepare(scope: Scope) -> _Read | None:
    """The read to answer here, or None for Django to answer. Side-effect free, so a request
    handed to Django is seen by Django alone."""
    matched = _match(scope)
    if matched is None:
        return None
    plan = _plan(tuple(settings.MIDDLEWARE))
    if plan is None:
        return None
    request = ASGIRequest(scope, io.BytesIO())
    incoming = request.META.get("HTTP_X_REQUEST_ID", "")
    if not _SAFE_REQUEST_ID.fullmatch(incoming):
        request.META["HTTP_X_REQUEST_ID"] = uuid.uuid4().hex
    try:
        if any(check.process_request(request) is not None for check in plan.checks):
            return None
    except (SuspiciousOperation, PermissionDenied):
        return None
    kind, ids = matched
    return _Read(
        kind=kind,
        ids=ids,
        request=request,
        request_id=request.META["HTTP_X_REQUEST_ID"],
        plan=plan,
        client=client_key(client_ip(request)),
    )


def _no_view(request: Any) -> None:
    """Stands in for the view where middleware want a callable; never called."""


def _cache_key(read: _Read) -> str:
    if read.kind == "stock":
        return read_cache.stock_cache_key(read.ids[0], read.ids[1])
    return read_cache.movement_cache_key(read.ids[0])


def _read_sync(
    kind: str, ids: tuple[uuid.UUID, ...], client: str | None
) -> tuple[float | None, Mapping[str, Any] | None]:
    wait = read_limits.hit(client) if client is not None else None
    if wait is not None:
        return wait, None
    if kind == "stock":
        return None, selectors.stock_get(warehouse_id=ids[0], product_id=ids[1])
    return None, selectors.movement_get(movement_id=ids[0])


# As Django does around a request: the connection goes back (to the pool, when there is one) as
# soon as the read is done, rather than staying with an idle worker thread.
_read_in_thread = orm_async(_read_sync)


@functools.lru_cache(maxsize=4)
def _redis_location(backend: str, location: str | tuple[str, ...]) -> str | None:
    """The Redis server behind the default cache (its first, the primary), or None."""
    if not issubclass(import_string(backend), RedisCache):
        return None
    servers = re.split("[;,]", location) if isinstance(location, str) else location
    return str(servers[0]).strip()


# One round trip, atomic: count the read in the client's window (the entry is created with the
# window's TTL, as `read_limits.hit` creates it through the Django cache) and fetch the view.
_COUNT_AND_GET = """
local count = 0
if ARGV[1] ~= '0' then
  count = redis.call('INCR', KEYS[2])
  if count == 1 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
end
return {count, redis.call('GET', KEYS[1])}
"""


def _redis_script() -> Any | None:
    """The count-and-get script bound to a client of the default cache's Redis (one client
    per event loop and server), or None when the cache is not Redis."""
    config = settings.CACHES["default"]
    location = config.get("LOCATION", "")
    location = _redis_location(
        config["BACKEND"], location if isinstance(location, str) else tuple(location)
    )
    if location is None:
        return None
    loop = asyncio.get_running_loop()
    scripts = _redis_scripts.setdefault(loop, {})
    script = scripts.get(location)
    if script is None:
        options = config.get("OPTIONS", {})
        client = redis.asyncio.Redis.from_url(
            location,
            socket_connect_timeout=options.get("socket_connect_timeout", 0.5),
            socket_timeout=options.get("socket_timeout", 1.0),
            # One immediate retry: a pooled connection that Redis dropped when it restarted
            # reconnects, while an outage fails within the timeouts above.
            retry=Retry(NoBackoff(), 1),
        )
        script = scripts[location] = client.register_script(_COUNT_AND_GET)
    return script


async def _from_redis(script: Any, read: _Read) -> tuple[float | None, Any]:
    """Count the read and fetch its cache entry in one round trip: (wait, view or _MISS)."""
    limit = read_limits.rate()
    now = read_limits.now()
    view_key = cache.make_key(_cache_key(read))
    if limit is None:
        count, raw = await script(keys=[view_key, view_key], args=[0])
    else:
        counter = cache.make_key(read_limits.counter_key(read.client, limit, now))
        count, raw = await script(keys=[view_key, counter], args=[read_limits.counter_ttl(limit)])
        wait = read_limits.verdict(limit, int(count), now)
        if wait is not None:
            return wait, None
    view = read_cache.view_or_miss(_serializer.loads(raw) if raw is not None else None)
    # Anything but a view (the invalidation tombstone, an older "missing" marker) is a miss.
    return None, _MISS if view is None else view


async def _lookup(read: _Read) -> tuple[float | None, Mapping[str, Any] | None]:
    global _redis_retry_at
    script = _redis_script()
    if script is None:
        return await _read_in_thread(read.kind, read.ids, read.client)
    if time.monotonic() >= _redis_retry_at:
        try:
            wait, view = await _from_redis(script, read)
        except (*OUTAGE_ERRORS, redis.exceptions.RedisError) as exc:
            # Down, or refusing the script (an ACL, a proxy without EVAL): the Django cache,
            # which the selectors use, decides from here until the next retry.
            _redis_retry_at = time.monotonic() + REDIS_RETRY_SECONDS
            if _log_now("cache_unavailable"):
                logger.warning("cache_unavailable", door="warehouse-fastpath", error=str(exc)[:200])
        else:
            if view is not _MISS:
                return wait, view
            return await _read_in_thread(read.kind, read.ids, None)
    # Redis is down: the throttle fails open, the selectors fall back to the database.
    return await _read_in_thread(read.kind, read.ids, None)


def _answer(read: _Read, wait: float | None, view: Mapping[str, Any] | None) -> HttpResponse:
    """The DRF view's response for this outcome: the same status, body (its JSON renderer,
    its exception handler's envelope) and view headers."""
    status, data, headers = 200, view, {}
    if wait is not None or view is None:
        error = Throttled(wait=wait) if wait is not None else NotFound(_NOT_FOUND[read.kind])
        handled = exception_handler(error, {})
        assert handled is not None
        status, data = handled.status_code, handled.data
        headers = {name: value for name, value in handled.items() if name != "Content-Type"}
    response = HttpResponse(_renderer.render(data), status=status, content_type="application/json")
    for name, value in headers.items():
        response[name] = value
    response["Allow"] = _VIEW_ALLOW
    patch_vary_headers(response, ("Cookie",))
    return response


def _finish(read: _Read, response: HttpResponseBase) -> HttpResponseBase:
    """Run the middleware's response hooks, innermost first, as Django's chain would."""
    for responder in read.plan.responders:
        if responder is None:
            response["X-Request-ID"] = read.request_id
        else:
            response = responder.process_response(read.request, response)
    return response


@functools.lru_cache(maxsize=256)
def _metric(family: Any, **labels: str) -> Any:
    return family.labels(**labels)


def _count_request(read: _Read) -> None:
    """What django-prometheus's middleware record when a request reaches the DRF view (its
    Before/After process_request and process_view), with the label children looked up once
    rather than per request: its hooks cost more than the rest of the fast path. The tests
    compare every family with the Django path's."""
    read.started = default_timer()
    metrics = Metrics.get_instance()
    request = read.request
    transport = "https" if request.is_secure() else "http"
    metrics.requests_total.inc()
    _metric(metrics.requests_by_method, method="GET").inc()
    _metric(metrics.requests_by_transport, transport=transport).inc()
    if request.META.get("HTTP_X_REQUESTED_WITH") == "XMLHttpRequest":
        metrics.requests_ajax.inc()
    try:
        length = parsers.integer(request.META.get("CONTENT_LENGTH") or "0", field="content-length")
    except parsers.InvalidValue:
        length = 0
    metrics.requests_body_bytes.observe(length)
    view = _URL_NAMES[read.kind]
    _metric(
        metrics.requests_by_view_transport_method, view=view, transport=transport, method="GET"
    ).inc()


def _count_response(read: _Read, response: HttpResponseBase) -> None:
    """django-prometheus's response side (process_template_response of the DRF response, both
    process_response)."""
    metrics = Metrics.get_instance()
    view, status = _URL_NAMES[read.kind], str(response.status_code)
    _metric(metrics.responses_by_templatename, templatename="None").inc()
    _metric(metrics.responses_by_status, status=status).inc()
    _metric(metrics.responses_by_status_view_method, status=status, view=view, method="GET").inc()
    _metric(metrics.responses_by_charset, charset=str(response.charset)).inc()
    if isinstance(response, HttpResponse):
        metrics.responses_body_bytes.observe(len(response.content))
    elapsed = default_timer() - read.started
    _metric(metrics.requests_latency_by_view_method, view=view, method="GET").observe(elapsed)
    metrics.responses_total.inc()
    metrics.requests_latency_before.observe(elapsed)


async def _send(response: HttpResponseBase, send: Send) -> None:
    assert isinstance(response, HttpResponse)  # never streaming here
    response["X-Served-By"] = "warehouse-fastpath"
    headers = [(name.encode("ascii"), value.encode("latin-1")) for name, value in response.items()]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.content})


async def _respond(read: _Read, send: Send) -> None:
    started = False

    async def tracked(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        if read.plan.metrics:
            _count_request(read)
        response = _finish(read, _answer(read, *await _lookup(read)))
        if read.plan.metrics:
            _count_response(read, response)
        await _send(response, tracked)
    except Exception as exc:
        await _server_error(read, exc, tracked, started=started)


async def _server_error(read: _Read, exc: Exception, send: Send, *, started: bool) -> None:
    """The fast path's catch-all: log once with the correlation id, answer the JSON 500
    envelope (unless a response had already started, which the client then sees cut short)."""
    logger.exception("unhandled_exception", path=read.request.path, door="warehouse-fastpath")
    if started:
        return
    response: HttpResponseBase = HttpResponse(
        _SERVER_ERROR, status=500, content_type="application/json"
    )
    try:
        response = _finish(read, response)
        if read.plan.metrics and read.started:
            metrics = Metrics.get_instance()
            _metric(metrics.exceptions_by_type, type=type(exc).__name__).inc()
            _metric(metrics.exceptions_by_view, view=_URL_NAMES[read.kind]).inc()
            _count_response(read, response)
    except Exception:
        # The hooks themselves failed: still answer, with the id the client can quote.
        response["X-Request-ID"] = read.request_id
    # The client may be gone already; that failure was the one logged above.
    with contextlib.suppress(Exception):
        await _send(response, send)


def read_fastpath(app: ASGIApp) -> ASGIApp:
    """Wrap the Django HTTP application (see config/asgi.py).

    Requests it does not take go to Django untouched. For the reads it answers, any exception
    (cache, database, serialisation, a middleware hook) is this door's to handle: logged once
    with the correlation id (X-Request-ID when safe, else a new one, echoed) and answered with
    the JSON 500 envelope, as Django's JsonErrorMiddleware does for the rest of `/api/`."""

    async def application(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            read = _prepare(scope)
        except Exception:
            # Django answers what the fast path cannot take for certain, and logs it if it fails.
            if _log_now("prepare_failed"):
                logger.exception("warehouse_fastpath_prepare_failed", path=scope.get("path"))
            read = None
        if read is None:
            await app(scope, receive, send)
            return
        with structlog.contextvars.bound_contextvars(request_id=read.request_id):
            await _respond(read, send)

    return application
