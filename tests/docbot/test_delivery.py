"""Nothing is lost when a bot process dies (issue 15): handling is at-least-once in both modes.

A polling bot confirms (moves the getUpdates offset past) only updates it has finished, so
whatever a killed poller was handling is fetched again by the copy that takes over; the update
dedupe suppresses only updates already done, and leaves one whose claim is still fresh for a
later delivery (polling: not confirmed yet; webhook: 503, which Telegram repeats). A claim whose
handler died expires (DOCBOT_UPDATE_CLAIM_SECONDS) and the next delivery handles the update.

The stand-in holds the bot's sendMessage calls open (`hold_replies`) so that a kill lands while
an update is mid-reply; the replies it had received count as sent, so an update killed
mid-reply may be answered twice, never more, and every other update exactly once."""

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache

from docbot import runtime, texts
from docbot.bot.polling import Offsets
from docbot.bot.state import DialogStore
from tests.docbot.conftest import WEBHOOK_SECRET, BotEnv, PollingBot
from tests.docbot.fake_telegram import Call, FakeTelegram
from tests.docbot.processes import START_SECONDS, bot_variables, poller
from tests.realtime.nodes import Node, asgi_process

pytestmark = [pytest.mark.timeout(300), pytest.mark.django_db(transaction=True)]

LEASE_TTL = 6.0
CLAIM = 3.0


# --- the offset rule ----------------------------------------------------------------------


def test_the_offset_passes_only_updates_finished_together_with_all_before_them() -> None:
    offsets = Offsets()
    assert [offsets.fetched(i) for i in (10, 11, 12, 14)] == [True] * 4
    assert offsets.next is None and offsets.waiting

    assert offsets.finished(12, True) is False  # out of order: 10 and 11 still run
    assert offsets.finished(14, True) is False
    assert offsets.next is None
    assert offsets.finished(10, True) is True
    assert offsets.next == 11  # 11 still runs: 12 and 14 wait behind it
    assert offsets.finished(11, True) is True
    assert offsets.next == 15  # ids need not be contiguous: 13 was never fetched
    assert not offsets.waiting


def test_an_update_left_for_later_holds_the_offset_and_is_handed_over_again() -> None:
    offsets = Offsets()
    for update_id in (20, 21, 22):
        offsets.fetched(update_id)
    offsets.finished(20, True)
    offsets.finished(21, False)  # busy elsewhere: to be handled when fetched again
    offsets.finished(22, True)
    assert offsets.next == 21 and offsets.waiting

    # The next batch brings 21 and 22 again, and 23: 21 is handed over again, 22 is not.
    assert [offsets.fetched(i) for i in (21, 22, 23)] == [True, False, True]
    assert offsets.fetched(21) is False  # running now: a third fetch does not hand it over
    offsets.finished(23, True)
    assert offsets.next == 21
    offsets.finished(21, True)
    assert offsets.next == 24
    assert offsets.fetched(22) is False  # confirmed: below the offset


def test_a_new_lease_term_forgets_all_but_the_updates_still_running() -> None:
    offsets = Offsets()
    for update_id in (30, 31, 32):
        offsets.fetched(update_id)
    offsets.finished(30, True)
    offsets.finished(32, False)
    offsets.restart()
    assert offsets.next is None  # another poller may have confirmed anything meanwhile
    assert [offsets.fetched(i) for i in (31, 32, 33)] == [False, True, True]
    offsets.finished(32, True)
    offsets.finished(33, True)
    assert offsets.next is None  # 31 still runs here
    offsets.finished(31, True)
    assert offsets.next == 34


# --- helpers ------------------------------------------------------------------------------


def helps(fake: FakeTelegram, user_id: int, caller: str | None = None) -> list[Call]:
    """The /help answers `user_id` got (from `caller` only, when given)."""
    return [
        c
        for c in fake.sent("sendMessage", chat_id=user_id)
        if c.text == texts.HELP and (caller is None or c.caller == caller)
    ]


def wait_until(condition: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.05)


