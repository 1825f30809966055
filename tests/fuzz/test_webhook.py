"""Bounded fuzz of the Telegram webhook door over real HTTP (issue 10): valid updates of every
kind the bot meets (private text, files, buttons, edits, channel posts, group and supergroup
messages, unknown kinds) mutated deterministically (`random.Random(10)`): fields deleted,
types swapped, lone surrogates, NUL and controls, huge, negative and non-ASCII-digit numbers,
deep nesting, unknown kinds, non-private chats, forged callback data, truncated and random
bytes.

Must hold: no 5xx; nothing is ever sent to a non-private chat but the one "use me in a private
chat" notice per group; every button press that was accepted is answered exactly once; no
account or document exists for anything but the private users; and a valid /help is still
answered afterwards. Figures go to stdout and `var/fuzz/webhook.json`.
"""

import copy
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.management import call_command

from common import parsers
from config.celery import app as celery_app
from docbot import runtime, texts
from docbot.models import Document, DocumentType, TelegramAccount
from tests.conftest import LiveServer
from tests.docbot.conftest import WEBHOOK_SECRET, point_settings_at
from tests.docbot.factories import stored_document, telegram_user
from tests.docbot.fake_telegram import FakeTelegram

SEED = 10
INPUTS = 600
DEEP = "__deep_nesting__"
REPORT = Path(__file__).resolve().parents[2] / "var" / "fuzz" / "webhook.json"

