"""REST interface of betting: thin views that validate, call one service/selector, serialize."""

from typing import Any

from django.conf import settings
from django.core.cache import cache
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAdminUser, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from betting import schemas, selectors, services
from betting.models import Bet, BetStatus, Event
from common.pagination import CursorPagination, LimitOffsetPagination


class DecimalStringField(serializers.CharField):
    """A decimal carried as a string; parsed by betting.schemas (strict: ≤ 2 places, > 0)."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, bool | float):
            raise serializers.ValidationError("must be a decimal string")
        return schemas.money_parse(
            super().to_internal_value(str(data)), field=self.field_name or "value"
        )

    def to_representation(self, value: Any) -> str:
        return schemas.money_format(value)


class EventOutputSerializer(serializers.ModelSerializer):
    coefficient = DecimalStringField()

    class Meta:
        model = Event
        fields = ["id", "name", "coefficient", "deadline", "state", "version", "sequence"]


class BetOutputSerializer(serializers.ModelSerializer):
    amount = DecimalStringField()
    coefficient = DecimalStringField()
    potential_payout = DecimalStringField()
    payout = DecimalStringField(allow_null=True)

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


def _user_id(request: Request) -> int:
    return int(request.user.pk or 0)


class EventListApi(APIView):
    """Events open for betting, briefly cached; any event change invalidates the cache."""

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
    def get(self, request: Request) -> Response:
        generation = cache.get(services.EVENTS_CACHE_GENERATION_KEY, 0)
        key = f"betting:events:{generation}:{request.query_params.urlencode()}"
        cached = cache.get(key)
        if cached is not None:
            return Response(cached)
        paginator = self.Pagination()
        page = paginator.paginate_queryset(selectors.events_open(), request, view=self)
        response = paginator.get_paginated_response(EventOutputSerializer(page, many=True).data)
        cache.set(key, response.data, settings.BETTING_EVENTS_CACHE_SECONDS)
        return response


class BetPlaceApi(APIView):
    class InputSerializer(serializers.Serializer):
        event_id = serializers.CharField(max_length=64)
        amount = DecimalStringField()
        expected_coefficient = DecimalStringField(required=False)
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
        placement = services.bet_place(
            user_id=_user_id(request),
            idempotency_key=request.headers.get("Idempotency-Key"),
            **serializer.validated_data,
        )
        headers = {"Idempotent-Replayed": "true"} if placement.replayed else {}
        return Response(
            BetOutputSerializer(placement.bet).data, status=placement.status_code, headers=headers
        )


class BetListApi(APIView):
    class Pagination(CursorPagination):
        ordering = "-id"
        page_size = 50

    class FilterSerializer(serializers.Serializer):
        status = serializers.ChoiceField(choices=BetStatus.choices, required=False)
        event_id = serializers.CharField(max_length=64, required=False)

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
        return paginator.get_paginated_response(BetOutputSerializer(page, many=True).data)


class BetDetailApi(APIView):
    @extend_schema(operation_id="betting_bet_get", responses=BetOutputSerializer)
    def get(self, request: Request, bet_id: int) -> Response:
        bet = selectors.bet_of_user(user_id=_user_id(request), bet_id=bet_id)
        return Response(BetOutputSerializer(bet).data)


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
    permission_classes = [IsAdminUser]

    class InputSerializer(serializers.Serializer):
        id = serializers.CharField(max_length=64)
        name = serializers.CharField(max_length=200)
        coefficient = DecimalStringField()
        deadline = serializers.DateTimeField()

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
    permission_classes = [IsAdminUser]

    class InputSerializer(serializers.Serializer):
        coefficient = DecimalStringField()

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