def polled_after(fake: FakeTelegram, moment: float) -> bool:
    return any(at > moment for at, _ in list(fake.polls))


def highest_offset(fake: FakeTelegram) -> int:
    return max((offset for _, offset in list(fake.polls)), default=0)


def store_is_shared() -> bool:
    """True when the update dedupe is one store for every process (Redis)."""
    return isinstance(caches["default"], RedisCache)


@pytest.fixture
def short_claims(settings: Any) -> None:
    settings.DOCBOT_UPDATE_CLAIM_SECONDS = CLAIM


@pytest.fixture
def polling_bot(bot_env: BotEnv, short_claims: None) -> Iterator[BotEnv]:
    bot = PollingBot(bot_env.config("polling")).start()
    try:
        yield bot_env
    finally:
        bot_env.fake.release_replies()
        bot.stop()


# --- polling, one process -----------------------------------------------------------------


def test_an_update_still_being_handled_is_never_confirmed(polling_bot: BotEnv) -> None:
    fake = polling_bot.fake
    fake.hold_replies({8101})
    slow = fake.push(fake.text_update(8101, "/help"))["update_id"]
    quick = [fake.push(fake.text_update(user, "/help"))["update_id"] for user in (8102, 8103)]
    held = fake.wait_for(lambda c: c.chat_id == 8101 and c.method == "sendMessage")
    for user in (8102, 8103):
        fake.wait_text(user, texts.HELP)
    answered = max(c.at for c in fake.sent("sendMessage"))
    wait_until(lambda: polled_after(fake, max(answered, held.at) + 0.5), 30, "polled again")

    # The later updates are answered, fetched again behind the held one, and not redone.
    assert highest_offset(fake) <= slow
    assert [len(helps(fake, user)) for user in (8102, 8103)] == [1, 1]

    fake.release_replies()
    wait_until(lambda: highest_offset(fake) > max(quick), 30, "all confirmed once answered")
    assert [len(helps(fake, user)) for user in (8101, 8102, 8103)] == [1, 1, 1]


def test_an_update_claimed_by_a_poller_that_died_is_handled_once_its_claim_expires(
    polling_bot: BotEnv,
) -> None:
    fake = polling_bot.fake
    update = fake.text_update(8201, "/help")
    dead = DialogStore(ttl_seconds=60, claim_seconds=CLAIM)
    # The claim a poller took just before it was killed: it cannot expire before this + CLAIM.
    claimed_at = time.monotonic()
    assert asyncio.run(_claim(dead, update["update_id"])) == "ok"
    fake.push(update)
    fake.push(fake.text_update(8202, "/help"))
    fake.wait_text(8202, texts.HELP)

    fake.wait_text(8201, texts.HELP, timeout=CLAIM + 30)
    wait_until(lambda: highest_offset(fake) > update["update_id"] + 1, 30, "confirmed")
    while_claimed = [offset for at, offset in list(fake.polls) if at < claimed_at + CLAIM]
    assert all(offset <= update["update_id"] for offset in while_claimed), while_claimed
    assert [len(helps(fake, user)) for user in (8201, 8202)] == [1, 1]


def test_the_claim_of_an_update_still_being_handled_is_renewed_past_its_ttl(
    polling_bot: BotEnv,
) -> None:
    fake = polling_bot.fake
    fake.hold_replies({8211})
    update = fake.push(fake.text_update(8211, "/help"))
    held = fake.wait_for(lambda c: c.chat_id == 8211 and c.method == "sendMessage")
    while time.monotonic() < held.at + 2 * CLAIM:  # the moment under test: an unrenewed
        time.sleep(0.05)  # claim would have expired by now
    # Another process delivered the same update now: it is still being handled here.
    other = DialogStore(ttl_seconds=60, claim_seconds=CLAIM)
    assert asyncio.run(_claim(other, update["update_id"])) == "busy"
    fake.release_replies()
    wait_until(lambda: highest_offset(fake) > update["update_id"], 30, "confirmed")
    other = DialogStore(ttl_seconds=60, claim_seconds=CLAIM)
    assert asyncio.run(_claim(other, update["update_id"])) == "duplicate"
    assert len(helps(fake, 8211)) == 1


