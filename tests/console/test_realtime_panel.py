"""The realtime panel: messages counted where they are stored, rooms linked to the admin."""

import time
from typing import Any

import pytest

from common.console import console_hub, console_panel
from common.heartbeat import console_flush
from realtime import services
from realtime.console import realtime_sample
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def _messages(sample: Any) -> int:
    return int(sample["counters"]["messages"]["value"])


def test_a_stored_message_is_counted_once_across_processes() -> None:
    user = UserFactory.create()
    before = _messages(realtime_sample())
    services.message_send(user=user, text="one", client_id="c-1")
    services.message_send(user=user, text="one again", client_id="c-1")  # a retry: no new message
    services.message_send(user=user, text="two")
    console_flush()
    deadline = time.monotonic() + 5  # a heartbeat thread of this process may be mid-flush
    while _messages(realtime_sample()) < before + 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert _messages(realtime_sample()) == before + 2


def test_the_busiest_rooms_link_to_their_admin_page() -> None:
    user = UserFactory.create()
    message, _ = services.message_send(user=user, text="hello")
    sample = realtime_sample()
    rows = sample["tables"][0]["rows"]
    room = services.room_default()
    assert rows[0] == {
        "key": room.slug,
        "cells": [room.slug, "public", message.seq],
        "link": f"/admin/realtime/room/{room.pk}/change/",
    }
    numbers = {n["key"]: n for n in sample["numbers"]}
    assert int(numbers["rooms"]["value"] or 0) >= 1
    assert numbers["rooms"]["link"] == "/admin/realtime/room/"


def test_the_realtime_app_hands_in_the_hub_and_its_panel() -> None:
    panel = console_panel("realtime")
    assert panel is not None and panel.topic == "console.realtime"
    hub = console_hub()
    assert hub is not None
    assert list(hub.hello) == [{"type": "leave", "room": "general"}]
