"""REST interface of betting: thin views that validate, call one service/selector, serialize.

Every value from the client goes through the shared parsers (`common.fields` in the input
serializers, `<ident:>`/`<id:>` in the paths, `betting.schemas` for headers), with the same
limits the gRPC door uses (`services.STAKE`, `services.COEFFICIENT`).
"""

import hashlib
import time
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAdminUser, IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from betting import schemas, selectors, services
from betting.models import Bet, BetStatus, Event
from common.fields import IdentifierField, MoneyField, TextField, TimestampField
from common.pagination import CursorPagination, LimitOffsetPagination


class EventOutputSerializer(serializers.ModelSerializer):
    """An event on the wire. The open-events list builds the same bytes with
    `schemas.event_json` (no serializer per row; tests/betting/test_budget.py holds them equal)."""

    coefficient = MoneyField(read_only=True)

    class Meta:
        model = Event
        fields = ["id", "name", "coefficient", "deadline", "state", "version", "sequence"]


class BetOutputSerializer(serializers.ModelSerializer):
    """A bet on the wire, for the OpenAPI schema: the views build the same bytes with
    `schemas.bet_json` (`_bet_body`; tests/betting/test_budget.py holds them equal)."""

    amount = MoneyField(read_only=True)
    coefficient = MoneyField(read_only=True)
    potential_payout = MoneyField(read_only=True)
    payout = MoneyField(read_only=True, allow_null=True)

    class Meta:
        model = Bet
        fields = [
            "id",
            "event_id",
            "amount",
            "coefficient",
            "potential_payout",
            "status",
            "payout",
            "created_at",
            "settled_at",
        ]

    def to_representation(self, instance: Bet) -> dict[str, Any]:
        data = super().to_representation(instance)
        if instance.payout is None:
            data["payout"] = None
        return data


def _bet_body(bet: Bet) -> dict[str, object]:
    """`BetOutputSerializer`'s output, built directly."""
    return schemas.bet_json(
        bet_id=bet.pk,
        event_id=bet.event_id,
        amount=bet.amount,
        coefficient=bet.coefficient,
        potential_payout=bet.potential_payout,
        status=bet.status,
        payout=bet.payout,
        created_at=bet.created_at,
        settled_at=bet.settled_at,
    )


def _user_id(request: Request) -> int:
    return int(request.user.pk or 0)


class _RenderedPages:
    """Per-process store of rendered open-event pages, so a hit costs one cache read (the
    generation) and no rendering. A key embeds the generation every event change bumps in the
    shared cache, so a change made through any process retires every page at once; a page also
    expires after BETTING_EVENTS_CACHE_SECONDS. Keys follow client query strings, so past
    `MAX_PAGES` the store starts over."""

    MAX_PAGES = 256

    def __init__(self) -> None:
        self._pages: dict[str, tuple[float, bytes]] = {}

    def get(self, key: str) -> bytes | None:
        page = self._pages.get(key)
        return page[1] if page is not None and time.monotonic() < page[0] else None

    def put(self, key: str, body: bytes, seconds: float) -> None:
        if len(self._pages) >= self.MAX_PAGES:
            self._pages.clear()
        self._pages[key] = (time.monotonic() + seconds, body)


_EVENT_PAGES = _RenderedPages()


