"""Bounded fuzz of the warehouse doors: the movement queue and `POST /api/movements/ingest`.

Deterministic (`random.Random(10)`): valid envelopes (each its own movement) are mutated by
field deletion, type swaps, lone surrogates, NUL and C0 controls, non-ASCII digits, int64 and
datetime range edges, floats, deep nesting, truncation, invalid UTF-8 and random bytes; some
messages are published twice (real duplicates). Each mutation carries its expected verdict from
the spec (`shared/specs/warehouse.md`), so the pipeline is checked against an oracle, not
against itself.

Queue (real transport: RabbitMQ when CELERY_BROKER_URL is set, the filesystem queue otherwise;
the consumer also loses its connection once between commit and ack, so one batch is
redelivered): every valid message is applied exactly once, every invalid one dead-lettered
exactly once as `malformed`, duplicates counted once each, stock == Σ ledger, and the consumer
still consumes afterwards. REST (real uvicorn): no 5xx, each item's outcome as expected.
"""

import copy
import json
import os
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db import close_old_connections
from django.test import override_settings
from prometheus_client import REGISTRY

from tests.factories import StaffFactory, auth_header
from warehouse import queue, selectors
from warehouse.models import DeadLetter, LedgerEntry

SEED = 10
QUEUE_MESSAGES = 500
REST_ITEMS = 300
MAX_DEPTH = 32
REPORT = Path(__file__).resolve().parents[2] / "var" / "fuzz" / "warehouse_queue.json"
FIGURES: Counter[str] = Counter()

_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
_EPOCH_MS_MIN = -62_135_596_800_000  # 0001-01-01T00:00:00Z
_EPOCH_MS_MAX = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
VALID_TIMESTAMPS = [
    "2025-02-18T12:12:56Z",
    "2025-02-18T12:12:56+03:00",
    "2025-02-18T12:12:56.123456789-05:30",
    "2025-02-18t12:12:56z",
    "0001-01-01T00:00:00Z",
    "0001-01-01T01:00:00+01:00",
    "9999-12-31T23:59:59Z",
]
INVALID_TIMESTAMPS = [
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "2025-02-18T12:12:56",
    "2025-02-30T12:12:56Z",
    "2025-13-01T00:00:00Z",
    "2025-02-18T24:00:00Z",
    "2025-02-18T12:12:60Z",
    "2025-02-18T12:12:56+24:00",
    "\uff12\uff10\uff12\uff15-02-18T12:12:56Z",
    "2025-02-18T12:12:56Z ",
    "yesterday",
]
JUNK: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    1.0,
    2**31,
    2**63,
    -(2**63) - 1,
    10**30,
    "",
    "x",
    "\u0661\u0660",
    "\ud800",
    "a\x00b",
    "a\x01b",
    [],
    {},
    ["x"],
]
TEXT_FIELDS = {"source": 100, "subject": 200}
UUID_FIELDS = ["id", "data.movement_id", "data.warehouse_id", "data.product_id"]
CONSTANTS = {
    "specversion": "1.0",
    "type": "ru.retail.warehouses.movement",
    "data.event": None,  # departure/arrival
}
OPTIONAL_CONSTANTS = {
    "datacontenttype": "application/json",
    "dataschema": "ru.retail.warehouses.movement.v1.0",
}
REQUIRED = [
    "id",
    "source",
    "specversion",
    "type",
    "time",
    "subject",
    "data",
    "data.movement_id",
    "data.warehouse_id",
    "data.timestamp",
    "data.event",
    "data.product_id",
    "data.quantity",
]


