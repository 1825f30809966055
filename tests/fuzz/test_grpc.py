"""Bounded fuzz of the gRPC door (`betting.v1.LineProvider`) over a real grpc.aio server.

Deterministic (`random.Random(10)`): valid requests of every method are mutated at the field
level (strings with NUL, controls, non-ASCII digits, signs, exponents, `_`, over-long and huge
values; unknown and edge enum numbers; int32/int64 edges; Timestamps outside their range or with
bad nanos; deleted fields) and at the wire level (lone surrogates and other invalid UTF-8 in
string fields, truncation, flipped and inserted bytes, wrong wire types, unknown fields, random
bytes), and sent as raw bytes with a staff token (as `Bearer` or `Token`), no token or a bad one.

Must hold: no UNKNOWN, no INTERNAL, no call left hanging; the server still serves valid calls
afterwards; nothing leaked (the change log stays gapless and audited, rows only for accepted
creations, no stray tasks on the server's loop).
"""

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from betting import selectors
from betting.grpc.generated import betting_pb2 as pb
from betting.grpc.generated import betting_pb2_grpc as pb_grpc
from betting.grpc.server import serve
from betting.models import AuditEntry, Event, EventChange
from tests.factories import StaffFactory, UserFactory, token_for

pytestmark = pytest.mark.timeout(120)

SEED = 10
CALLS = 2000
CALL_TIMEOUT = 5.0
REPORT = Path(__file__).resolve().parents[2] / "var" / "fuzz" / "grpc.json"
SERVICE = "/betting.v1.LineProvider/"
MAX_SECONDS = 253_402_300_799
MIN_SECONDS = -62_135_596_800

#: A broken door answers UNKNOWN (an exception escaped) or INTERNAL (the catch-all fired); a
#: call that outlives its deadline means the server hung on the input.
CRASHING = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}

STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x01",
    "\x1f",
    "\x7f",
    "\n",
    "a\tb",
    "\r\n",
    "\u0661\u0660",
    "\u06f1.\u06f5",
    "\uff11\uff10",
    "\u0967",
    "\u00b2",
    "1_0",
    "1e1",
    "1E-2",
    "-1",
    "+1",
    "-0",
    "1.555",
    "1.500",
    "1.",
    ".5",
    "1,50",
    "0x10",
    "NaN",
    "sNaN",
    "Infinity",
    "-Infinity",
    "0",
    "0.00",
    "0.01",
    "1.50",
    "1000.00",
    "1000.01",
    "9" * 40,
    "9" * 41,
    "99999999999999999999",
    "9223372036854775808",
    " 1.50",
    "1.50 ",
    "\u202eev",
    "\U0001f600",
    "e\u0301",
    "ev-1",
    "ev:1.x_y",
    "x" * 64,
    "x" * 65,
    "x" * 201,
    "x" * 70_000,
]
INT32 = [0, 1, -1, 2, 4, 5, 99, 100, 500, 501, 2**31 - 1, -(2**31)]
INT64 = [0, 1, -1, 2, 3, 1000, 2**31, 2**53 + 1, 2**63 - 1, -(2**63)]
TIMESTAMPS = [
    (MAX_SECONDS + 1, 0),
    (MAX_SECONDS, 999_999_999),
    (MIN_SECONDS - 1, 0),
    (MIN_SECONDS, 0),
    (2**63 - 1, 0),
    (-(2**63), 0),
    (0, 0),
    (0, 1),
    (4_102_444_800, -1),
    (4_102_444_800, 1_000_000_000),
    (4_102_444_800, 2**31 - 1),
    (4_102_444_800, -(2**31)),
    (4_102_444_800, 0),
    (1_600_000_000, 0),
]
INVALID_UTF8 = [
    b"\xed\xa0\x80",  # lone high surrogate U+D800, as CESU/WTF-8
    b"\xed\xb0\x80",  # lone low surrogate U+DC00
    b"a\xed\xbf\xbfb",
    b"\xc3\x28",
    b"\xff",
    b"\xc0\xaf",  # overlong "/"
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xe2\x82",  # truncated sequence
]


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def record(number: int, wire_type: int, payload: bytes) -> bytes:
    key = varint((number << 3) | wire_type)
    if wire_type == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def future(hours: int = 1) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(hours=hours))
    return stamp


