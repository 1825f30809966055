"""Every door tried as everyone who should be refused (input-policy.md, "Identity and abuse").

Identities: anonymous, anonymous with spoofed proxy/identity headers, another ordinary user
(not the owner, not a member, not staff), and a squatted service name (an account called like
the bot's service identity, as registration used to allow, claiming a Telegram user through the
header). Each REST operation is declared once with who may use it; every refused identity must
get 401/403/404 and leave the object untouched, and the entitled identity must get through (so
the matrix cannot pass by refusing everyone). The figures go to `var/security/matrix.json`.
"""

import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model

from tests.betting.factories import bet_place, event_create
from tests.conftest import LiveServer
from tests.docbot.factories import stored_document, telegram_user
from tests.factories import StaffFactory, UserFactory, token_for
from tests.realtime.factories import room_create
from tests.vmcontrol.factories import vm_with_token

REPORT = Path(__file__).resolve().parents[2] / "var" / "security" / "matrix.json"
REFUSED = {401, 403, 404}
SPOOFED = {
    "X-Forwarded-For": "127.0.0.1",
    "X-Real-IP": "127.0.0.1",
    "Forwarded": "for=127.0.0.1;proto=https",
    "X-Forwarded-User": "admin",
    "X-Remote-User": "admin",
    "Remote-User": "admin",
}
OWNER_TELEGRAM_ID = 424242


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    access: str  # "user" (any signed-in user), "owner", "member", "staff"
    body: Any = None


def _operations(objects: dict[str, Any]) -> list[Operation]:
    room, vm, event, bet = objects["room"], objects["vm"], objects["event"], objects["bet"]
    document, doc_type = objects["document"], objects["doc_type"]
    dead_letter = objects["dead_letter"]
    deadline = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    return [
        Operation("GET", "/api/auth/me", "user"),
        Operation("POST", "/api/realtime/ticket", "user"),
        Operation("GET", f"/api/realtime/rooms/{room.slug}", "member"),
        Operation("GET", f"/api/realtime/rooms/{room.slug}/messages", "member"),
        Operation("POST", f"/api/realtime/rooms/{room.slug}/messages", "member", {"text": "hi"}),
        Operation("GET", f"/api/realtime/rooms/{room.slug}/presence", "member"),
        Operation("GET", "/api/vmcontrol/vms", "staff"),
        Operation("POST", "/api/vmcontrol/vms", "staff", {"name": "rogue", "disks": []}),
        Operation("GET", f"/api/vmcontrol/vms/{vm.pk}", "staff"),
        Operation("PATCH", f"/api/vmcontrol/vms/{vm.pk}", "staff", {"cpu_cores": 2}),
        Operation("POST", f"/api/vmcontrol/vms/{vm.pk}/rotate-token", "staff"),
        Operation("GET", f"/api/vmcontrol/vms/{vm.pk}/commands", "staff"),
        Operation("GET", "/api/vmcontrol/disks", "staff"),
        Operation("GET", "/api/betting/events", "user"),
        Operation(
            "POST",
            "/api/betting/events",
            "staff",
            {"id": "rogue-1", "name": "Rogue", "coefficient": "2.00", "deadline": deadline},
        ),
        Operation("POST", f"/api/betting/events/{event.id}/odds", "staff", {"coefficient": "9"}),
        Operation("GET", f"/api/betting/bets/{bet.pk}", "owner"),
        Operation("GET", f"/api/docbot/documents/{document.pk}", "owner"),
        Operation("PATCH", f"/api/docbot/documents/{document.pk}", "owner", {"name": "Mine"}),
        Operation("POST", f"/api/docbot/documents/{document.pk}/share", "owner"),
        Operation("PATCH", f"/api/docbot/types/{doc_type.pk}", "owner", {"name": "Visa"}),
        Operation("GET", "/api/dead-letters", "staff"),
        Operation("POST", f"/api/dead-letters/{dead_letter.pk}/replay", "staff"),
        Operation("POST", "/api/movements/ingest", "staff", []),
        Operation("GET", "/metrics", "staff"),
        # Destructive last: by then every other operation has been tried on the objects.
        Operation("POST", f"/api/betting/events/{event.id}/cancel", "staff"),
        Operation("POST", f"/api/vmcontrol/vms/{vm.pk}/revoke-token", "staff"),
        Operation("DELETE", f"/api/docbot/documents/{document.pk}", "owner"),
    ]