@dataclass
class Case:
    """One fuzz input: a document (or raw bytes when `raw` is set) and the spec's verdict."""

    document: Any
    valid: bool
    raw: bytes | None = None
    label: str = ""

    def body(self, rng: random.Random) -> bytes:
        if self.raw is not None:
            return self.raw
        ascii_only = rng.random() < 0.7
        try:
            return json.dumps(self.document, ensure_ascii=ascii_only).encode()
        except UnicodeEncodeError:  # a lone surrogate: only its JSON escape can be sent
            return json.dumps(self.document).encode()

    @property
    def document_level(self) -> bool:
        """Refused for the whole request by the REST door's JSON parser (not JSON, NUL, lone
        surrogates, nesting past 32 counting the request's array): a 400 as a whole."""
        if self.raw is not None:
            return True
        return _has_unstorable(self.document) or 1 + _depth(self.document) > MAX_DEPTH


def _has_unstorable(node: Any) -> bool:
    if isinstance(node, str):
        return "\x00" in node or any("\ud800" <= c <= "\udfff" for c in node)
    if isinstance(node, dict):
        return any(_has_unstorable(k) or _has_unstorable(v) for k, v in node.items())
    if isinstance(node, list):
        return any(_has_unstorable(item) for item in node)
    return False


def _depth(node: Any) -> int:
    if isinstance(node, dict):
        return 1 + max((_depth(v) for v in node.values()), default=0)
    if isinstance(node, list):
        return 1 + max((_depth(v) for v in node), default=0)
    return 0