class Fuzzer:
    """Builds valid requests of each method and mutates them (all randomness from one seed)."""

    def __init__(self, rng: random.Random, event_ids: list[str]) -> None:
        self.rng = rng
        self.event_ids = event_ids
        self.created = 0

    def valid(self, method: str) -> Message:
        rng = self.rng
        known = rng.choice(self.event_ids)
        if method == "CreateEvent":
            self.created += 1
            return pb.CreateEventRequest(
                id=f"fz-{self.created}",
                name=f"Fuzz {self.created}",
                coefficient=f"{rng.randint(1, 50)}.{rng.randint(0, 99):02d}",
                deadline=future(rng.randint(1, 48)),
            )
        if method == "GetEvent":
            return pb.GetEventRequest(id=known)
        if method == "ListEvents":
            return pb.ListEventsRequest(
                state=rng.choice([0, 1, 2, 3, 4]),  # type: ignore[arg-type]
                open_only=rng.random() < 0.5,
                page_size=rng.choice([0, 1, 3, 500]),
                page_token=rng.choice(["", "1", "2"]),
            )
        if method == "UpdateOdds":
            return pb.UpdateOddsRequest(id=known, coefficient=f"1.{rng.randint(10, 99)}")
        if method == "FinishEvent":
            return pb.FinishEventRequest(id=known, outcome=rng.choice([1, 2]))  # type: ignore[arg-type]
        if method == "CancelEvent":
            return pb.CancelEventRequest(id=known)
        request = pb.WatchEventsRequest()
        if rng.random() < 0.7:
            request.from_sequence = rng.randint(0, 3)
        return request

    def mutate_fields(self, message: Message) -> Message:
        """Replace or delete one to three fields (Timestamp fields are set to edge values)."""
        rng = self.rng
        fields: list[Any] = list(message.DESCRIPTOR.fields)
        for field in rng.sample(fields, k=min(len(fields), rng.randint(1, 3))):
            name = field.name
            if rng.random() < 0.15:
                message.ClearField(name)
            elif field.message_type is not None:
                seconds, nanos = rng.choice(TIMESTAMPS)
                getattr(message, name).CopyFrom(Timestamp(seconds=seconds, nanos=nanos))
            elif field.enum_type is not None or field.type == FieldDescriptor.TYPE_INT32:
                setattr(message, name, rng.choice(INT32))
            elif field.type == FieldDescriptor.TYPE_INT64:
                setattr(message, name, rng.choice(INT64))
            elif field.type == FieldDescriptor.TYPE_BOOL:
                setattr(message, name, rng.random() < 0.5)
            else:
                setattr(message, name, self.text())
        return message

    def text(self) -> str:
        rng = self.rng
        if rng.random() < 0.75:
            return rng.choice(STRINGS)
        # Random valid code points (no surrogates: those go in as raw bytes).
        points = [rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF)]) for _ in range(8)]
        return "".join(map(chr, points))

    def mutate_wire(self, message: Message) -> bytes:
        rng = self.rng
        raw = message.SerializeToString()
        strings = [
            field.number
            for field in message.DESCRIPTOR.fields
            if field.type == FieldDescriptor.TYPE_STRING
        ]
        kind = rng.randrange(8)
        if kind == 0 and strings:  # invalid UTF-8 in a string field (last record wins)
            return raw + record(rng.choice(strings), 2, rng.choice(INVALID_UTF8))
        if kind == 1 and raw:
            return raw[: rng.randrange(len(raw))]
        if kind == 2 and raw:
            flipped = bytearray(raw)
            for _ in range(rng.randint(1, 3)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            return bytes(flipped)
        if kind == 3:
            at = rng.randint(0, len(raw))
            return raw[:at] + rng.randbytes(rng.randint(1, 8)) + raw[at:]
        if kind == 4:  # a known field with the wrong wire type, or an unknown field
            number = rng.choice([1, 2, 3, 4, 5, 15, 1000, 536_870_911])
            wire_type = rng.choice([0, 1, 2, 5])
            payload = {0: varint(rng.choice(INT64)), 1: b"\xff" * 8, 5: b"\xff" * 4}
            return raw + record(number, wire_type, payload.get(wire_type, rng.randbytes(4)))
        if kind == 5:  # a length prefix that runs past the end
            return raw + varint((rng.choice(strings or [1]) << 3) | 2) + varint(2**31)
        if kind == 6:  # a deadline whose inner varints are 10 bytes of 0xff
            return raw + record(4, 2, b"\x08" + b"\xff" * 9 + b"\x01" + b"\x10" + b"\xff" * 5)
        return rng.randbytes(rng.randint(0, 64))


@pytest.fixture
async def line_provider(transactional_db: None, settings: Any) -> AsyncIterator[str]:
    settings.BETTING_WATCH_HEARTBEAT_SECONDS = 0.05
    settings.BETTING_WATCH_POLL_SECONDS = 0.02
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(
        serve(stop, host="127.0.0.1", port=0, on_bound=lambda port: bound.set_result(port))
    )
    port = await asyncio.wait_for(bound, 20)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(server, 20)
        # The test's own sync_to_async calls ran on one shared thread; its connection would
        # keep the test database busy at teardown.
        await sync_to_async(connections.close_all)()


def metadata_for(rng: random.Random, staff: str, user: str) -> tuple[tuple[str, str], ...]:
    roll = rng.random()
    if roll < 0.8:
        scheme = rng.choice(["Bearer", "Token", "bearer"])
        auth: tuple[tuple[str, str], ...] = (("authorization", f"{scheme} {staff}"),)
    elif roll < 0.88:
        auth = (("authorization", f"Bearer {user}"),)
    elif roll < 0.94:
        bad = ["Bearer", "Bearer x", "Basic abc", "Bearer  ", "Token", f"Token{staff}"]
        auth = (("authorization", rng.choice(bad)),)
    else:
        auth = ()
    request_id = rng.choice(["", "fuzz-1", "x" * 129, "a b", "../etc", "id:\u00e9"])
    if request_id and request_id.isascii():
        return (*auth, ("x-request-id", request_id))
    return auth


async def call_once(
    channel: grpc.aio.Channel, method: str, raw: bytes, metadata: Any
) -> grpc.StatusCode:
    """Send `raw` to `method`; the status code of the answer (OK for a response or first item)."""
    try:
        if method == "WatchEvents":
            stream = channel.unary_stream(f"{SERVICE}{method}", None, None)(
                raw, metadata=metadata, timeout=CALL_TIMEOUT
            )
            try:
                await stream.read()
                return grpc.StatusCode.OK
            finally:
                stream.cancel()
        await channel.unary_unary(f"{SERVICE}{method}", None, None)(
            raw, metadata=metadata, timeout=CALL_TIMEOUT
        )
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        return error.code()


@sync_to_async
def tokens() -> tuple[str, str]:
    return token_for(StaffFactory.create()), token_for(UserFactory.create())


@sync_to_async
def ledger() -> dict[str, int]:
    return {
        "events": Event.objects.count(),
        "changes": EventChange.objects.count(),
        "latest": selectors.change_sequence_current(),
        "audited": AuditEntry.objects.filter(subject=AuditEntry.Subject.EVENT).count(),
    }


async def test_grpc_fuzz_never_gets_unknown_or_internal(line_provider: str) -> None:
    rng = random.Random(SEED)
    staff, user = await tokens()
    tallies: Counter[str] = Counter()
    failures: list[str] = []
    accepted_creations: set[str] = set()
    methods = [
        "CreateEvent",
        "GetEvent",
        "ListEvents",
        "UpdateOdds",
        "FinishEvent",
        "CancelEvent",
        "WatchEvents",
    ]
    async with grpc.aio.insecure_channel(line_provider) as channel:
        stub = pb_grpc.LineProviderStub(channel)
        auth = (("authorization", f"Bearer {staff}"),)
        event_ids = []
        for number in range(20):
            request = pb.CreateEventRequest(
                id=f"seed-{number}", name=f"Seed {number}", coefficient="1.50", deadline=future()
            )
            event_ids.append((await stub.CreateEvent(request, metadata=auth)).id)
        fuzzer = Fuzzer(rng, event_ids)
        baseline_tasks = len(asyncio.all_tasks())
        started = time.monotonic()
        for number in range(CALLS):
            method = methods[number % len(methods)]
            message = fuzzer.valid(method)
            how = rng.random()
            if how < 0.1:
                raw, label = message.SerializeToString(), "valid"
            elif how < 0.6:
                raw, label = fuzzer.mutate_fields(message).SerializeToString(), "fields"
            else:
                raw, label = fuzzer.mutate_wire(message), "wire"
            metadata = metadata_for(rng, staff, user)
            code = await call_once(channel, method, raw, metadata)
            tallies["tried"] += 1
            tallies[f"{method}:{code.name}"] += 1
            if code in CRASHING:
                tallies["crashing"] += 1
                failures.append(f"{method} {label} {code.name}: {raw[:120]!r} {metadata}")
            elif code != grpc.StatusCode.OK:
                tallies["refused"] += 1
            elif method == "CreateEvent":
                decoded = pb.CreateEventRequest.FromString(raw)
                accepted_creations.add(decoded.id)
        elapsed = time.monotonic() - started

        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE.strip("/")))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        fresh = pb.CreateEventRequest(
            id="after", name="After", coefficient="2.00", deadline=future()
        )
        assert (await stub.CreateEvent(fresh, metadata=auth)).id == "after"
        assert (await stub.GetEvent(pb.GetEventRequest(id="after"))).coefficient == "2.00"
        listed = await stub.ListEvents(pb.ListEventsRequest(page_size=500))
        assert "after" in {event.id for event in listed.events}
        watch = stub.WatchEvents(pb.WatchEventsRequest())
        assert (await asyncio.wait_for(watch.read(), 5)).HasField("snapshot")
        watch.cancel()

    # Let cancelled streams and after-commit feed tasks finish on the server side: bounded in
    # time, not in polls (a loaded machine, e.g. CI running beside other jobs, needs longer).
    for _ in range(300):
        if len(asyncio.all_tasks()) <= baseline_tasks:
            break
        await asyncio.sleep(0.05)
    counts = await ledger()
    tallies["seconds"] = round(elapsed)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(dict(tallies), indent=2, sort_keys=True))
    print(
        f"gRPC fuzz: tried {tallies['tried']}, refused {tallies['refused']}, "
        f"crashing {tallies['crashing']} in {elapsed:.1f} s"
    )
    assert failures == []
    assert len(asyncio.all_tasks()) <= baseline_tasks
    assert counts["events"] == len(event_ids) + len(accepted_creations) + 1
    assert counts["changes"] == counts["latest"] == counts["audited"]
