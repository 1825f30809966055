"""The assignment's example pair and helpers to build envelopes and run the real processes."""

import copy
import json
import os
import uuid
from typing import Any

from django.db import connection

from warehouse.schemas import envelope_build
from warehouse.simulator import EPOCH

DEPARTURE: dict[str, Any] = {
    "id": "b3b53031-e83a-4654-87f5-b6b6fb09fd99",
    "source": "WH-3322",
    "specversion": "1.0",
    "type": "ru.retail.warehouses.movement",
    "datacontenttype": "application/json",
    "dataschema": "ru.retail.warehouses.movement.v1.0",
    "time": 1737439421623,
    "subject": "WH-3322:DEPARTURE",
    "destination": "ru.retail.warehouses",
    "data": {
        "movement_id": "c6290746-790e-43fa-8270-014dc90e02e0",
        "warehouse_id": "25718666-6af6-4281-b5a6-3016e36fa557",
        "timestamp": "2025-02-18T12:12:56Z",
        "event": "departure",
        "product_id": "4705204f-498f-4f96-b4ba-df17fb56bf55",
        "quantity": 100,
    },
}
ARRIVAL: dict[str, Any] = {
    **copy.deepcopy(DEPARTURE),
    "source": "WH-3423",
    "subject": "WH-3423:ARRIVAL",
    "data": {
        **DEPARTURE["data"],
        "warehouse_id": "c1d70455-7e14-11e9-812a-70106f431230",
        "timestamp": "2025-02-18T14:34:56Z",
        "event": "arrival",
    },
}


def example_pair() -> tuple[dict[str, Any], dict[str, Any]]:
    return copy.deepcopy(DEPARTURE), copy.deepcopy(ARRIVAL)


def body(envelope: dict[str, Any]) -> bytes:
    return json.dumps(envelope).encode()


def envelope(
    *,
    event: str = "arrival",
    quantity: int = 10,
    warehouse_id: uuid.UUID | None = None,
    product_id: uuid.UUID | None = None,
    movement_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    return envelope_build(
        envelope_id=uuid.uuid4(),
        source="WH-0001",
        event=event,
        movement_id=movement_id or uuid.uuid4(),
        warehouse_id=warehouse_id or uuid.uuid4(),
        product_id=product_id or uuid.uuid4(),
        quantity=quantity,
        timestamp=EPOCH,
        sent_millis=int(EPOCH.timestamp() * 1000),
    )


def test_database_url() -> str:
    """DATABASE_URL of the test database, for subprocesses (manage.py commands)."""
    settings_dict = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings_dict['NAME']}"
    user = settings_dict.get("USER") or "postgres"
    password = f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else ""
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{settings_dict['NAME']}"


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"}
    env["DATABASE_URL"] = test_database_url()
    env.update(extra)
    return env
