"""No realtime door tells who exists (issue 11 item 4), over real HTTP and WebSocket sockets.

A user can reach (open a direct room with, add to a room) only a regular account they can
already see: a co-member of one of their rooms, or someone who takes part in a public room.
Every other id (a stranger, staff, a superuser, an inactive account, a service identity, a
Telegram-bot account, or no account at all) gets the very same answer, and a sweep of every id
through every door that takes one reveals nobody beyond what the caller could already see.
"""

import json
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from pytest_django.fixtures import Settings as SettingsWrapper

from realtime import selectors, services
from realtime.models import Membership, Room
from realtime.services import TopicAccess
from tests.conftest import LiveServer
from tests.factories import StaffFactory, UserFactory, auth_header
from tests.realtime.client import Client

pytestmark = pytest.mark.timeout(120)

services.topic_register("enum.mine", access=TopicAccess.OWNER)

UNREACHABLE = ["stranger", "staff", "superuser", "inactive", "service", "telegram", "missing"]
REACHABLE = ["roommate", "public_member", "public_sender"]


def _world() -> dict[str, Any]:
    """Mallory and everyone else. The unreachable ones (but the stranger) share a room with
    her or take part in a public room, so visibility alone does not make anyone reachable."""
    mallory = UserFactory.create(username="mallory")
    people: dict[str, Any] = {"mallory": mallory}
    for name in ["roommate", "public_member", "public_sender", "stranger"]:
        people[name] = UserFactory.create(username=name)
    people["staff"] = StaffFactory.create(username="ops")
    people["superuser"] = UserFactory.create(username="root-ish", is_superuser=True)
    people["inactive"] = UserFactory.create(username="gone", is_active=False)
    people["service"] = User.objects.create_user(username=settings.DOCBOT_SERVICE_USERNAME)
    people["telegram"] = User.objects.create_user(username="tg4242")
    team = services.room_create(user=mallory, slug="team", kind=Room.Kind.PRIVATE)
    for name in ["roommate", "staff", "superuser", "inactive", "service", "telegram"]:
        Membership.objects.create(room=team, user=people[name])
    services.room_create(user=people["public_member"], slug="lobby")
    general = services.room_default()
    services.message_send(user=people["public_sender"], room=general, text="hello all")
    services.message_send(user=people["service"], room=general, text="bot here")
    services.message_send(user=people["staff"], room=general, text="ops here")
    return people


def _hidden_world() -> dict[str, Any]:
    """Accounts mallory cannot see at all, with a private room and direct rooms among them."""
    hidden = {
        "hidden_staff": StaffFactory.create(username="hidden-ops"),
        "hidden_user": UserFactory.create(username="hidden-user"),
        "hidden_service": User.objects.create_user(username="svc-hidden"),
    }
    club = services.room_create(user=hidden["hidden_user"], slug="club", kind=Room.Kind.PRIVATE)
    Membership.objects.create(room=club, user=hidden["hidden_staff"])
    Membership.objects.create(room=club, user=hidden["hidden_service"])
    services.direct_get_or_create(
        user=hidden["hidden_staff"], other_user_id=hidden["hidden_user"].pk
    )
    return hidden


def _missing_id() -> int:
    return int(User.objects.order_by("-pk").values_list("pk", flat=True)[0]) + 1000


async def _target_id(people: dict[str, Any], name: str) -> int:
    return await sync_to_async(_missing_id)() if name == "missing" else people[name].pk


async def test_a_direct_room_with_anyone_unreachable_answers_exactly_as_a_missing_id(
    asgi_server: LiveServer,
) -> None:
    people = await sync_to_async(_world)()
    headers = await sync_to_async(auth_header)(people["mallory"])
    answers = {}
    async with httpx.AsyncClient(base_url=asgi_server.http_url) as http:
        for name in UNREACHABLE:
            user_id = await _target_id(people, name)
            response = await http.post(
                "/api/realtime/direct", headers=headers, json={"user_id": user_id}
            )
            answers[name] = (response.status_code, response.json())
    assert answers["missing"] == (
        404,
        {"error": {"code": "user_not_found", "message": "no such user", "details": {}}},
    )
    assert {name: answer for name, answer in answers.items()} == dict.fromkeys(
        UNREACHABLE, answers["missing"]
    )
    assert await sync_to_async(Room.objects.filter(kind=Room.Kind.DIRECT).count)() == 0


