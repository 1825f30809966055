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


#: Envelopes that can never be stored (issue 10 item 4 and its siblings), as
#: `(path, value, field at fault)` mutations of the assignment's departure. Those whose value
#: holds NUL or a lone surrogate are refused for the whole document by a JSON door's parser.
UNSTORABLE: list[tuple[str, Any, str]] = [
    ("data.timestamp", "0001-01-01T00:00:00+01:00", "data.timestamp"),
    ("data.timestamp", "9999-12-31T23:59:59-01:00", "data.timestamp"),
    ("data.timestamp", "2025-02-18T12:12:56", "data.timestamp"),
    ("data.timestamp", "\uff12\uff10\uff12\uff15-02-18T12:12:56Z", "data.timestamp"),
    ("time", "0001-01-01T00:00:00+01:00", "time"),
    ("time", 10**20, "time"),
    ("time", 1.7e12, "time"),
    ("data.quantity", 2**31, "data.quantity"),
    ("data.quantity", 2**63, "data.quantity"),
    ("data.quantity", 1.0, "data.quantity"),
    ("data.quantity", "\u0661\u0660", "data.quantity"),
    (
        "data.movement_id",
        "\u0664\u0667\u0660\u0665\u0662\u0660\u0664f-498f-4f96-b4ba-df17fb56bf55",
        "data.movement_id",
    ),
    ("data.product_id", " 4705204f498f4f96b4badf17fb56bf55", "data.product_id"),
    ("source", "W" * 101, "source"),
    ("subject", "WH-3322\x01", "subject"),
    ("data.event", "Departure", "data.event"),
    ("data", None, "data"),
    ("source", "WH-\ud800", "source"),
    ("data.warehouse_id", "25718666-6af6-4281-b5a6-3016e36fa55\x00", "data.warehouse_id"),
]


def unstorable_id(case: tuple[str, Any, str]) -> str:
    return f"{case[0]}={case[1]!r}"[:60]


def refused_by_json_parser(value: Any) -> bool:
    return isinstance(value, str) and any(c == "\x00" or "\ud800" <= c <= "\udfff" for c in value)


def mutated(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of `base` (the assignment's departure by default) with the dotted `path` set
    to `value`, or removed when `value` is `KeyError`."""
    result = copy.deepcopy(base if base is not None else DEPARTURE)
    target = result
    *parents, leaf = path.split(".")
    for part in parents:
        target = target[part]
    if value is KeyError:
        del target[leaf]
    else:
        target[leaf] = value
    return result


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
