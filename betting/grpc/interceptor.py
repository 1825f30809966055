"""The gRPC door's one catch-all (`input-policy.md`: "every door maps every failure, once").

`DoorInterceptor` wraps every method handler of the server (the line provider, health,
reflection; unary and streaming alike):

- the request deserializer never raises: bytes that are not a valid message (truncated, invalid
  UTF-8 such as a lone surrogate in a string field) become INVALID_ARGUMENT naming the field,
  where grpc would answer UNKNOWN with the exception text;
- a correlation id is settled per call (the caller's `x-request-id` metadata when it is a safe
  identifier, else a fresh one), bound in structlog's contextvars for every log line of the call
  (ORM work in worker threads included) and echoed in the trailing metadata of a failure;
- `ApplicationError` subclasses map to status codes here and nowhere else (`status_for`);
- any other exception is logged once with its traceback and answered INTERNAL with a generic
  message, never its text.
"""

import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
import structlog
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from prometheus_client import Histogram

from common import exceptions as app_errors
from common import parsers

logger = structlog.get_logger(__name__)

RPC_SECONDS = Histogram("betting_grpc_seconds", "Line provider RPC latency", ["method"])

INTERNAL_MESSAGE = "Internal server error. Quote the x-request-id when reporting it."
REQUEST_ID_KEY = "x-request-id"


class SequenceAhead(app_errors.ApplicationError):
    """A resume point the change log has not reached (another database, or a typo)."""

    code = "sequence_ahead"


GRPC_STATUS_BY_ERROR: dict[type[app_errors.ApplicationError], grpc.StatusCode] = {
    app_errors.ValidationFailed: grpc.StatusCode.INVALID_ARGUMENT,
    app_errors.NotAuthenticated: grpc.StatusCode.UNAUTHENTICATED,
    app_errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    app_errors.NotFound: grpc.StatusCode.NOT_FOUND,
    app_errors.Conflict: grpc.StatusCode.ALREADY_EXISTS,
    app_errors.PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    app_errors.Unprocessable: grpc.StatusCode.INVALID_ARGUMENT,
    app_errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    app_errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    app_errors.UpstreamTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    SequenceAhead: grpc.StatusCode.OUT_OF_RANGE,
}


def status_for(error: app_errors.ApplicationError) -> grpc.StatusCode:
    """The one mapping of domain errors to gRPC status codes (an unlisted subclass takes its
    nearest listed base; an unlisted hierarchy is INTERNAL)."""
    for error_class in type(error).__mro__:
        if error_class in GRPC_STATUS_BY_ERROR:
            return GRPC_STATUS_BY_ERROR[error_class]
    return grpc.StatusCode.INTERNAL


def request_id_of(metadata: Any) -> str:
    """The caller's `x-request-id` when it is a safe identifier (`[A-Za-z0-9._:-]{1,128}`),
    else a fresh one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            try:
                return parsers.identifier(value, field=REQUEST_ID_KEY, max_length=128)
            except parsers.InvalidValue:
                break
    return uuid.uuid4().hex


# --- requests that do not decode ------------------------------------------------------------


class Undecodable:
    """Stands in for a request message whose bytes did not decode; the handler wrapper refuses
    it before the servicer sees it."""

    __slots__ = ("error",)

    def __init__(self, error: parsers.InvalidValue) -> None:
        self.error = error


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(raw) or shift > 63:
            raise IndexError(at)
        byte = raw[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def undecodable_field(raw: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The dotted name of the first string field of `descriptor` (nested messages included)
    whose bytes are not valid UTF-8, or None (the bytes are broken some other way)."""
    at = 0
    try:
        while at < len(raw):
            key, at = _varint(raw, at)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, at = _varint(raw, at)
            elif wire_type == 1:
                at += 8
            elif wire_type == 5:
                at += 4
            elif wire_type == 2:
                length, at = _varint(raw, at)
                if at + length > len(raw):
                    return None
                chunk, at = raw[at : at + length], at + length
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                name = f"{prefix}{field.name}"
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return name
                elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type:
                    nested = undecodable_field(chunk, field.message_type, f"{name}.")
                    if nested is not None:
                        return nested
            else:
                return None
    except IndexError:
        return None
    return None


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """`deserialize`, but a failure yields an `Undecodable` instead of an exception (which grpc
    would answer UNKNOWN with its text)."""
    descriptor: Descriptor | None = getattr(
        getattr(deserialize, "__self__", None), "DESCRIPTOR", None
    )

    def locate(raw: bytes) -> str | None:
        return None if descriptor is None else undecodable_field(raw, descriptor)

    def safe(raw: bytes) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception:
            field = locate(raw)
            if field is not None:
                error = parsers.InvalidValue(field, "encoding", "is not valid UTF-8")
            else:
                error = parsers.InvalidValue("request", "format", "is not a valid message")
            return Undecodable(error)

    return safe


