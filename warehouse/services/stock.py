"""Stock maintenance: rebuilding every balance from the ledger."""

from django.db import connection, transaction
from django.db.models import Sum
from django.utils import timezone

from warehouse import read_cache
from warehouse.models import LedgerEntry, Stock


@transaction.atomic
def stock_rebuild() -> int:
    """Recompute every balance from the ledger (stock == Σ ledger deltas); returns the number
    of stock rows written.

    Deletes and rewrites the whole stock table in one transaction; on PostgreSQL the table is
    locked against writes first (SHARE ROW EXCLUSIVE: reads go on, concurrent ingest waits for
    the commit), so no batch commits between the sums and the rewrite. Every row's `version` is
    raised (kept monotonic, so the rewritten cache entries replace the ones cached before).
    Idempotent. After commit the stock cache entries are rewritten in chunks (and those of pairs
    that no longer exist invalidated); nothing else in the cache is touched. Raises nothing of
    its own."""
    now = timezone.now()
    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(Stock._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
    before = {
        (warehouse_id, product_id): version
        for warehouse_id, product_id, version in Stock.objects.values_list(
            "warehouse_id", "product_id", "version"
        )
    }
    Stock.objects.all().delete()
    rows = (
        LedgerEntry.objects.values("warehouse_id", "product_id")
        .annotate(total=Sum("delta"))
        .order_by()
    )
    stock = [
        Stock(
            warehouse_id=row["warehouse_id"],
            product_id=row["product_id"],
            balance=row["total"],
            updated_at=now,
            version=before.get((row["warehouse_id"], row["product_id"]), 0) + 1,
        )
        for row in rows
    ]
    Stock.objects.bulk_create(stock, batch_size=5000)
    views = {
        read_cache.stock_cache_key(row.warehouse_id, row.product_id): (
            row.version,
            read_cache.body_of(read_cache.stock_view_of(row)),
        )
        for row in stock
    }
    gone = {
        read_cache.stock_cache_key(warehouse_id, product_id) for warehouse_id, product_id in before
    } - views.keys()
    transaction.on_commit(lambda: read_cache.write_through_chunked(views, gone))
    return len(stock)
