from django.urls import path

from realtime import api

urlpatterns = [
    path("ticket", api.TicketCreateApi.as_view(), name="realtime-ticket"),
    path("rooms", api.RoomListApi.as_view(), name="realtime-rooms"),
    path("rooms/<slug:slug>", api.RoomDetailApi.as_view(), name="realtime-room"),
    path("rooms/<slug:slug>/members", api.MembershipAddApi.as_view(), name="realtime-members"),
    path(
        "rooms/<slug:slug>/members/<id:user_id>",
        api.MembershipRemoveApi.as_view(),
        name="realtime-member",
    ),
    path("rooms/<slug:slug>/messages", api.MessageListApi.as_view(), name="realtime-messages"),
    path("rooms/<slug:slug>/presence", api.RoomPresenceApi.as_view(), name="realtime-presence"),
    path("direct", api.DirectRoomGetOrCreateApi.as_view(), name="realtime-direct"),
]