def _objects(owner: Any) -> dict[str, Any]:
    from warehouse.models import DeadLetter

    room = room_create(owner=owner, slug="owners-private", kind="private")
    vm, _token = vm_with_token(name="matrix-vm")
    event = event_create()
    document = stored_document(owner, name="Passport scan")
    dead_letter = DeadLetter.objects.create(
        received_at=datetime.now(UTC), body="{}", reason=DeadLetter.Reason.MALFORMED
    )
    return {
        "room": room,
        "vm": vm,
        "event": event,
        "bet": bet_place(user=owner, event=event),
        "document": document,
        "doc_type": document.type,
        "dead_letter": dead_letter,
    }


def _squatter_headers() -> dict[str, str]:
    """An ordinary account named like the bot's service identity (created behind the
    registration check, as a squat from before it would be), claiming the owner's Telegram id."""
    squatter = get_user_model().objects.create_user(
        username=settings.DOCBOT_SERVICE_USERNAME, password="squatted-password-123"
    )
    return {
        "Authorization": f"Token {token_for(squatter)}",
        "X-Telegram-User-Id": str(OWNER_TELEGRAM_ID),
    }


def _request(client: httpx.Client, operation: Operation, headers: dict[str, str]) -> int:
    return client.request(
        operation.method, operation.path, headers=headers, json=operation.body
    ).status_code


@pytest.mark.timeout(120)
def test_no_door_lets_anyone_through_who_is_not_entitled(asgi_server: LiveServer) -> None:
    owner = telegram_user(OWNER_TELEGRAM_ID)
    staff, other = StaffFactory.create(), UserFactory.create()
    objects = _objects(owner)
    identities = {
        "anonymous": {},
        "spoofed headers": dict(SPOOFED),
        "other user": {"Authorization": f"Token {token_for(other)}", **SPOOFED},
        "squatted name": _squatter_headers(),
    }
    entitled = {
        "user": {"Authorization": f"Token {token_for(other)}"},
        "owner": {"Authorization": f"Token {token_for(owner)}"},
        "member": {"Authorization": f"Token {token_for(owner)}"},
        "staff": {"Authorization": f"Token {token_for(staff)}"},
    }
    tallies: Counter[str] = Counter()
    wrongly_allowed: list[str] = []
    with httpx.Client(base_url=asgi_server.http_url, timeout=10) as client:
        for operation in _operations(objects):
            for identity, headers in identities.items():
                if operation.access == "user" and identity in {"other user", "squatted name"}:
                    continue  # any signed-in user may, by design
                status = _request(client, operation, headers)
                tallies["tried"] += 1
                if status in REFUSED:
                    tallies["refused"] += 1
                else:
                    wrongly_allowed.append(
                        f"{identity}: {operation.method} {operation.path} -> {status}"
                    )
            # The entitled caller passes the access check (a state conflict such as a VM that is
            # offline may still refuse the operation itself).
            status = _request(client, operation, entitled[operation.access])
            assert status not in REFUSED and status < 500, (operation, status)
    tallies["wrongly_allowed"] = len(wrongly_allowed)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({"rest": dict(tallies)}, indent=2))
    print(f"access matrix (REST): {dict(tallies)}")
    assert wrongly_allowed == []


def _record(door: str, tallies: Counter[str]) -> None:
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    report[door] = dict(tallies)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2))
    print(f"access matrix ({door}): {dict(tallies)}")


class _Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.wrongly_allowed: list[str] = []

    def refused(self, what: str, refused: bool) -> None:
        self.counts["tried"] += 1
        if refused:
            self.counts["refused"] += 1
        else:
            self.wrongly_allowed.append(what)
        self.counts["wrongly_allowed"] = len(self.wrongly_allowed)


