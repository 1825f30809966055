import json
import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.http import HttpResponse, HttpResponseBase
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny, BasePermission, IsAdminUser, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import BaseThrottle
from rest_framework.views import APIView

from common import fields, parsers
from common.exceptions import NotFound, ValidationFailed
from common.fields import TimestampField
from common.network import client_ip, client_key
from common.pagination import LimitOffsetPagination
from warehouse import read_cache, read_limits, selectors, services
from warehouse.models import DeadLetter

MAX_INGEST_ITEMS = 5000


class PublicReadPermission(BasePermission):
    """The assignment's two reads are public unless WAREHOUSE_PUBLIC_READS=false."""

    def has_permission(self, request: Request, view: Any) -> bool:
        if settings.WAREHOUSE_PUBLIC_READS:
            return AllowAny().has_permission(request, view)
        return IsAuthenticated().has_permission(request, view)


class PublicReadThrottle(BaseThrottle):
    """WAREHOUSE_READ_THROTTLE per client (`read_limits`): anonymous callers by client IP, users
    by id. On a `PublicReadApi` it also fetches the view's cache entry in the same round trip
    (`read_limits.hit_and_get`) and leaves it on the view."""

    wait_seconds: float | None = None

    def allow_request(self, request: Request, view: Any) -> bool:
        if request.user.is_authenticated:
            ident = read_limits.user_ident(request.user.pk)
        else:
            ident = client_key(client_ip(request._request))
        key = view.cache_key() if isinstance(view, PublicReadApi) else None
        if key is None:
            self.wait_seconds = read_limits.hit(ident)
        else:
            self.wait_seconds, view.cached = read_limits.hit_and_get(ident, key)
        return self.wait_seconds is None

    def wait(self) -> float | None:
        return self.wait_seconds


def _uuid(value: str, name: str) -> uuid.UUID:
    """A path segment as a UUID (canonical ASCII form); 400 `bad_uuid` naming it otherwise."""
    try:
        return parsers.uuid_value(value, field=name)
    except parsers.InvalidValue as exc:
        raise ValidationFailed(exc.message, code="bad_uuid", details=exc.details) from None


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return parsers.uuid_value(value, field="id")
    except parsers.InvalidValue:
        return None


class PartySerializer(serializers.Serializer):
    warehouse_id = serializers.UUIDField()
    source = serializers.CharField()  # type: ignore[assignment]


class PublicReadApi(APIView):
    """One of the assignment's two cached reads: public unless WAREHOUSE_PUBLIC_READS=false,
    throttled per client. A cached answer is the stored JSON body as is (`read_cache.body_of`),
    fetched by the throttle in its round trip (`cached`)."""

    permission_classes = [PublicReadPermission]
    throttle_classes = [PublicReadThrottle]
    cached: object = read_cache.NOT_FETCHED

    def cache_key(self) -> str | None:
        """The read's cache key from the path, or None when an id is malformed."""
        raise NotImplementedError

    def answer(self, request: Request, body: bytes | None, missing: str) -> HttpResponseBase:
        if body is None:
            raise NotFound(missing)
        if ";" in (request.accepted_media_type or ""):  # e.g. `indent=4`: let DRF render it
            return Response(json.loads(body))
        return HttpResponse(body, content_type="application/json")


class MovementDetailApi(PublicReadApi):
    """A movement by its `movement_id`: sender and receiver (warehouse and source), when it left
    and arrived, the seconds between, quantities sent and received and their difference, and a
    status (`in_transit`, `arrived`, `completed`, `anomaly`). Public unless
    WAREHOUSE_PUBLIC_READS=false; throttled per client."""

    class OutputSerializer(serializers.Serializer):
        movement_id = serializers.UUIDField()
        product_id = serializers.UUIDField()
        status = serializers.ChoiceField(["in_transit", "arrived", "completed", "anomaly"])
        sender = PartySerializer(allow_null=True)
        receiver = PartySerializer(allow_null=True)
        departed_at = serializers.DateTimeField(allow_null=True)
        arrived_at = serializers.DateTimeField(allow_null=True)
        elapsed_seconds = serializers.IntegerField(allow_null=True)
        quantity_sent = serializers.IntegerField(allow_null=True)
        quantity_received = serializers.IntegerField(allow_null=True)
        quantity_difference = serializers.IntegerField(allow_null=True)

    def cache_key(self) -> str | None:
        movement_id = _uuid_or_none(self.kwargs["movement_id"])
        return None if movement_id is None else read_cache.movement_cache_key(movement_id)

    @extend_schema(responses={200: OutputSerializer}, summary="A movement: both ends, timing")
    def get(self, request: Request, movement_id: str) -> HttpResponseBase:
        body = selectors.movement_body_get(
            movement_id=_uuid(movement_id, "movement_id"), cached=self.cached
        )
        return self.answer(request, body, selectors.MOVEMENT_NOT_FOUND)


