from django.urls import URLPattern, URLResolver, path

from betting import api

urlpatterns: list[URLPattern | URLResolver] = [
    path("events", api.EventCollectionApi.as_view(), name="betting-events"),
    path(
        "events/<ident:event_id>/odds", api.EventOddsUpdateApi.as_view(), name="betting-event-odds"
    ),
    path(
        "events/<ident:event_id>/finish", api.EventFinishApi.as_view(), name="betting-event-finish"
    ),
    path(
        "events/<ident:event_id>/cancel", api.EventCancelApi.as_view(), name="betting-event-cancel"
    ),
    path("bet", api.BetPlaceApi.as_view(), name="betting-bet-place"),
    path("bets", api.BetCollectionApi.as_view(), name="betting-bets"),
    path("bets/<id:bet_id>", api.BetDetailApi.as_view(), name="betting-bet-detail"),
]