def _ws_refused(url: str, headers: dict[str, str], frame: dict[str, Any] | None) -> bool:
    """True when the socket is refused, or the frame is answered with an error."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, additional_headers=headers, open_timeout=10) as ws:
            if frame is None:
                ws.recv(timeout=5)
                return False
            ws.send(json.dumps({**frame, "ref": "matrix"}))
            while True:
                reply = json.loads(ws.recv(timeout=5))
                if reply.get("ref") == "matrix":
                    return bool(reply.get("type") == "error")
    except (InvalidStatus, ConnectionClosed):
        return True
    except TimeoutError:
        return frame is None


@pytest.mark.timeout(120)
def test_websocket_webhook_share_links_and_admin_refuse_the_unentitled(
    asgi_server: LiveServer,
) -> None:
    from realtime import services as realtime_services

    owner, other = UserFactory.create(), UserFactory.create()
    room = room_create(owner=owner, slug="owners-room", kind="private")
    tally = _Tally()
    ws = f"{asgi_server.ws_url}/ws/"
    other_ticket = lambda: realtime_services.ticket_issue(user=other)[0]  # noqa: E731
    for label, headers in (("anonymous", {}), ("spoofed headers", SPOOFED)):
        tally.refused(f"ws connect as {label}", _ws_refused(ws, headers, None))
        tally.refused(
            f"ws forged ticket as {label}", _ws_refused(f"{ws}?ticket=forged", headers, None)
        )
    for frame in (
        {"type": "join", "room": room.slug},
        {"type": "history", "room": room.slug},
        {"type": "sendMessage", "room": room.slug, "text": "intrusion"},
        {"type": "subscribe", "topic": "vmcontrol.vms"},
        {"type": "subscribe", "topic": f"betting.bets.{owner.pk}"},
    ):
        url = f"{ws}?ticket={other_ticket()}"
        tally.refused(f"ws {frame} as another user", _ws_refused(url, SPOOFED, frame))
    hostile_origin = {"Origin": "http://evil.example:8000"}
    url = f"{ws}?ticket={other_ticket()}"
    tally.refused("ws from a foreign origin", _ws_refused(url, hostile_origin, None))

    with httpx.Client(base_url=asgi_server.http_url, timeout=10) as client:
        for secret in ("", "wrong", settings.TELEGRAM_WEBHOOK_SECRET + "x"):
            status = client.post(
                "/docbot/webhook",
                json={"update_id": 1},
                headers={"X-Telegram-Bot-Api-Secret-Token": secret, **SPOOFED},
            ).status_code
            tally.refused(f"webhook with secret {secret!r}", status in {403, 404})
        for token in ("forged", "a" * 40, "x:y:z"):
            status = client.get(f"/docbot/files/{token}", headers=SPOOFED).status_code
            tally.refused(f"share link {token!r}", status in {400, 403, 404, 410})
        client.cookies.clear()
        for who, headers in (("anonymous", SPOOFED), ("user", {})):
            if who == "user":
                _login_admin(client, other.username)
            page = client.get("/admin/", headers=headers, follow_redirects=False)
            tally.refused(f"admin index as {who}", page.status_code in {302, 403})
            listing = client.get("/admin/auth/user/", headers=headers, follow_redirects=False)
            tally.refused(f"admin user list as {who}", listing.status_code in {302, 403})
    _record("websocket, webhook, share links, admin", tally.counts)
    assert tally.wrongly_allowed == []


def _login_admin(client: httpx.Client, username: str) -> None:
    import re

    from tests.factories import TEST_PASSWORD

    page = client.get("/admin/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token is not None
    client.post(
        "/admin/login/?next=/admin/",
        data={
            "csrfmiddlewaretoken": token.group(1),
            "username": username,
            "password": TEST_PASSWORD,
            "next": "/admin/",
        },
        headers={"Referer": f"{client.base_url}admin/login/"},
    )


@pytest.mark.timeout(120)
def test_grpc_writes_refuse_the_unentitled(asgi_server: LiveServer) -> None:
    import asyncio

    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp

    from betting.grpc.generated import betting_pb2 as pb
    from betting.grpc.generated import betting_pb2_grpc as pb_grpc
    from tests.betting.servers import line_provider_running

    event = event_create()
    user, squatter = (
        UserFactory.create(),
        get_user_model().objects.create_user(
            username=settings.DOCBOT_SERVICE_USERNAME + "-grpc", password="squatted-password-123"
        ),
    )
    tally = _Tally()
    deadline = Timestamp()
    deadline.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    user_token, squatter_token = token_for(user), token_for(squatter)

    async def probe() -> None:
        async with (
            line_provider_running() as port,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub = pb_grpc.LineProviderStub(channel)
            identities = {
                "anonymous": [],
                "spoofed headers": [("x-forwarded-for", "127.0.0.1"), ("x-user", "admin")],
                "forged token": [("authorization", "Bearer forged")],
                "non-staff user": [("authorization", f"Bearer {user_token}")],
                "squatted name": [("authorization", f"Token {squatter_token}")],
            }
            for identity, metadata in identities.items():
                calls = {
                    "CreateEvent": lambda m=metadata: stub.CreateEvent(
                        pb.CreateEventRequest(
                            id=f"rogue-{len(m)}",
                            name="Rogue",
                            coefficient="2.00",
                            deadline=deadline,
                        ),
                        metadata=m,
                    ),
                    "UpdateOdds": lambda m=metadata: stub.UpdateOdds(
                        pb.UpdateOddsRequest(id=event.id, coefficient="9.00"), metadata=m
                    ),
                }
                for name, call in calls.items():
                    try:
                        await call()
                        refused = False
                    except grpc.aio.AioRpcError as exc:
                        refused = exc.code() in {
                            grpc.StatusCode.UNAUTHENTICATED,
                            grpc.StatusCode.PERMISSION_DENIED,
                        }
                    tally.refused(f"gRPC {name} as {identity}", refused)

    asyncio.run_coroutine_threadsafe(probe(), asgi_server.loop).result(60)
    _record("grpc", tally.counts)
    assert tally.wrongly_allowed == []


@pytest.mark.timeout(120)
def test_the_vm_tcp_door_refuses_the_unentitled(asgi_server: LiveServer) -> None:
    import asyncio

    from tests.vmcontrol.conftest import VmServer, Wire
    from vmcontrol.sessions import ServerConfig

    target, _ = vm_with_token(name="target-vm")
    neighbour, neighbour_token = vm_with_token(name="neighbour-vm")
    config = ServerConfig(
        heartbeat_interval=1.0,
        missed_heartbeats=3,
        auth_timeout=5.0,
        flush_interval=0.2,
        server_name="matrix-vmcontrol",
    )
    server = VmServer(loop=asgi_server.loop, config=config).start()
    tally = _Tally()
    inventory = {"cpu_cores": 64, "ram_mb": 1, "disks": []}

    async def probe() -> None:
        attempts: dict[str, dict[str, Any]] = {
            "no token": {"type": "auth", "vm_id": target.pk},
            "forged token": {"type": "auth", "vm_id": target.pk, "token": "vmc_forged"},
            "another VM's token": {"type": "auth", "vm_id": target.pk, "token": neighbour_token},
            "forged enroll secret": {"type": "enroll", "secret": "guess", "inventory": inventory},
        }
        for label, frame in attempts.items():
            wire = await Wire.open(server.port)
            reply = await wire.request(frame)
            tally.refused(f"tcp {label}", reply["type"] == "error")
            await wire.close()
        before_auth: dict[str, dict[str, Any]] = {
            "inventory": {"type": "inventory", "inventory": inventory},
            "result": {"type": "result", "command_id": "x", "ok": True},
            "logout": {"type": "logout"},
        }
        for kind, frame in before_auth.items():
            wire = await Wire.open(server.port)
            await wire.request({"type": "hello", "protocol": 1, "vm_id": neighbour.pk})
            reply = await wire.request(frame)
            tally.refused(f"tcp {kind} before auth", reply["type"] == "error")
            await wire.close()

    try:
        asyncio.run(probe())
    finally:
        server.stop()
    target.refresh_from_db()
    assert target.cpu_cores != 64
    _record("vm tcp", tally.counts)
    assert tally.wrongly_allowed == []