class StockDetailApi(PublicReadApi):
    """Current stock of a product at a warehouse: `quantity` (never negative), the signed ledger
    `balance` and `short` when more left than arrived. Equals Σ ledger at every commit. Public
    unless WAREHOUSE_PUBLIC_READS=false; throttled per client."""

    class OutputSerializer(serializers.Serializer):
        warehouse_id = serializers.UUIDField()
        product_id = serializers.UUIDField()
        quantity = serializers.IntegerField(help_text="max(balance, 0)")
        balance = serializers.IntegerField(help_text="Signed ledger balance")
        short = serializers.BooleanField(help_text="The balance went below zero")
        updated_at = serializers.DateTimeField()

    def cache_key(self) -> str | None:
        warehouse_id = _uuid_or_none(self.kwargs["warehouse_id"])
        product_id = _uuid_or_none(self.kwargs["product_id"])
        if warehouse_id is None or product_id is None:
            return None
        return read_cache.stock_cache_key(warehouse_id, product_id)

    @extend_schema(responses={200: OutputSerializer}, summary="Stock of a product at a warehouse")
    def get(self, request: Request, warehouse_id: str, product_id: str) -> HttpResponseBase:
        body = selectors.stock_body_get(
            warehouse_id=_uuid(warehouse_id, "warehouse_id"),
            product_id=_uuid(product_id, "product_id"),
            cached=self.cached,
        )
        return self.answer(request, body, selectors.STOCK_NOT_FOUND)


class StockListApi(APIView):
    """Stock of every product at a warehouse, limit/offset paginated."""

    class OutputSerializer(serializers.Serializer):
        warehouse_id = serializers.UUIDField()
        product_id = serializers.UUIDField()
        quantity = serializers.IntegerField()
        balance = serializers.IntegerField()
        short = serializers.BooleanField()
        updated_at = serializers.DateTimeField()

    @extend_schema(
        responses={200: OutputSerializer(many=True)},
        summary="Stock of every product at a warehouse",
    )
    def get(self, request: Request, warehouse_id: str) -> Response:
        rows = selectors.stock_list(warehouse_id=_uuid(warehouse_id, "warehouse_id"))
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(rows, request, view=self) or []
        return paginator.get_paginated_response([read_cache.stock_view_of(row) for row in page])


class MovementHistoryApi(APIView):
    """Ledger entries (one per departure or arrival), newest first, filtered by warehouse,
    product and an RFC 3339 time window; limit/offset paginated. `duplicates` counts redeliveries
    of the same message that changed nothing."""

    class FilterSerializer(serializers.Serializer):
        warehouse_id = fields.UUIDField(required=False)
        product_id = fields.UUIDField(required=False)
        since = TimestampField(required=False)
        until = TimestampField(required=False)

    class OutputSerializer(serializers.Serializer):
        movement_id = serializers.UUIDField()
        event = serializers.CharField()
        warehouse_id = serializers.UUIDField()
        product_id = serializers.UUIDField()
        quantity = serializers.IntegerField()
        delta = serializers.IntegerField()
        occurred_at = serializers.DateTimeField()
        source = serializers.CharField()  # type: ignore[assignment]
        recorded_at = serializers.DateTimeField()
        duplicates = serializers.IntegerField()

    @extend_schema(
        parameters=[FilterSerializer],
        responses={200: OutputSerializer(many=True)},
        summary="Movement event history, newest first",
    )
    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        rows = selectors.ledger_list(**filters.validated_data)
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(rows, request, view=self) or []
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)