@pytest.mark.parametrize("name", REACHABLE)
async def test_a_direct_room_opens_with_a_roommate_or_a_public_room_participant(
    asgi_server: LiveServer, name: str
) -> None:
    people = await sync_to_async(_world)()
    mallory, other = people["mallory"], people[name]
    headers = await sync_to_async(auth_header)(mallory)
    async with httpx.AsyncClient(base_url=asgi_server.http_url) as http:
        first = await http.post("/api/realtime/direct", headers=headers, json={"user_id": other.pk})
        again = await http.post("/api/realtime/direct", headers=headers, json={"user_id": other.pk})
    assert first.status_code == 200, first.text
    low, high = sorted((mallory.pk, other.pk))
    assert first.json()["slug"] == again.json()["slug"] == f"dm-{low}-{high}"


@pytest.mark.parametrize("name", UNREACHABLE + REACHABLE)
async def test_a_room_owner_adds_only_reachable_users_and_the_rest_look_missing(
    asgi_server: LiveServer, name: str
) -> None:
    people = await sync_to_async(_world)()
    await sync_to_async(services.room_create)(user=people["mallory"], slug="mine", kind="private")
    headers = await sync_to_async(auth_header)(people["mallory"])
    user_id = await _target_id(people, name)
    async with httpx.AsyncClient(base_url=asgi_server.http_url) as http:
        added = await http.post(
            "/api/realtime/rooms/mine/members", headers=headers, json={"user_id": user_id}
        )
    if name in REACHABLE:
        assert added.status_code == 201, added.text
    else:
        assert (added.status_code, added.json()["error"]["code"]) == (404, "user_not_found")
        assert added.json()["error"]["message"] == "no such user"


def test_reachability_costs_the_same_one_query_for_a_stranger_and_a_missing_id(db: None) -> None:
    people = _world()
    counts = {}
    for name in ["stranger", "missing", "roommate"]:
        user_id = _missing_id() if name == "missing" else people[name].pk
        with CaptureQueriesContext(connection) as queries:
            selectors.user_reachable(actor=people["mallory"], user_id=user_id)
        counts[name] = len(queries)
    assert counts == {"stranger": 1, "missing": 1, "roommate": 1}


# --- the sweep ----------------------------------------------------------------------------------


def _revealed(document: Any, found: set[tuple[int, str]]) -> None:
    """Every (id, username) pair a response shows: members, presence, message senders."""
    if isinstance(document, list):
        for item in document:
            _revealed(item, found)
    elif isinstance(document, dict):
        if "username" in document and "id" in document:
            found.add((int(document["id"]), str(document["username"])))
        if "user_id" in document and "user" in document:
            found.add((int(document["user_id"]), str(document["user"])))
        for value in document.values():
            _revealed(value, found)


def _shape(answer: Any) -> str:
    """An answer without its echoed correlation ref, for comparing answers."""
    if isinstance(answer, dict):
        answer = {k: v for k, v in answer.items() if k != "ref"}
    return json.dumps(answer, sort_keys=True)