def _clean_text(value: Any, limit: int) -> bool:
    """Unicode scalar values without C0 controls (`input-policy.md`), 1..limit long."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= limit
        and not any(c < " " for c in value)
        and not _has_unstorable(value)
    )


def _document_ok(document: Any) -> bool:
    """What holds for the whole body: no NUL or lone surrogate in any string or key, nested at
    most 32 deep, at most 64 KiB."""
    return (
        not _has_unstorable(document)
        and _depth(document) <= MAX_DEPTH
        and len(json.dumps(document).encode()) <= 64 * 1024
    )


def _verdict(path: str, value: Any) -> bool:
    """Whether the spec accepts `value` at `path` (the rest of the envelope being valid)."""
    if path == "destination":
        return True  # not validated (like any other CloudEvents attribute)
    if path in TEXT_FIELDS:
        return _clean_text(value, TEXT_FIELDS[path])
    if path in UUID_FIELDS:
        return isinstance(value, str) and bool(_CANONICAL_UUID.fullmatch(value))
    if path == "data.event":
        return type(value) is str and value in ("departure", "arrival")
    if path in CONSTANTS:
        return type(value) is str and value == CONSTANTS[path]
    if path in OPTIONAL_CONSTANTS:
        return type(value) is str and value == OPTIONAL_CONSTANTS[path]
    if path == "data.quantity":
        return type(value) is int and 1 <= value <= 2**31 - 1
    if path == "time":
        if type(value) is int:
            return _EPOCH_MS_MIN <= value <= _EPOCH_MS_MAX
        return value in VALID_TIMESTAMPS
    if path == "data.timestamp":
        return value in VALID_TIMESTAMPS
    return False  # `data` replaced by anything else


def _set(document: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    target = document
    for part in parents:
        target = target[part]
    if value is KeyError:
        target.pop(leaf, None)
    else:
        target[leaf] = value


class Generator:
    """Seeded envelopes and mutations with their expected verdicts."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def envelope(self) -> dict[str, Any]:
        event = self.rng.choice(["departure", "arrival"])
        source = f"WH-{self.rng.randint(1000, 9999)}"
        return {
            "id": self._uuid(),
            "source": source,
            "specversion": "1.0",
            "type": "ru.retail.warehouses.movement",
            "datacontenttype": "application/json",
            "dataschema": "ru.retail.warehouses.movement.v1.0",
            "time": 1737439421623 + self.rng.randint(0, 10**9),
            "subject": f"{source}:{event.upper()}",
            "destination": "ru.retail.warehouses",
            "data": {
                "movement_id": self._uuid(),
                # Few warehouses and products, so stock rows are shared and sums are checked.
                "warehouse_id": f"00000000-0000-4000-8000-00000000000{self.rng.randint(1, 4)}",
                "timestamp": self.rng.choice(VALID_TIMESTAMPS[:4]),
                "event": event,
                "product_id": f"00000000-0000-4000-8000-0000000000a{self.rng.randint(1, 3)}",
                "quantity": self.rng.randint(1, 1000),
            },
        }

    def _value_for(self, path: str) -> Any:
        rng = self.rng
        pools: list[list[Any]] = [JUNK]
        if path in ("time", "data.timestamp"):
            pools.append(VALID_TIMESTAMPS + INVALID_TIMESTAMPS)
        if path == "time":
            pools.append(
                [
                    _EPOCH_MS_MIN,
                    _EPOCH_MS_MIN - 1,
                    _EPOCH_MS_MAX,
                    _EPOCH_MS_MAX + 1,
                    "1737439421623",
                    1737439421623.0,
                ]
            )
        if path == "data.quantity":
            pools.append([1, 2**31 - 1, "100", "\uff11", 0, -5, 1e3])
        if path in UUID_FIELDS:
            good = self._uuid()
            pools.append(
                [
                    good,
                    good.upper(),
                    good.replace("-", ""),
                    "{" + good + "}",
                    f"urn:uuid:{good}",
                    f" {good}",
                    good[:-1] + "\u0661",
                    good[:-1] + "\x00",
                    good[:-1],
                ]
            )
        if path in TEXT_FIELDS:
            limit = TEXT_FIELDS[path]
            pools.append(
                [
                    "W" * limit,
                    "W" * (limit + 1),
                    "WH-\u00e9\u4e2d",
                    "WH-\t1",
                    "WH-\n1",
                    "WH-\x1f",
                    "WH-\x7f",
                    "\U0001f4e6",
                    " ",
                ]
            )
        if path in ("data.event", "specversion", "type") or path in OPTIONAL_CONSTANTS:
            pools.append(
                [
                    "departure",
                    "arrival",
                    "Departure",
                    "arrival ",
                    "1.0",
                    1,
                    "1.00",
                    "ru.retail.warehouses.movement",
                    *OPTIONAL_CONSTANTS.values(),
                ]
            )
        if path == "destination":
            pools.append(["elsewhere", "\x01", 7, None])
        pool = rng.choice(pools)
        value = copy.deepcopy(rng.choice(pool))
        if rng.random() < 0.03:
            value = _nested(rng.randint(20, 60))
        return value

    def case(self) -> Case:
        rng = self.rng
        document = self.envelope()
        roll = rng.random()
        if roll < 0.25:
            return Case(document, True, label="valid")
        if roll < 0.33:
            raw = json.dumps(document).encode()
            return Case(document, False, raw=raw[: rng.randrange(len(raw))], label="truncated")
        if roll < 0.37:
            raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 120)))
            return Case(document, False, raw=raw, label="random bytes")
        if roll < 0.40:
            raw = json.dumps(document).encode()
            cut = raw.index(b'"WH-') + 1
            garbage = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])
            return Case(document, False, raw=raw[:cut] + garbage + raw[cut:], label="bad utf-8")
        if roll < 0.42:
            raw = json.dumps(document).replace('"quantity": ', '"quantity": NaN, "q": ').encode()
            return Case(document, False, raw=raw, label="NaN")
        if roll < 0.44:
            document["x-padding"] = "p" * rng.choice([1_000, 70_000])
            return Case(document, _document_ok(document), label="padding")
        if roll < 0.47:
            key = rng.choice(["x-trace\ud800", "x-\x00", "x-ok", "x-\x01"])
            document[key] = "v"
            return Case(document, _document_ok(document), label="extension key")
        paths = rng.sample(
            [*REQUIRED, *OPTIONAL_CONSTANTS, "destination"], rng.choice([1, 1, 1, 2, 3])
        )
        if "data" in paths:  # replacing `data` decides alone for everything beneath it
            paths = [path for path in paths if not path.startswith("data.")]
        valid = True
        labels = []
        for path in paths:
            if rng.random() < 0.15:
                _set(document, path, KeyError)
                valid = valid and (path in OPTIONAL_CONSTANTS or path == "destination")
                labels.append(f"-{path}")
            else:
                value = self._value_for(path)
                _set(document, path, value)
                valid = valid and _verdict(path, value)
                labels.append(f"{path}={value!r}"[:40])
        return Case(document, valid and _document_ok(document), label=", ".join(labels))