class EventListApi(APIView):
    """Events open for betting, briefly cached (BETTING_EVENTS_CACHE_SECONDS; 0 turns the cache
    off); any event change invalidates the cache in every process.

    `limit`/`offset` are parsed before the cache is consulted, so a bad one is a 400 and never a
    cache entry; the key is a digest of the host and query (the page links echo both), so its
    length does not grow with what a client sends. Without a readable generation (first use,
    cache outage) the page is served fresh and not kept."""

    class Pagination(LimitOffsetPagination):
        default_limit = 50

    @extend_schema(
        operation_id="betting_events_list",
        responses=EventOutputSerializer(many=True),
        parameters=[
            OpenApiParameter("limit", int, required=False),
            OpenApiParameter("offset", int, required=False),
        ],
    )
    def get(self, request: Request) -> HttpResponse:
        paginator = self.Pagination()
        limit, offset = paginator.get_limit(request), paginator.get_offset(request)
        assert limit is not None  # default_limit is set
        seconds = settings.BETTING_EVENTS_CACHE_SECONDS
        generation = cache.get(services.EVENTS_CACHE_GENERATION_KEY) if seconds > 0 else None
        if generation is None:
            if seconds > 0:
                cache.add(services.EVENTS_CACHE_GENERATION_KEY, time.time_ns(), None)
            return self._page(paginator, request, limit=limit, offset=offset)
        query = f"{request.get_host()}?{request.META.get('QUERY_STRING', '')}"
        digest = hashlib.sha256(query.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        key = f"{generation}:{limit}:{offset}:{digest}"
        body = _EVENT_PAGES.get(key)
        if body is None:
            response = self._page(paginator, request, limit=limit, offset=offset)
            _EVENT_PAGES.put(key, response.content, seconds)
            return response
        return HttpResponse(body, content_type=JSONRenderer.media_type)

    @staticmethod
    def _page(
        paginator: LimitOffsetPagination, request: Request, *, limit: int, offset: int
    ) -> HttpResponse:
        """One query, rows formatted without a serializer per row, rendered here (as DRF's
        JSONRenderer would) so a cached copy is the same bytes. The paginator gets what its
        `paginate_queryset` would have set, so the links and the envelope are DRF's."""
        count, rows = selectors.events_open_page(limit=limit, offset=offset)
        paginator.request, paginator.limit, paginator.offset = request, limit, offset
        paginator.count = count
        data = paginator.get_paginated_response([schemas.event_json(*row) for row in rows]).data
        return HttpResponse(JSONRenderer().render(data), content_type=JSONRenderer.media_type)


class BetPlaceApi(APIView):
    """Place a bet on an open event before its deadline, at the event's current coefficient
    (frozen on the bet). `amount` is a decimal string or a JSON number read exactly, at most 2
    places, within the configured stake limits. `expected_coefficient` with `odds_change`
    (`none`: refuse when the odds moved; `higher`: accept better odds; `any`) guards against a
    price change between reading and betting. 201 with the bet; a replay with the same
    `Idempotency-Key` returns the same bet (200, `Idempotent-Replayed: true`). 409 when the
    event is finished, cancelled or past its deadline, or when the odds moved."""

    class InputSerializer(serializers.Serializer):
        event_id = IdentifierField(max_length=schemas.EVENT_ID_MAX_LENGTH)
        # The assignment's clients send JSON numbers: read exactly, same rules as the string.
        amount = MoneyField(
            min_value=services.STAKE.minimum, max_value=services.STAKE.maximum, numbers=True
        )
        expected_coefficient = MoneyField(
            min_value=services.COEFFICIENT.minimum,
            max_value=services.COEFFICIENT.maximum,
            required=False,
            numbers=True,
        )
        odds_change = serializers.ChoiceField(choices=services.ODDS_CHANGE_POLICIES, default="none")

    @extend_schema(
        operation_id="betting_bet_place",
        request=InputSerializer,
        responses={201: BetOutputSerializer},
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                str,
                OpenApiParameter.HEADER,
                required=False,
                description="replay → same bet; same key, other body → 422; in flight → 409",
            )
        ],
    )
    def post(self, request: Request) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key = request.headers.get("Idempotency-Key")
        placement = services.bet_place(
            user_id=_user_id(request),
            idempotency_key=None if key is None else schemas.idempotency_key(key),
            **serializer.validated_data,
        )
        headers = {"Idempotent-Replayed": "true"} if placement.replayed else {}
        return Response(_bet_body(placement.bet), status=placement.status_code, headers=headers)


