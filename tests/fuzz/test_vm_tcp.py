"""Bounded fuzz of the VM agents' TCP door over a real socket (issue 10, `input-policy.md`).

Deterministic (`random.Random(10)`): valid frames of every type, sent before and after
authorization, are mutated (fields deleted or given hostile values, lone surrogates, NUL and
controls spliced into strings, huge and negative integers, non-ASCII digits, deep nesting,
unknown types, truncated lines, random bytes, oversize lines). After each input a sentinel
`ping` shows the connection is still in step. The test fails on any `internal` error, on a
socket dropped without an error frame unless the protocol says close (`bye`,
`frame_too_large`, `unsupported_version`, `too_many_attempts` after the connection's failed
`auth`/`enroll` allowance), on a server that stops serving, and on anything leaked (open
sessions, VM status, connection gauges). The per-address lockout is set out of reach: this
test is about frames, the guessing limits have their own tests (tests/vmcontrol/test_abuse.py).
`FIGURES` holds the last run's counts.
"""

import asyncio
import collections
import contextlib
import copy
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from prometheus_client import REGISTRY

from tests.conftest import LiveServer
from tests.vmcontrol.conftest import VmServer, eventually
from tests.vmcontrol.factories import vm_with_token
from vmcontrol.models import AgentSession, VirtualMachine
from vmcontrol.protocol import ProtocolError, decode_frame
from vmcontrol.sessions import ServerConfig

pytestmark = pytest.mark.timeout(120)

SEED = 10
INPUTS_PER_STAGE = 2000
CLOSING_CODES = {"frame_too_large", "unsupported_version", "too_many_attempts"}
CODES: collections.Counter[str] = collections.Counter()
FIGURES = {"tried": 0, "refused": 0, "crashing": 0, "closed_by_protocol": 0}

INVENTORY = {
    "cpu_cores": 2,
    "ram_mb": 2048,
    "disks": [{"name": "root", "size_gb": 20}, {"name": "data", "size_gb": 100}],
}
HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    1e308,
    2**31,
    2**31 - 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    "",
    " ",
    "x" * 300,
    "\ud800",
    "\udc00",
    "a\udfffb",
    "\x00",
    "a\x00b",
    "\x07",
    "\x1b[2J",
    "line\nbreak",
    "\u0663",  # Arabic-Indic three
    "\uff11\uff10",  # fullwidth 10
    "\u00b2",  # superscript two
    "1_0",
    "+1",
    "1e3",
    "NaN",
    "-0",
    [],
    {},
    [1, "two", None],
    {"nested": {"deeper": [1]}},
]
SPLICES = ["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\x01", "\x1f", "\x7f", "\u0663"]
TYPES = ["hello", "enroll", "auth", "ping", "inventory", "result", "logout", "bye", "warp", ""]


def hostile(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(HOSTILE))


def nested(depth: int, rng: random.Random) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return value


def seeds(vm_id: int, token: str) -> list[dict[str, Any]]:
    return [
        {"type": "hello", "protocol": 1, "vm_id": vm_id, "inventory": INVENTORY},
        {"type": "enroll", "secret": "secret", "name": "fuzz", "inventory": INVENTORY},
        {"type": "auth", "vm_id": vm_id, "token": token, "inventory": INVENTORY},
        {"type": "ping"},
        {"type": "inventory", "inventory": INVENTORY},
        {"type": "result", "id": "c-1", "ok": True, "data": {"cpu_cores": 2}},
        {"type": "result", "id": "c-2", "ok": False, "error": {"code": "x", "message": "m"}},
        {"type": "logout"},
    ]


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, child in node.items():
            yield (*prefix, key)
            yield from paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield (*prefix, index)
            yield from paths(child, (*prefix, index))


def parent_of(frame: Any, path: tuple[Any, ...]) -> Any:
    node = frame
    for step in path[:-1]:
        node = node[step]
    return node