USERS = (910001, 910002)
GROUPS = {-4001: "group", -1004002: "supergroup"}
CHANNEL = -1009001
FORGED_DATA = [
    "bp:3:-2",
    "bp:3:0",
    "bp:1:99999",
    "d:-1",
    "d:0",
    "d:1.5",
    "d:\u0661",
    "d:\uff11",
    "d:9223372036854775808",
    "d:99999999999999999999",
    "x:abc",
    "zz:1",
    "",
    ":",
    "d:1:2",
    "an:1",
    "d:" + "9" * 70,
]
JUNK: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    -0.0,
    2**53,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    "",
    "x",
    "\u0663",
    "\uff11",
    "\u00b2",
    "\ud800",
    "a\x00b",
    "\x1b[2J",
    "\u202e",
    "9" * 40,
    [],
    {},
    [[[]]],
    {"id": 1},
]
STRING_DAMAGE: list[Callable[[str, random.Random], str]] = [
    lambda s, r: s + "\ud800",
    lambda s, r: "\udfff" + s,
    lambda s, r: s + "\x00",
    lambda s, r: s + chr(r.randrange(1, 32)),
    lambda s, r: s * 5000 if s else "x" * 5000,
    lambda s, r: "\u202e" + s,
    lambda s, r: s[: len(s) // 2],
    lambda s, r: "".join(chr(r.randrange(0x20, 0x3000)) for _ in range(r.randrange(1, 80))),
]
INT_DAMAGE: list[Callable[[int, random.Random], Any]] = [
    lambda n, r: n + 2**63,
    lambda n, r: -n - 1,
    lambda n, r: n + 0.5,
    lambda n, r: str(n),
    lambda n, r: "".join("\u0660\u0661\u0662\u0663"[int(d) % 4] for d in str(abs(n))),
    lambda n, r: 2**52,
    lambda n, r: 0,
]


class Corpus:
    """Valid updates of every shape, with fresh update and button ids."""

    def __init__(self, fake: FakeTelegram, rng: random.Random, ids: dict[str, int]) -> None:
        self.fake = fake
        self.rng = rng
        self.ids = ids
        self.presses = 0

    def user(self) -> int:
        return self.rng.choice(USERS)

    def chat(self, user: int) -> dict[str, Any]:
        roll = self.rng.random()
        if roll < 0.7:
            return {"id": user, "type": "private"}
        if roll < 0.9:
            chat_id = self.rng.choice(list(GROUPS))
            return {"id": chat_id, "type": GROUPS[chat_id], "title": "G"}
        return {"id": CHANNEL, "type": "channel", "title": "C"}

    def data(self) -> str:
        d, t = self.ids["document"], self.ids["type"]
        valid = [
            "an",
            f"at:{t}",
            f"bt:{t}",
            f"bp:{t}:1",
            f"bp:{t}:2",
            f"d:{d}",
            f"s:{d}",
            f"r:{d}",
            f"m:{d}",
            f"x:{d}",
            f"xn:{d}",
            f"mt:{d}:{t}",
        ]
        return self.rng.choice(valid if self.rng.random() < 0.6 else FORGED_DATA)

    def update(self) -> dict[str, Any]:
        user = self.user()
        chat = self.chat(user)
        kind = self.rng.choice(
            ["text"] * 5 + ["command", "file", "photo", "other"] + ["button"] * 4 + ["odd"]
        )
        if kind in {"text", "command"}:
            words = ["/start", "/help", "/cancel", "/search", "/search pass", "/search"]
            plain = [texts.MENU_ADD, texts.MENU_BROWSE, "Visa", "Passport", "x" * 130, " "]
            text = self.rng.choice(words if kind == "command" else plain)
            how = self.rng.choice(["message"] * 6 + ["edited_message"])
            if chat["type"] == "channel":
                how = self.rng.choice(["channel_post", "edited_channel_post"])
            return self.fake.text_update(user, text, chat=chat, kind=how)
        if kind == "file":
            stored = self.fake.add_file(b"%PDF fuzz" * 8, name="fuzz.pdf")
            update = self.fake.document_update(user, stored)
            update["message"]["chat"] = chat
            return update
        if kind == "photo":
            stored = self.fake.add_file(b"\xff\xd8fuzz" * 8, name="fuzz.jpg")
            update = self.fake.photo_update(user, stored)
            update["message"]["chat"] = chat
            return update
        if kind == "other":
            content: dict[str, Any] = self.rng.choice(
                [
                    {"voice": {"file_id": "V1", "file_unique_id": "v1", "duration": 1}},
                    {"location": {"latitude": 1.0, "longitude": 2.0}},
                    {"dice": {"emoji": "\U0001f3b2", "value": 2}},
                ]
            )
            return self.fake.message_update(user, chat=chat, **content)
        if kind == "button":
            self.presses += 1
            update = self.fake.callback_update(user, self.data(), chat=chat)
            update["callback_query"]["id"] = f"fz{self.presses}"
            if self.rng.random() < 0.1:  # a button on an inline message: no message at all
                del update["callback_query"]["message"]
                update["callback_query"]["inline_message_id"] = "inline-1"
            return update
        odd = self.rng.choice(["unknown kind", "empty", "reaction"])
        update_id = self.fake.next_update_id()
        if odd == "unknown kind":
            return {"update_id": update_id, "brand_new_kind": {"id": 1, "what": "x"}}
        if odd == "empty":
            return {"update_id": update_id}
        return {
            "update_id": update_id,
            "message_reaction_count": {
                "chat": chat,
                "message_id": 1,
                "date": 1_767_225_600,
                "reactions": [],
            },
        }


def _slots(node: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key) below `node`, iteratively."""
    stack = [node]
    while stack:
        current = stack.pop()
        items = (
            current.items()
            if isinstance(current, dict)
            else enumerate(current)
            if isinstance(current, list)
            else ()
        )
        for key, child in items:
            yield current, key
            if isinstance(child, dict | list):
                stack.append(child)


def _mutate(update: dict[str, Any], rng: random.Random) -> Any:
    """One to three structural mutations of a decoded update."""
    doc: Any = copy.deepcopy(update)
    for _ in range(rng.randint(1, 3)):
        slots = list(_slots(doc))
        if not slots:
            break
        parent, key = rng.choice(slots)
        value = parent[key]
        how = rng.randrange(10)
        if how == 0:
            del parent[key]
        elif how == 1:
            parent[key] = rng.choice(JUNK)
        elif how == 2 and isinstance(value, str):
            parent[key] = rng.choice(STRING_DAMAGE)(value, rng)
        elif how == 3 and isinstance(value, int) and not isinstance(value, bool):
            parent[key] = rng.choice(INT_DAMAGE)(value, rng)
        elif how == 4 and isinstance(value, dict):
            value[rng.choice(["extra", "\u00e9", "x" * 300, "id2"])] = rng.choice(JUNK)
        elif how == 5:  # deep nesting, spliced into the bytes by `_dumps`
            parent[key] = f"{DEEP}{rng.choice([40, 200, 3000])}"
        elif how == 6 and isinstance(doc, dict):
            kinds = [k for k in doc if k != "update_id"]
            if kinds:
                new = rng.choice(["edited_message", "channel_post", "business_message", "zz"])
                doc[new] = doc.pop(kinds[0])
        elif how == 7 and key == "chat" and isinstance(value, dict):
            chat_id = rng.choice(list(GROUPS))
            parent[key] = {"id": chat_id, "type": GROUPS[chat_id], "title": "G"}
        elif how == 8 and key == "type" and isinstance(value, str):
            parent[key] = rng.choice(["group", "supergroup", "channel", "secret", "", "PRIVATE"])
        elif how == 9 and key == "data":
            parent[key] = rng.choice(
                [*FORGED_DATA, "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(40))]
            )
    return doc


def _dumps(doc: Any) -> bytes:
    raw = json.dumps(doc).encode()
    return re.sub(
        rb'"' + DEEP.encode() + rb'(\d+)"',
        lambda m: b"[" * int(m[1]) + b"]" * int(m[1]),
        raw,
    )


def _body(update: dict[str, Any], rng: random.Random) -> tuple[bytes, Any]:
    """The bytes to POST, and the decoded document they stand for (None when not JSON)."""
    roll = rng.random()
    if roll < 0.15:
        return json.dumps(update).encode(), update
    if roll < 0.85:
        mutated = _mutate(update, rng)
        return _dumps(mutated), mutated
    raw = json.dumps(update).encode()
    damage = rng.randrange(5)
    if damage == 0:
        return raw[: rng.randrange(len(raw))], None
    if damage == 1:
        return rng.randbytes(rng.randrange(1, 200)), None
    if damage == 2:
        flipped = bytearray(raw)
        for _ in range(rng.randint(1, 5)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        return bytes(flipped), None
    if damage == 3:
        return rng.choice([b"[]", b"{}", b"null", b"1", b'"x"', b"true", b""]), None
    return raw.replace(b'"update_id"', b'"update_id\xff"', 1), None


@pytest.fixture
def webhook_bot(asgi_server: LiveServer, settings: Any, tmp_path: Path) -> Iterator[FakeTelegram]:
    fake = FakeTelegram().start()
    eager = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    try:
        point_settings_at(settings, fake, asgi_server, tmp_path / "media")
        settings.DOCBOT_FLOOD_MAX_PER_SECOND = 1_000_000  # flood control has its own tests
        settings.DOCBOT_RATE_LIMIT_PER_SECOND = 0
        runtime.reset_for_tests()
        call_command("run_docbot", set_webhook=f"{asgi_server.http_url}/docbot/webhook")
        yield fake
    finally:
        celery_app.conf.task_always_eager = eager
        runtime.reset_for_tests()
        fake.stop()


@pytest.mark.timeout(120)
def test_webhook_fuzz_never_fails_and_never_talks_to_a_group(webhook_bot: FakeTelegram) -> None:
    fake = webhook_bot
    document = stored_document(telegram_user(USERS[0]), name="Passport scan")
    corpus = Corpus(fake, random.Random(SEED), {"document": document.pk, "type": document.type_id})
    rng = random.Random(SEED + 1)
    tallies: Counter[str] = Counter(tried=0, accepted=0, refused=0, crashing=0)
    crashes: list[str] = []
    must_answer: list[str] = []
    with httpx.Client(timeout=30) as client:
        for _ in range(INPUTS):
            original = corpus.update()
            body, sent = _body(original, rng)
            secret = WEBHOOK_SECRET if rng.random() > 0.03 else rng.choice(["", "nope"])
            tallies["tried"] += 1
            try:
                response = client.post(
                    fake.webhook_url,
                    content=body,
                    headers={
                        "X-Telegram-Bot-Api-Secret-Token": secret,
                        "Content-Type": "application/json",
                    },
                )
            except httpx.HTTPError as exc:
                tallies["crashing"] += 1
                crashes.append(f"{exc!r}: {body[:300]!r}")
                continue
            if response.status_code >= 500:
                tallies["crashing"] += 1
                crashes.append(f"{response.status_code}: {body[:300]!r}")
            elif response.status_code >= 400:
                tallies["refused"] += 1
                assert response.json()["error"]["code"], response.text
            else:
                tallies["accepted"] += 1
                press = sent.get("callback_query") if isinstance(sent, dict) else None
                if (
                    isinstance(press, dict)
                    and sent.get("update_id") == original["update_id"]
                    and press.get("id") == original["callback_query"]["id"]
                ):
                    must_answer.append(press["id"])

    calls = fake.sent()
    to_others = [c for c in calls if c.chat_id is not None and c.chat_id not in USERS]
    notices = Counter(c.chat_id for c in to_others)
    assert all(c.method == "sendMessage" and c.text == texts.PRIVATE_ONLY for c in to_others), [
        (c.method, c.chat_id, c.text[:40]) for c in to_others
    ]
    assert all(chat_id in GROUPS for chat_id in notices), notices
    assert max(notices.values(), default=0) <= 1, notices
    answers = Counter(c.params["callback_query_id"] for c in fake.sent("answerCallbackQuery"))
    assert max(answers.values(), default=0) <= 1
    assert [press for press in must_answer if answers[press] != 1] == []
    assert set(TelegramAccount.objects.values_list("telegram_user_id", flat=True)) <= set(USERS)
    owners = Document.objects.values_list("user__telegram_account__telegram_user_id", flat=True)
    assert set(owners) <= set(USERS)
    for name in DocumentType.objects.values_list("name", flat=True):
        assert parsers.text_problem(name) is None, name

    since = fake.mark()
    assert fake.deliver(fake.text_update(USERS[1], "/help")).status_code == 200
    fake.wait_text(USERS[1], "Add document: pick", since=since)

    tallies["answered_presses"] = len(must_answer)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(dict(tallies), indent=2))
    print(f"webhook fuzz: {dict(tallies)}")
    assert crashes == [], crashes[:10]