class BetListApi(APIView):
    """The caller's bets, newest first, cursor-paginated; filter by `status` or `event_id`."""

    class Pagination(CursorPagination):
        ordering = "-id"
        page_size = 50

    class FilterSerializer(serializers.Serializer):
        status = serializers.ChoiceField(choices=BetStatus.choices, required=False)
        event_id = IdentifierField(max_length=schemas.EVENT_ID_MAX_LENGTH, required=False)

    @extend_schema(
        operation_id="betting_bets_list",
        parameters=[
            OpenApiParameter("status", str, enum=BetStatus.values, required=False),
            OpenApiParameter("event_id", str, required=False),
            OpenApiParameter("cursor", str, required=False),
            OpenApiParameter("limit", int, required=False),
        ],
        responses=BetOutputSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        bets = selectors.bets_of_user(user_id=_user_id(request), **filters.validated_data)
        paginator = self.Pagination()
        page = paginator.paginate_queryset(bets, request, view=self)
        return paginator.get_paginated_response([_bet_body(bet) for bet in page or []])


class BetDetailApi(APIView):
    """One of the caller's bets with its status and, once settled, its payout. Another user's
    bet is a 404, like one that does not exist."""

    @extend_schema(operation_id="betting_bet_get", responses=BetOutputSerializer)
    def get(self, request: Request, bet_id: int) -> Response:
        bet = selectors.bet_of_user(user_id=_user_id(request), bet_id=bet_id)
        return Response(_bet_body(bet))


class BetCollectionApi(BetListApi, BetPlaceApi):
    """`/bets`: GET lists the caller's bets, POST is an alias of `/bet`."""

    @extend_schema(
        operation_id="betting_bets_place",
        request=BetPlaceApi.InputSerializer,
        responses={201: BetOutputSerializer},
        parameters=[OpenApiParameter("Idempotency-Key", str, OpenApiParameter.HEADER)],
    )
    def post(self, request: Request) -> Response:
        return super().post(request)


class EventCreateApi(APIView):
    """Staff: create an event with its coefficient (decimal, 2 places) and a deadline in the
    future (RFC 3339 with an offset). Also published to the gRPC line provider's watchers."""

    permission_classes = [IsAdminUser]

    class InputSerializer(serializers.Serializer):
        id = IdentifierField(max_length=schemas.EVENT_ID_MAX_LENGTH)
        name = TextField(max_length=schemas.EVENT_NAME_MAX_LENGTH)
        coefficient = MoneyField(
            min_value=services.COEFFICIENT.minimum, max_value=services.COEFFICIENT.maximum
        )
        deadline = TimestampField(future=True)

    @extend_schema(
        operation_id="betting_event_create",
        request=InputSerializer,
        responses={201: EventOutputSerializer},
    )
    def post(self, request: Request) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        event = services.event_create(
            event_id=data["id"],
            name=data["name"],
            coefficient=data["coefficient"],
            deadline=data["deadline"],
            actor_id=_user_id(request),
            via="rest",
        )
        return Response(EventOutputSerializer(event).data, status=status.HTTP_201_CREATED)


class EventOddsUpdateApi(APIView):
    """Staff: change the coefficient of an open event. Bets already placed keep the coefficient
    they were placed at; 409 when the event is no longer open."""

    permission_classes = [IsAdminUser]

    class InputSerializer(serializers.Serializer):
        coefficient = MoneyField(
            min_value=services.COEFFICIENT.minimum, max_value=services.COEFFICIENT.maximum
        )

    @extend_schema(
        operation_id="betting_event_odds_update",
        request=InputSerializer,
        responses=EventOutputSerializer,
    )
    def post(self, request: Request, event_id: str) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        event = services.event_odds_update(
            event_id=event_id,
            coefficient=serializer.validated_data["coefficient"],
            actor_id=_user_id(request),
            via="rest",
        )
        return Response(EventOutputSerializer(event).data)


class EventFinishApi(APIView):
    """Staff: finish an event with its outcome; every pending bet on it is settled exactly once
    (won or lost) after commit. Finishing again with the same outcome is a no-op; a different
    outcome is a 409."""

    permission_classes = [IsAdminUser]

    class InputSerializer(serializers.Serializer):
        outcome = serializers.ChoiceField(choices=list(services.OUTCOME_STATES))

    @extend_schema(
        operation_id="betting_event_finish",
        request=InputSerializer,
        responses=EventOutputSerializer,
    )
    def post(self, request: Request, event_id: str) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        event = services.event_finish(
            event_id=event_id,
            outcome=serializer.validated_data["outcome"],
            actor_id=_user_id(request),
            via="rest",
        )
        return Response(EventOutputSerializer(event).data)


class EventCancelApi(APIView):
    """Staff: cancel an open event; its bets become void with the stake refunded, settled
    exactly once after commit. Cancelling again is a no-op; a finished event is a 409."""

    permission_classes = [IsAdminUser]

    @extend_schema(
        operation_id="betting_event_cancel", request=None, responses=EventOutputSerializer
    )
    def post(self, request: Request, event_id: str) -> Response:
        event = services.event_cancel(event_id=event_id, actor_id=_user_id(request), via="rest")
        return Response(EventOutputSerializer(event).data)


class EventCollectionApi(EventListApi, EventCreateApi):
    """`/events`: GET lists open events (any user), POST creates one (staff)."""

    def get_permissions(self) -> list[Any]:
        if self.request.method == "POST":
            return [IsAdminUser()]
        return [IsAuthenticated()]