def _nested(depth: int) -> Any:
    value: Any = "deep"
    for level in range(depth):
        value = [value] if level % 2 else {"n": value}
    return value


def _key(case: Case) -> tuple[str, str]:
    """The idempotency key of a valid case, its UUID normalised as the ledger stores it."""
    data = case.document["data"]
    return str(uuid.UUID(data["movement_id"])), data["event"]


def _wait_for(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _count(model: Any, **filters: Any) -> int:
    close_old_connections()
    return int(model.objects.filter(**filters).count())


def _duplicates() -> int:
    close_old_connections()
    return sum(LedgerEntry.objects.values_list("duplicates", flat=True))


def _redelivered() -> float:
    return REGISTRY.get_sample_value("warehouse_messages_total", {"result": "redelivered"}) or 0.0


class _AckLostOnce(queue.MovementConsumer):
    """Loses its connection between the commit and the ack of its first batch, as a consumer
    killed there would: the batch is redelivered and must change nothing."""

    lost = 0

    def _ack(self, batch: list[Any]) -> None:
        if not self.lost:
            self.lost = len(batch)
            raise ConnectionResetError("connection lost between commit and ack")
        super()._ack(batch)


@pytest.fixture
def transport(tmp_path: Path) -> Iterator[str]:
    name = f"warehouse.fuzz.{uuid.uuid4().hex[:12]}"
    url = os.environ.get("CELERY_BROKER_URL") or "filesystem://"
    with override_settings(
        WAREHOUSE_BROKER_URL=url, WAREHOUSE_QUEUE=name, WAREHOUSE_QUEUE_DIR=str(tmp_path / "q")
    ):
        yield url
    if url.startswith("amqp"):
        with queue.connection_open(url) as conn:
            queue.movement_queue(name)(conn.channel()).delete()


def _write_report() -> None:
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(dict(sorted(FIGURES.items())), indent=2))
    print(f"warehouse fuzz: {dict(sorted(FIGURES.items()))}")


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_queue_fuzz_applies_valid_messages_once_and_dead_letters_the_rest_once(
    transport: str,
) -> None:
    generator = Generator(SEED)
    cases = [generator.case() for _ in range(QUEUE_MESSAGES)]
    messages: list[tuple[bytes, Case]] = [(case.body(generator.rng), case) for case in cases]
    # Real duplicates: some messages published again (a new message each time).
    messages += [generator.rng.choice(messages) for _ in range(QUEUE_MESSAGES // 10)]
    generator.rng.shuffle(messages)
    valid_keys = {_key(case) for _, case in messages if case.valid}
    valid_sent = sum(1 for _, case in messages if case.valid)
    invalid_sent = len(messages) - valid_sent

    queue.envelopes_publish([raw for raw, _ in messages])
    redelivered_before = _redelivered()
    consumer = _AckLostOnce(batch_size=100, linger_ms=100)
    halt = threading.Event()
    thread = threading.Thread(target=consumer.run_blocking, args=(halt,), daemon=True)
    thread.start()
    try:
        _wait_for(
            lambda: _count(LedgerEntry) + _duplicates() + _count(DeadLetter) >= len(messages), 90
        )
        assert consumer.lost > 0, "one batch was redelivered"
        _wait_for(lambda: _redelivered() - redelivered_before >= consumer.lost, 30)
        # Still consuming: one more valid message is applied.
        extra = generator.envelope()
        queue.envelopes_publish([json.dumps(extra).encode()])
        _wait_for(lambda: _count(LedgerEntry, movement_id=extra["data"]["movement_id"]) == 1, 30)
        consuming = thread.is_alive()
    finally:
        halt.set()
        thread.join(timeout=20)
    stored = {
        (str(movement_id), event)
        for movement_id, event in LedgerEntry.objects.values_list("movement_id", "event")
    }
    reasons = Counter(DeadLetter.objects.values_list("reason", flat=True))
    FIGURES.update(
        {
            "queue_tried": len(messages),
            "queue_refused": sum(reasons.values()),
            "queue_crashing": reasons["error"] + (0 if consuming else 1),
            "queue_redelivered": int(_redelivered() - redelivered_before),
        }
    )
    _write_report()
    assert consuming
    assert stored - {(extra["data"]["movement_id"], extra["data"]["event"])} == valid_keys
    assert _duplicates() == valid_sent - len(valid_keys)
    assert reasons == Counter({"malformed": invalid_sent})
    assert _redelivered() - redelivered_before == consumer.lost
    assert selectors.stock_mismatches() == []


@pytest.mark.timeout(120)
def test_ingest_endpoint_fuzz_never_answers_a_server_error(http: httpx.Client) -> None:
    generator = Generator(SEED + 1)
    headers = auth_header(StaffFactory.create())
    cases = [generator.case() for _ in range(REST_ITEMS)]
    failures: list[str] = []
    tally: Counter[str] = Counter()

    def post(content: bytes) -> httpx.Response:
        tally["requests"] += 1
        response = http.post(
            "/api/movements/ingest",
            content=content,
            headers={**headers, "Content-Type": "application/json"},
        )
        if response.status_code >= 500:
            tally["crashing"] += 1
            failures.append(f"{response.status_code}: {content[:200]!r}")
        return response

    whole = [case for case in cases if case.document_level]
    items = [case for case in cases if not case.document_level]
    items += [generator.rng.choice(items) for _ in range(REST_ITEMS // 10)]  # duplicates
    generator.rng.shuffle(items)
    junk = [b"", b"[", b"{}", b"[]", b"null", b"\xff", b"[" * 50, b'"' + b"a" * 10]
    # A whole request refused (400): bodies that are not JSON, NUL/surrogates, too deep.
    for content in [
        *(
            case.raw if case.raw is not None else b"[" + case.body(generator.rng) + b"]"
            for case in whole
        ),
        *junk,
    ]:
        tally["tried"] += 1
        response = post(content)
        if response.status_code == 400 and "error" in response.json():
            tally["refused"] += 1
        else:
            failures.append(f"{content[:80]!r}: {response.status_code} instead of 400")
    # Items of an array: each answered with its own outcome.
    seen: set[tuple[str, str]] = set()
    for start in range(0, len(items), 25):
        chunk = items[start : start + 25]
        tally["tried"] += len(chunk)
        response = post(json.dumps([case.document for case in chunk]).encode())
        if response.status_code != 200:
            failures.append(f"batch at {start}: {response.status_code} {response.text[:200]}")
            continue
        outcomes = response.json()["outcomes"]
        for case, outcome in zip(chunk, outcomes, strict=True):
            if not case.valid:
                expected = "malformed"
                tally["refused"] += outcome == expected
            else:
                key = _key(case)
                expected = "duplicate" if key in seen else "stored"
                seen.add(key)
            if outcome != expected:
                failures.append(f"{case.label}: {outcome} instead of {expected}")
    assert http.get("/health").status_code == 200
    FIGURES.update({f"rest_{name}": count for name, count in tally.items()})
    FIGURES["rest_crashing"] += 0
    _write_report()
    assert failures == []
    assert _count(LedgerEntry) == len(seen)
    assert selectors.stock_mismatches() == []