async def test_sweeping_every_id_through_every_door_reveals_only_users_already_visible(
    asgi_server: LiveServer, settings: SettingsWrapper
) -> None:
    for name in ("REALTIME_RATE_PER_SECOND", "REALTIME_USER_RATE_PER_SECOND"):
        setattr(settings, name, 1e9)
    for name in ("REALTIME_RATE_BURST", "REALTIME_USER_RATE_BURST"):
        setattr(settings, name, 10**9)
    people = await sync_to_async(_world)()
    hidden = await sync_to_async(_hidden_world)()
    mallory = people["mallory"]
    await sync_to_async(services.room_create)(user=mallory, slug="mine", kind="private")
    headers = await sync_to_async(auth_header)(mallory)
    existing = {who.pk for who in [*people.values(), *hidden.values()]}
    # Every id of this test's accounts, and missing ones on both sides and in between.
    ids = [n for n in range(min(existing) - 4, max(existing) + 5) if n > 0 and n != mallory.pk]
    reachable = {people[name].pk for name in REACHABLE}
    found: set[tuple[int, str]] = set()
    by_door: dict[str, dict[str, set[int]]] = {}

    def note(door: str, target: int, answer: Any) -> None:
        _revealed(answer, found)
        if target not in reachable:
            by_door.setdefault(door, {}).setdefault(_shape(answer), set()).add(target)

    ws = await Client.open(asgi_server.ws_url, mallory)
    async with httpx.AsyncClient(base_url=asgi_server.http_url, timeout=10) as http:
        for target in ids:
            answer = await http.post(
                "/api/realtime/direct", headers=headers, json={"user_id": target}
            )
            note("direct", target, [answer.status_code, answer.json()])
            answer = await http.post(
                "/api/realtime/rooms/mine/members", headers=headers, json={"user_id": target}
            )
            note(
                "members_add",
                target,
                [answer.status_code, answer.json() if answer.content else None],
            )
            answer = await http.delete(
                f"/api/realtime/rooms/mine/members/{target}", headers=headers
            )
            note(
                "members_remove",
                target,
                [answer.status_code, answer.json() if answer.content else None],
            )
            reply = await ws.request(
                {"type": "subscribe", "topic": f"enum.mine.{target}"}, "subscribed"
            )
            note("subscribe", target, reply)
        # Direct-room slugs between any two ids, existing or not: the same answers everywhere.
        probed = []
        for index, low in enumerate(ids):
            for high in ids[index + 1 : index + 4]:
                slug = f"dm-{low}-{high}"
                probed.append(slug)
                pair = low * 10_000 + high
                for path in ("", "/messages", "/presence"):
                    answer = await http.get(f"/api/realtime/rooms/{slug}{path}", headers=headers)
                    note(f"GET{path}", pair, [answer.status_code, answer.json()])
                answer = await http.post(
                    f"/api/realtime/rooms/{slug}/messages", headers=headers, json={"text": "hi"}
                )
                note("POST/messages", pair, [answer.status_code, answer.json()])
                frames: list[tuple[dict[str, Any], str]] = [
                    ({"type": "join", "room": slug}, "joined"),
                    ({"type": "history", "room": slug}, "history"),
                    ({"type": "sync", "room": slug, "after_seq": 0}, "sync"),
                    ({"type": "read", "room": slug, "seq": 0}, "read"),
                    ({"type": "sendMessage", "room": slug, "text": "hi"}, "ack"),
                ]
                for frame, kind in frames:
                    note(f"ws:{frame['type']}", pair, await ws.request(frame, kind))
        rooms = await http.get("/api/realtime/rooms", headers=headers)
        for room in rooms.json():
            detail = await http.get(f"/api/realtime/rooms/{room['slug']}", headers=headers)
            _revealed(detail.json(), found)
            page = await http.get(f"/api/realtime/rooms/{room['slug']}/messages", headers=headers)
            _revealed(page.json(), found)
    await ws.close()

    exists = Room.objects.filter(slug__in=probed, kind=Room.Kind.DIRECT)
    assert await sync_to_async(exists.count)() == 1  # the hidden pair's room was among them
    # Exactly one answer per door for every id that is not reachable, existing or not.
    assert {door: len(shapes) for door, shapes in by_door.items()} == dict.fromkeys(by_door, 1)
    hidden_ids = {who.pk for who in hidden.values()} | {people["stranger"].pk}
    assert hidden_ids <= existing
    assert {user_id for user_id, _ in found} & hidden_ids == set()
    visible = {mallory.pk, *reachable}
    visible |= {
        people[name].pk for name in ["staff", "superuser", "inactive", "service", "telegram"]
    }
    assert {user_id for user_id, _ in found} <= visible
