"""Row locks for stock, always taken in ascending (warehouse_id, product_id) order."""

import uuid
from collections.abc import Iterable

from django.db import connection, models
from django.utils import timezone

from warehouse.models import Stock


def stock_lock(
    *, pairs: Iterable[tuple[uuid.UUID, uuid.UUID]]
) -> dict[tuple[uuid.UUID, uuid.UUID], int]:
    """Lock the stock rows of `pairs` (creating zero rows for unseen pairs first, so a
    concurrent writer cannot slip in) and return their balances. Call inside a transaction."""
    ordered = sorted(set(pairs), key=lambda pair: (str(pair[0]), str(pair[1])))
    if not ordered:
        return {}
    now = timezone.now()
    Stock.objects.bulk_create(
        [Stock(warehouse_id=w, product_id=p, balance=0, updated_at=now) for w, p in ordered],
        ignore_conflicts=True,
    )
    query = models.Q()
    for warehouse_id, product_id in ordered:
        query |= models.Q(warehouse_id=warehouse_id, product_id=product_id)
    rows = Stock.objects.filter(query).order_by("warehouse_id", "product_id")
    if connection.features.has_select_for_update:
        rows = rows.select_for_update()
    return {(row.warehouse_id, row.product_id): row.balance for row in rows}