def _decoded(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise request.error
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


# --- the wrapper ----------------------------------------------------------------------------


class _Call:
    """One RPC: its correlation id, bound for the call's duration, and its failure answer."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        self.context = context
        self.request_id = request_id_of(context.invocation_metadata())
        self.trailer = ((REQUEST_ID_KEY, self.request_id),)
        structlog.contextvars.bind_contextvars(request_id=self.request_id, rpc=method)

    async def fail(self, error: Exception) -> NoReturn:
        """Answer `error` in gRPC's terms: a domain error by `status_for`, anything else
        INTERNAL with a generic message after logging it once with its traceback."""
        if isinstance(error, app_errors.ApplicationError):
            code = status_for(error)
            if code != grpc.StatusCode.INTERNAL:
                await self.context.abort(code, error.message, trailing_metadata=self.trailer)
        logger.error("grpc_unhandled_exception", exc_info=error)
        await self.context.abort(
            grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, trailing_metadata=self.trailer
        )

    @staticmethod
    def end() -> None:
        structlog.contextvars.unbind_contextvars("request_id", "rpc")


def _unary_response(behavior: Callable[..., Any], method: str, streaming_request: bool) -> Any:
    label = method.rsplit("/", 1)[-1]

    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = _Call(context, method)
        started = time.perf_counter()
        try:
            request = _decoded_stream(request) if streaming_request else _decoded(request)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await call.fail(error)
        finally:
            RPC_SECONDS.labels(label).observe(time.perf_counter() - started)
            call.end()

    return handle


def _stream_response(behavior: Callable[..., Any], method: str, streaming_request: bool) -> Any:
    if inspect.isasyncgenfunction(behavior):

        async def generate(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = _Call(context, method)
            try:
                request = _decoded_stream(request) if streaming_request else _decoded(request)
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await call.fail(error)
            finally:
                call.end()

        return generate

    async def write(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        call = _Call(context, method)
        try:
            request = _decoded_stream(request) if streaming_request else _decoded(request)
            result = behavior(request, context)
            if inspect.isawaitable(result):
                await result
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await call.fail(error)
        finally:
            call.end()

    return write


def guarded(handler: Any, method: str) -> Any:
    """`handler` (an `RpcMethodHandler`) with a never-raising deserializer and its behavior
    wrapped by the catch-all."""
    streaming_request = bool(handler.request_streaming)
    deserializer = _safe_deserializer(handler.request_deserializer)
    if handler.unary_unary is not None:
        return handler._replace(
            request_deserializer=deserializer,
            unary_unary=_unary_response(handler.unary_unary, method, False),
        )
    if handler.stream_unary is not None:
        return handler._replace(
            request_deserializer=deserializer,
            stream_unary=_unary_response(handler.stream_unary, method, True),
        )
    if handler.unary_stream is not None:
        return handler._replace(
            request_deserializer=deserializer,
            unary_stream=_stream_response(handler.unary_stream, method, False),
        )
    return handler._replace(
        request_deserializer=deserializer,
        stream_stream=_stream_response(handler.stream_stream, method, streaming_request),
    )


class DoorInterceptor(grpc.aio.ServerInterceptor):
    """Install with `grpc.aio.server(interceptors=[DoorInterceptor()])`; see the module doc.

    Wrapped handlers are cached per registered method name (a fixed set); unknown names are
    not cached, so random method names cannot grow the cache."""

    def __init__(self) -> None:
        self._handlers: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        wrapped = guarded(handler, method)
        self._handlers[method] = wrapped
        return wrapped