def mutate_structure(frame: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    frame = copy.deepcopy(frame)
    for _ in range(rng.randint(1, 3)):
        choices = list(paths(frame))
        operation = rng.random()
        if operation < 0.1:
            frame["type"] = rng.choice(TYPES)
            continue
        if operation < 0.2:
            frame["id"] = rng.choice(["ok-id", 7]) if rng.random() < 0.2 else hostile(rng)
            continue
        if operation < 0.3:
            frame[rng.choice(["extra", "\u00e9t\u00e9", "x\ud800"])] = hostile(rng)
            continue
        if not choices:
            continue
        path = rng.choice(choices)
        parent = parent_of(frame, path)
        current = parent[path[-1]]
        if operation < 0.45:
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
        elif operation < 0.75:
            parent[path[-1]] = hostile(rng)
        elif operation < 0.85:
            parent[path[-1]] = nested(rng.randint(14, 80), rng)
        elif isinstance(current, str):
            at = rng.randint(0, len(current))
            parent[path[-1]] = current[:at] + rng.choice(SPLICES) + current[at:]
        else:
            parent[path[-1]] = hostile(rng)
    return frame


def mutate_bytes(line: bytes, rng: random.Random) -> bytes:
    operation = rng.random()
    if operation < 0.25:
        return line[: rng.randint(0, max(0, len(line) - 1))]
    if operation < 0.45:
        at = rng.randint(0, len(line))
        return line[:at] + bytes([rng.randint(0, 255)]) + line[at:]
    if operation < 0.6:
        at = rng.randint(0, max(0, len(line) - 1))
        return line[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]) + line[at + 1 :]
    if operation < 0.72:
        for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"01", b"-0"):
            if b": 2" in line:
                return line.replace(b": 2", b": " + literal, 1)
        return line + b"NaN"
    if operation < 0.82:
        return line[:-1] + b', "type": "ping"}' if line.endswith(b"}") else line
    if operation < 0.9:
        return bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 64)))
    if operation < 0.93:
        return b'{"type": "ping", "pad": "' + b"x" * 70_000 + b'"}'
    if operation < 0.96:
        return b" \t \r"
    return line.replace(b"{", b"{" * 40, 1)


def fuzz_input(frame: dict[str, Any], rng: random.Random) -> bytes:
    """A valid frame now and then (so inputs also meet the states valid frames lead to), else
    a structural (60 %) or byte-level mutation of one."""
    choice = rng.random()
    if choice < 0.1:
        return json.dumps(frame).encode()
    if choice < 0.65:
        return json.dumps(mutate_structure(frame, rng)).encode()
    return mutate_bytes(json.dumps(frame).encode(), rng)


def says_bye(payload: bytes) -> bool:
    """Whether a line of the input is a valid `bye` (the protocol's reason to close)."""
    for line in payload.split(b"\n"):
        with contextlib.suppress(ProtocolError):
            if line.strip() and decode_frame(line)["type"] == "bye":
                return True
    return False


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Conn":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, wait: float = 10) -> dict[str, Any] | None:
        line = await asyncio.wait_for(self.reader.readline(), wait)
        return json.loads(line) if line else None

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        await self.send(json.dumps(frame).encode() + b"\n")
        while True:
            reply = await self.read()
            assert reply is not None, f"closed while waiting for {frame}"
            if reply.get("id") == frame.get("id"):
                return reply

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
def vm_tcp(asgi_server: LiveServer) -> Iterator[VmServer]:
    config = ServerConfig(
        heartbeat_interval=30.0,
        missed_heartbeats=3,
        auth_timeout=120.0,
        flush_interval=0.5,
        server_name="fuzz-vmcontrol",
        failure_burst=1_000_000,
    )
    server = VmServer(loop=asgi_server.loop, config=config).start()
    yield server
    server.stop()


