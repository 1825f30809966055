from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from common.fields import IdentifierField, IntegerField, TextField
from realtime import protocol, selectors, services


class TicketCreateApi(APIView):
    """Issue a short-lived, single-use ticket for `GET /ws/?ticket=...`."""

    class OutputSerializer(serializers.Serializer):
        ticket = serializers.CharField()
        expires_in = serializers.IntegerField(help_text="seconds")
        url = serializers.CharField()

    @extend_schema(request=None, responses={201: OutputSerializer})
    def post(self, request: Request) -> Response:
        ticket, ttl = services.ticket_issue(user=request.user)  # type: ignore[arg-type]
        body = {"ticket": ticket, "expires_in": ttl, "url": f"/ws/?ticket={ticket}"}
        return Response(self.OutputSerializer(body).data, status=status.HTTP_201_CREATED)


class RoomOutputSerializer(serializers.Serializer):
    slug = serializers.CharField()
    title = serializers.CharField()
    kind = serializers.CharField()
    last_seq = serializers.IntegerField()
    created_at = serializers.DateTimeField()


class MessageOutputSerializer(serializers.Serializer):
    room = serializers.CharField()
    id = serializers.IntegerField()
    seq = serializers.IntegerField()
    user = serializers.CharField()
    user_id = serializers.IntegerField()
    text = serializers.CharField()
    ts = serializers.CharField()
    client_id = serializers.CharField(allow_null=True)
    display = serializers.CharField()
    deleted = serializers.BooleanField()


class RoomListApi(APIView):
    """Rooms visible to the caller (public, and private/direct ones they belong to); create."""

    class InputSerializer(serializers.Serializer):
        slug = IdentifierField(max_length=protocol.MAX_SLUG_LENGTH, pattern=protocol.SLUG_PATTERN)
        title = TextField(max_length=120, required=False, allow_blank=True, default="")
        kind = serializers.ChoiceField(choices=["public", "private"], default="public")

    @extend_schema(responses={200: RoomOutputSerializer(many=True)})
    def get(self, request: Request) -> Response:
        rooms = selectors.rooms_visible_to(request.user)
        return Response(RoomOutputSerializer(rooms, many=True).data)

    @extend_schema(request=InputSerializer, responses={201: RoomOutputSerializer})
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        room = services.room_create(user=request.user, **data.validated_data)  # type: ignore[arg-type]
        return Response(RoomOutputSerializer(room).data, status=status.HTTP_201_CREATED)


class RoomDetailApi(APIView):
    """A room visible to the caller with its members (id, username, role). The default room
    (REALTIME_DEFAULT_ROOM) exists for everyone; a private room you are not in is a 404."""

    class OutputSerializer(RoomOutputSerializer):
        members = serializers.ListField(child=serializers.DictField())

    @extend_schema(responses={200: OutputSerializer})
    def get(self, request: Request, slug: str) -> Response:
        room = services.room_resolve(user=request.user, slug=slug)
        members = [
            {"id": m.user_id, "username": m.user.username, "role": m.role}
            for m in selectors.room_members(room=room)
        ]
        body = {**RoomOutputSerializer(room).data, "members": members}
        return Response(self.OutputSerializer(body).data)


class MembershipAddApi(APIView):
    """Add a member to a private or public room (room owner or staff)."""

    class InputSerializer(serializers.Serializer):
        user_id = IntegerField(min_value=1)

    @extend_schema(request=InputSerializer, responses={201: None})
    def post(self, request: Request, slug: str) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        room = services.room_resolve(user=request.user, slug=slug)
        services.membership_add(
            actor=request.user,  # type: ignore[arg-type]
            room=room,
            user_id=data.validated_data["user_id"],
        )
        return Response(status=status.HTTP_201_CREATED)


class MembershipRemoveApi(APIView):
    """Remove a member (owner or staff, or yourself); their sockets leave the room."""

    @extend_schema(request=None, responses={204: None})
    def delete(self, request: Request, slug: str, user_id: int) -> Response:
        room = services.room_resolve(user=request.user, slug=slug)
        services.membership_remove(actor=request.user, room=room, user_id=user_id)  # type: ignore[arg-type]
        return Response(status=status.HTTP_204_NO_CONTENT)


class DirectRoomGetOrCreateApi(APIView):
    """The 1:1 conversation with another user (created on first call)."""

    class InputSerializer(serializers.Serializer):
        user_id = IntegerField(min_value=1)

    @extend_schema(request=InputSerializer, responses={200: RoomOutputSerializer})
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        room = services.direct_get_or_create(
            user=request.user,  # type: ignore[arg-type]
            other_user_id=data.validated_data["user_id"],
        )
        return Response(RoomOutputSerializer(room).data)


class MessageListApi(APIView):
    """Messages of a room in seq order (`after_seq`, `before_seq`, `limit`); post a message
    through the same service as the socket (`client_id` makes retries idempotent)."""

    class FilterSerializer(serializers.Serializer):
        after_seq = IntegerField(required=False)
        before_seq = IntegerField(required=False)
        limit = IntegerField(min_value=1, required=False)

    class InputSerializer(serializers.Serializer):
        # Tab and newlines allowed, kept as sent; the configured length cap is the service's
        # (`text_too_long`), 10,000 code points is this door's absolute bound.
        text = TextField(multiline=True, trim_whitespace=False)
        client_id = IdentifierField(max_length=protocol.MAX_CLIENT_ID_LENGTH, required=False)

    @extend_schema(
        parameters=[FilterSerializer], responses={200: MessageOutputSerializer(many=True)}
    )
    def get(self, request: Request, slug: str) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        room = services.room_resolve(user=request.user, slug=slug)
        limit = min(filters.validated_data.get("limit", 100), settings.REALTIME_HISTORY_LIMIT)
        messages = selectors.messages_page(
            room=room,
            after_seq=filters.validated_data.get("after_seq"),
            before_seq=filters.validated_data.get("before_seq"),
            limit=limit,
        )
        return Response(MessageOutputSerializer(messages, many=True).data)

    @extend_schema(
        request=InputSerializer,
        responses={201: MessageOutputSerializer, 200: MessageOutputSerializer},
    )
    def post(self, request: Request, slug: str) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        room = services.room_resolve(user=request.user, slug=slug)
        message, created = services.message_send(
            user=request.user,  # type: ignore[arg-type]
            room=room,
            text=data.validated_data["text"],
            client_id=data.validated_data.get("client_id"),
        )
        body = selectors.message_frame(message, room_slug=room.slug, username=request.user.username)
        code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(MessageOutputSerializer(body).data, status=code)


class RoomPresenceApi(APIView):
    """Users online in a room now (on any server process when Redis is configured); 503
    `presence_unavailable` while Redis cannot be reached."""

    class OutputSerializer(serializers.Serializer):
        room = serializers.CharField()
        online = serializers.ListField(child=serializers.DictField())

    @extend_schema(responses={200: OutputSerializer})
    def get(self, request: Request, slug: str) -> Response:
        room = services.room_resolve(user=request.user, slug=slug)
        online = selectors.room_online(room=room)
        return Response(self.OutputSerializer({"room": room.slug, "online": online}).data)
