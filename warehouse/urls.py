from django.urls import URLPattern, URLResolver, path

from warehouse import api

urlpatterns: list[URLPattern | URLResolver] = [
    path("movements", api.MovementHistoryApi.as_view(), name="warehouse-movement-history"),
    path("movements/ingest", api.MovementIngestApi.as_view(), name="warehouse-movement-ingest"),
    path(
        "movements/<str:movement_id>",
        api.MovementDetailApi.as_view(),
        name="warehouse-movement-detail",
    ),
    path(
        "warehouses/<str:warehouse_id>/products",
        api.StockListApi.as_view(),
        name="warehouse-stock-list",
    ),
    path(
        "warehouses/<str:warehouse_id>/products/<str:product_id>",
        api.StockDetailApi.as_view(),
        name="warehouse-stock-detail",
    ),
    path("dead-letters", api.DeadLetterListApi.as_view(), name="warehouse-dead-letters"),
    path(
        "dead-letters/<id:dead_letter_id>/replay",
        api.DeadLetterReplayApi.as_view(),
        name="warehouse-dead-letter-replay",
    ),
]