async def _claim(store: DialogStore, update_id: int) -> str:
    try:
        return await store.admit(update_id, 8201, 50)
    finally:
        await store.aclose()


# --- webhook, one process -----------------------------------------------------------------


def deliver_until_accepted(url: str, update: dict[str, Any], within: float = 60) -> list[int]:
    """POST `update` as Telegram does, repeating it while the answer is not 2xx; the statuses."""
    headers = {"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET}
    statuses: list[int] = []
    deadline = time.monotonic() + within
    while not statuses or statuses[-1] != 200:
        assert time.monotonic() < deadline, f"never accepted: {statuses}"
        try:
            statuses.append(httpx.post(url, json=update, headers=headers, timeout=30).status_code)
        except httpx.TransportError:
            statuses.append(0)
        if statuses[-1] != 200:
            time.sleep(0.2)
    return statuses


def test_a_webhook_update_claimed_elsewhere_is_refused_until_it_is_done_or_its_claim_expires(
    webhook_registered: BotEnv, short_claims: None
) -> None:
    fake = webhook_registered.fake
    headers = {"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET}
    done_elsewhere = fake.text_update(8301, "/help")
    died_elsewhere = fake.text_update(8302, "/help")
    # Other web workers' claims: one still handling (a claim that outlasts the test), one
    # that died (its claim expires after CLAIM).
    handling = DialogStore(ttl_seconds=60, claim_seconds=300)
    died = DialogStore(ttl_seconds=60, claim_seconds=CLAIM)
    assert asyncio.run(_claim(handling, done_elsewhere["update_id"])) == "ok"
    assert asyncio.run(_claim(died, died_elsewhere["update_id"])) == "ok"

    busy = httpx.post(fake.webhook_url, json=done_elsewhere, headers=headers, timeout=30)
    assert busy.status_code == 503, busy.text
    assert busy.json()["error"]["code"] == "update_busy"
    assert busy.headers["Retry-After"]
    asyncio.run(_finish(handling, done_elsewhere["update_id"]))  # that worker answered it
    assert deliver_until_accepted(fake.webhook_url, done_elsewhere) == [200]

    # The other worker died: Telegram's retries are refused until its claim expires.
    statuses = deliver_until_accepted(fake.webhook_url, died_elsewhere)
    assert set(statuses[:-1]) <= {503}
    fake.wait_text(8302, texts.HELP)
    assert [len(helps(fake, user)) for user in (8301, 8302)] == [0, 1]


async def _finish(store: DialogStore, update_id: int) -> None:
    try:
        await store.finish(update_id)
    finally:
        await store.aclose()


async def test_a_webhook_update_whose_handler_was_cut_off_is_answered_on_the_retry(
    webhook_registered: BotEnv, short_claims: None
) -> None:
    fake = webhook_registered.fake
    fake.hold_replies({8401})
    update = fake.text_update(8401, "/help")
    headers = {"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET}
    async with httpx.AsyncClient(timeout=60) as client:
        request = asyncio.ensure_future(client.post(fake.webhook_url, json=update, headers=headers))
        await asyncio.to_thread(
            fake.wait_for, lambda c: c.chat_id == 8401 and c.method == "sendMessage"
        )
        # Telegram gives up waiting and hangs up while the handler is mid-reply: Django
        # cancels the view, the handler dies after the update was claimed.
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.to_thread(fake.wait_hung_up, 8401)  # the handler is gone
    fake.release_replies()
    statuses = await asyncio.to_thread(deliver_until_accepted, fake.webhook_url, update)
    await asyncio.to_thread(fake.wait_for, lambda c: len(helps(fake, 8401)) >= 2)
    assert set(statuses[:-1]) <= {503}
    # The reply the first attempt had sent, and the retry's: at most one duplicate.
    assert len(helps(fake, 8401)) == 2


# --- several processes --------------------------------------------------------------------


def test_updates_in_flight_when_the_active_poller_is_killed_are_answered_by_the_standby(
    bot_env: BotEnv, tmp_path: Path
) -> None:
    fake = bot_env.fake
    runtime.service_token_sync()  # the service identity both processes will call with
    env = {"DOCBOT_POLL_LEASE_SECONDS": str(LEASE_TTL), "DOCBOT_UPDATE_CLAIM_SECONDS": str(CLAIM)}
    users = list(range(8500, 8508))
    held = {8501, 8504, 8506}  # in flight at the kill, with finished updates after them
    fake.hold_replies(held, caller="first")
    with ExitStack() as stack:
        stack.callback(fake.release_replies)
        first = stack.enter_context(poller(bot_env, "first", tmp_path, **env))
        first.wait_said("docbot_polling_active", START_SECONDS)
        second = stack.enter_context(poller(bot_env, "second", tmp_path, **env))
        second.wait_said("docbot_polling_standby", START_SECONDS)

        ids = {user: fake.push(fake.text_update(user, "/help"))["update_id"] for user in users}
        for user in users:
            fake.wait_text(user, texts.HELP, timeout=60)  # held ones: mid-reply
        last = max(c.at for c in fake.sent("sendMessage"))
        wait_until(lambda: polled_after(fake, last + 0.5), 60, "the active poller polled again")
        confirmed_before_kill = highest_offset(fake)
        first.kill()
        fake.release_replies()

        # The standby takes over, fetches what was not confirmed, and answers the updates
        # whose claims expired with the killed poller.
        for user in sorted(held):
            wait_until(
                lambda user=user: helps(fake, user, caller="second"),
                LEASE_TTL + CLAIM + 60,
                f"{user} answered by the standby",
            )
        assert second.stop() == 0  # finishes what it handles, then exits

    assert confirmed_before_kill <= min(ids[user] for user in held)
    assert fake.overlaps == []
    counts = {user: len(helps(fake, user)) for user in users}
    assert {user: counts[user] for user in held} == {user: 2 for user in held}
    for user in set(users) - held:
        if store_is_shared() or ids[user] < min(ids[u] for u in held):
            assert counts[user] == 1, counts
        else:
            # Per-process dedupe (embedded): finished but unconfirmed at the kill, so the
            # standby cannot know it was answered.
            assert counts[user] <= 2, counts


def post_once(url: str, update: dict[str, Any]) -> None:
    """One delivery whose fate does not matter (its server is killed while it waits)."""
    headers = {"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET}
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(url, json=update, headers=headers, timeout=120)


@pytest.mark.needs_redis
def test_a_webhook_update_whose_process_was_killed_mid_reply_is_answered_on_a_retry(
    webhook_registered: BotEnv,
) -> None:
    fake = webhook_registered.fake
    runtime.service_token_sync()
    fake.hold_replies({8601}, caller="a")

    def node(label: str) -> AbstractContextManager[Node]:
        variables = bot_variables(
            webhook_registered,
            label,
            DOCBOT_MODE="webhook",
            TELEGRAM_WEBHOOK_SECRET=WEBHOOK_SECRET,
            DOCBOT_UPDATE_CLAIM_SECONDS=str(CLAIM),
        )
        return asgi_process(os.environ["REDIS_URL"], **variables)

    update = fake.text_update(8601, "/help")
    with node("a") as a, node("b") as b:
        first = threading.Thread(
            target=post_once, args=(f"{a.http_url}/docbot/webhook", update), daemon=True
        )
        first.start()
        fake.wait_for(lambda c: c.chat_id == 8601 and c.caller == "a", timeout=60)
        a.process.kill()  # mid-reply: the update is claimed, not done
        a.process.wait()
        fake.release_replies()
        statuses = deliver_until_accepted(f"{b.http_url}/docbot/webhook", update)
        fake.wait_for(lambda c: bool(helps(fake, 8601, caller="b")), timeout=30)
        assert deliver_until_accepted(f"{b.http_url}/docbot/webhook", update) == [200]

    assert set(statuses[:-1]) <= {503}
    assert len(helps(fake, 8601)) == 2