def gauge(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def connect(port: int, stage: str, vm_id: int, token: str) -> Conn:
    conn = await Conn.open(port)
    if stage == "post":
        reply = await conn.request({"type": "auth", "id": "login", "vm_id": vm_id, "token": token})
        assert reply["type"] == "auth_ok", reply
    return conn


async def test_fuzzed_frames_never_crash_drop_or_leak(vm_tcp: VmServer) -> None:
    rng = random.Random(SEED)
    baseline = (gauge("vmcontrol_connections"), gauge("vmcontrol_authorized_connections"))
    pre_vm, pre_token = await sync_to_async(vm_with_token)("fuzz-pre")
    post_vm, post_token = await sync_to_async(vm_with_token)("fuzz-post")
    credentials = {"pre": (pre_vm.pk, pre_token), "post": (post_vm.pk, post_token)}
    figures = dict.fromkeys(FIGURES, 0)
    failures: list[str] = []
    started = time.monotonic()
    for stage in ("pre", "post"):
        vm_id, token = credentials[stage]
        frames = seeds(vm_id, token)
        conn = await connect(vm_tcp.port, stage, vm_id, token)
        for number in range(INPUTS_PER_STAGE):
            payload = fuzz_input(rng.choice(frames), rng)
            sentinel = f"s{number}"
            figures["tried"] += 1
            await conn.send(
                payload + b"\n" + json.dumps({"type": "ping", "id": sentinel}).encode() + b"\n"
            )
            replies: list[dict[str, Any]] = []
            closed = False
            try:
                while True:
                    reply = await conn.read()
                    if reply is None:
                        closed = True
                        break
                    if reply.get("id") == sentinel:
                        break
                    replies.append(reply)
            except (TimeoutError, ConnectionError) as error:
                failures.append(f"{stage} {payload[:200]!r}: no answer ({error!r})")
                closed = True
            codes = [r.get("code") for r in replies if r.get("type") == "error"]
            CODES.update(str(c) for c in codes or [r.get("type") for r in replies] or ["-"])
            if codes:
                figures["refused"] += 1
            if "internal" in codes:
                failures.append(f"{stage} {payload[:200]!r}: internal {replies}")
            if closed:
                if CLOSING_CODES & set(codes) or says_bye(payload):
                    figures["closed_by_protocol"] += 1
                else:
                    failures.append(f"{stage} {payload[:200]!r}: dropped after {replies}")
                await conn.close()
                conn = await connect(vm_tcp.port, stage, vm_id, token)
                continue
            # Keep each stage in its state: undo an authorization (pre) or restore it (post).
            sentinel_reply = await conn.request({"type": "ping", "id": f"state{number}"})
            authorized = sentinel_reply["type"] == "pong"
            if stage == "pre" and authorized:
                assert (await conn.request({"type": "logout", "id": "out"}))["type"] == "logged_out"
            elif stage == "post" and not authorized:
                login = {"type": "auth", "id": "again", "vm_id": vm_id, "token": token}
                assert (await conn.request(login))["type"] == "auth_ok"
        await conn.close()
    figures["crashing"] = len(failures)
    FIGURES.update(figures)
    elapsed = time.monotonic() - started
    print(f"\nvm_tcp fuzz: {figures} in {elapsed:.1f}s; answers: {dict(CODES)}")

    # Still serving a valid session afterwards.
    conn = await Conn.open(vm_tcp.port)
    assert (await conn.request({"type": "hello", "id": "h", "protocol": 1}))["type"] == "welcome"
    login = {"type": "auth", "id": "a", "vm_id": post_vm.pk, "token": post_token}
    assert (await conn.request(login))["type"] == "auth_ok"
    assert (await conn.request({"type": "ping", "id": "p"}))["type"] == "pong"
    await conn.close()

    # Nothing leaked: every session ended, every VM offline, gauges back to where they were.
    async def settled() -> bool:
        open_sessions = await sync_to_async(
            AgentSession.objects.filter(ended_at__isnull=True).count
        )()
        online = await sync_to_async(VirtualMachine.objects.exclude(status="offline").count)()
        gauges = (gauge("vmcontrol_connections"), gauge("vmcontrol_authorized_connections"))
        return open_sessions == 0 and online == 0 and gauges == baseline

    assert await eventually(settled, wait=15, every=0.1)
    assert failures == [], "\n".join(failures[:20])
    assert figures["tried"] == 2 * INPUTS_PER_STAGE and figures["refused"] > figures["tried"] // 2
    assert elapsed < 30