class IngestProblemSerializer(serializers.Serializer):
    index = serializers.IntegerField(help_text="Position of the item in the request array")
    reason = serializers.CharField(help_text="Dead-letter reason: malformed, conflict...")
    field = serializers.CharField(allow_null=True, help_text="Dotted field at fault, if one is")
    detail = serializers.CharField()


class MovementIngestApi(APIView):
    """Staff: feed 1..N message envelopes (the queue's format, see README) through the same
    pipeline as the consumer. Each item gets an outcome (`stored`, `duplicate`, or a dead-letter
    reason such as `malformed` or `conflict`), and `problems` names the item, the field at fault
    and why. Idempotent per message: sending the same batch again stores nothing twice."""

    permission_classes = [IsAdminUser]

    class OutputSerializer(serializers.Serializer):
        stored = serializers.IntegerField()
        duplicates = serializers.IntegerField()
        dead_letters = serializers.IntegerField()
        outcomes = serializers.ListField(child=serializers.CharField())
        problems = IngestProblemSerializer(many=True)

    @extend_schema(
        request={"application/json": {"type": "array", "items": {"type": "object"}}},
        responses={200: OutputSerializer},
        summary="Ingest a JSON array of envelopes through the consumer's pipeline (staff)",
    )
    def post(self, request: Request) -> Response:
        items = request.data
        if not isinstance(items, list) or not 0 < len(items) <= MAX_INGEST_ITEMS:
            raise ValidationFailed(
                f"expected a JSON array of 1..{MAX_INGEST_ITEMS} envelopes", code="bad_body"
            )
        # Each item goes through the pipeline as its own JSON text, so it is judged exactly as
        # a queue message (size, depth, shape; anything but an object is `malformed`) and its
        # dead letter keeps what was sent. Fractions arrive exact (`parsers.JsonNumber`) and go
        # back out as the JSON numbers they were.
        bodies = [json.dumps(item, default=_json_number) for item in items]
        result = services.movements_ingest_isolated(bodies=bodies)
        return Response(
            self.OutputSerializer(
                {
                    "stored": result.stored,
                    "duplicates": result.duplicates,
                    "dead_letters": result.dead_letters,
                    "outcomes": result.outcomes,
                    "problems": result.problems,
                }
            ).data
        )


def _json_number(value: object) -> float:
    """A fraction the shared JSON parser decoded exactly, as the JSON number it was (JSON has
    one number type: the envelope's own validation judges it, as it judges a queue message's)."""
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class DeadLetterOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = DeadLetter
        fields = [
            "id",
            "received_at",
            "reason",
            "detail",
            "body",
            "movement_id",
            "event",
            "replayed_at",
            "replay_outcome",
        ]


class DeadLetterListApi(APIView):
    """Staff: messages the pipeline could not store, newest first, with their reason, the field
    at fault and the raw body as received; filter by `reason`."""

    permission_classes = [IsAdminUser]

    class FilterSerializer(serializers.Serializer):
        reason = serializers.ChoiceField(DeadLetter.Reason.choices, required=False)

    @extend_schema(
        parameters=[FilterSerializer],
        responses={200: DeadLetterOutputSerializer(many=True)},
        summary="Dead letters, newest first (staff)",
    )
    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        rows = selectors.dead_letter_list(reason=filters.validated_data.get("reason"))
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(rows, request, view=self) or []
        return paginator.get_paginated_response(DeadLetterOutputSerializer(page, many=True).data)


class DeadLetterReplayApi(APIView):
    """Staff: run a dead letter's raw body through the pipeline again (e.g. after its missing
    counterpart arrived or a bug was fixed). Never applies an event twice; a dead letter already
    replayed successfully is a 409."""

    permission_classes = [IsAdminUser]

    @extend_schema(
        request=None,
        responses={200: DeadLetterOutputSerializer},
        summary="Run a dead letter through the pipeline again (staff)",
    )
    def post(self, request: Request, dead_letter_id: int) -> Response:
        dead_letter = services.dead_letter_replay(dead_letter_id=dead_letter_id)
        return Response(DeadLetterOutputSerializer(dead_letter).data)
