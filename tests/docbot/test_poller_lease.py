"""Polling is single-active (issue 15): two real `run_docbot --mode polling` processes against
the Bot API stand-in; one holds the polling lease and calls getUpdates, the other stands by. A
SIGKILLed poller's lease expires within its TTL and the standby takes over; every update is
answered exactly once and two getUpdates are never in flight at once. The lease is Redis's with
REDIS_URL, the database's without (both runs)."""

import asyncio
import logging
import signal
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import pytest

from docbot import runtime
from tests.docbot.conftest import BotEnv, PollingBot
from tests.docbot.fake_telegram import FakeTelegram
from tests.docbot.processes import START_SECONDS, Poller, poller

pytestmark = [pytest.mark.timeout(300), pytest.mark.django_db(transaction=True)]

TTL = 6.0
HELP = "Add document: pick"


def lease_poller(env: BotEnv, label: str, log_dir: Path) -> AbstractContextManager[Poller]:
    return poller(env, label, log_dir, DOCBOT_POLL_LEASE_SECONDS=str(TTL))


def helps(fake: FakeTelegram, user_id: int) -> int:
    return len([c for c in fake.sent("sendMessage", chat_id=user_id) if HELP in c.text])


def ask(fake: FakeTelegram, user_id: int, within: float = 30) -> int:
    """A /help from `user_id`, answered within `within` seconds; its update id."""
    since = fake.mark()
    update = fake.push(fake.text_update(user_id, "/help"))
    fake.wait_text(user_id, HELP, timeout=within, since=since)
    return int(update["update_id"])


def confirmed(fake: FakeTelegram, update_id: int, within: float = 30) -> None:
    """Wait until a getUpdates has confirmed `update_id` (asked for an offset past it)."""
    deadline = time.monotonic() + within
    while not any(offset > update_id for _, offset in list(fake.polls)):
        assert time.monotonic() < deadline, "the update was never confirmed"
        time.sleep(0.05)


def test_one_poller_polls_the_other_stands_by_and_takes_over_when_it_is_killed(
    bot_env: BotEnv, tmp_path: Path
) -> None:
    fake = bot_env.fake
    runtime.service_token_sync()  # the service identity both processes will call with
    with ExitStack() as stack:
        first = stack.enter_context(lease_poller(bot_env, "first", tmp_path))
        first.wait_said("docbot_polling_active", START_SECONDS)
        second = stack.enter_context(lease_poller(bot_env, "second", tmp_path))
        second.wait_said("docbot_polling_standby", START_SECONDS)

        users = list(range(7100, 7110))
        last = max([ask(fake, user_id) for user_id in users])
        confirmed(fake, last)  # so the kill leaves nothing handled but unconfirmed
        assert set(fake.pollers) == {"first"}
        polled_before_kill = len(fake.pollers)

        first.process.kill()  # SIGKILL: the lease is neither renewed nor released
        first.process.wait()
        killed_at = time.monotonic()
        # Asked while nobody polls: kept by Telegram, answered once the standby has taken over.
        late = 7200
        ask(fake, late, within=TTL + TTL / 5 + 30)
        second.wait_said("docbot_polling_active", 1)
        took = time.monotonic() - killed_at
        print(f"standby answered {took:.2f} s after the kill (TTL {TTL} s)")

        second.process.send_signal(signal.SIGTERM)  # finishes what it handles, then exits
        assert second.process.wait(30) == 0

    assert [helps(fake, user_id) for user_id in [*users, late]] == [1] * (len(users) + 1)
    assert set(fake.pollers[polled_before_kill:]) <= {"first", "second"}
    assert "first" not in fake.pollers[fake.pollers.index("second") :]
    assert fake.overlaps == []


def test_a_stopped_poller_hands_the_lease_over_at_once(bot_env: BotEnv, tmp_path: Path) -> None:
    runtime.service_token_sync()
    with lease_poller(bot_env, "first", tmp_path) as first:
        first.wait_said("docbot_polling_active", START_SECONDS)
        with lease_poller(bot_env, "second", tmp_path) as second:
            second.wait_said("docbot_polling_standby", START_SECONDS)
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(30) == 0
            # Released, not expired: the standby's next claim (a fifth of the TTL) takes it.
            second.wait_said("docbot_polling_active", TTL / 5 + 5)
            ask(bot_env.fake, 7300)
    assert helps(bot_env.fake, 7300) == 1
    assert bot_env.fake.overlaps == []


class LeaseStore:
    """A lease whose store can be cut off (`available = False`): every claim then fails at once
    (`outage` "refused") or never answers ("hangs"). Records when the last claim that succeeded
    was sent (monotonic)."""

    ttl = TTL

    def __init__(self, outage: str) -> None:
        self.outage = outage
        self.available = True
        self.last_held_at = 0.0

    async def claim(self) -> bool:
        sent = time.monotonic()
        if not self.available:
            if self.outage == "hangs":
                await asyncio.Event().wait()
            raise ConnectionError("lease store unreachable")
        self.last_held_at = sent
        return True

    async def release(self) -> None:
        return None


@pytest.mark.parametrize("outage", ["refused", "hangs"])
def test_a_poller_that_cannot_renew_stops_polling_before_its_lease_can_expire(
    bot_env: BotEnv, caplog: pytest.LogCaptureFixture, outage: str
) -> None:
    caplog.set_level(logging.INFO)
    fake, lease = bot_env.fake, LeaseStore(outage)
    bot = PollingBot(bot_env.config("polling"), lease=lease).start()
    try:
        ask(fake, 7400)
        lease.available = False
        wait_logged(caplog, "docbot_polling_lease_lost", TTL + 5)
        expiry = lease.last_held_at + TTL  # from then on another poller could hold it
        wait_logged(caplog, "docbot_polling_standby", TTL)
        while time.monotonic() <= expiry:  # the moment under test, not a guess at a delay
            time.sleep(0.05)
        # Standby while the store is down: every getUpdates was over before the lease could
        # expire, and none is in flight past it.
        with fake._changed:
            assert fake.polls_in_flight.get("", 0) == 0
            assert all(end < expiry for _, _, end in fake.poll_spans), (expiry, fake.poll_spans)

        lease.available = True
        ask(fake, 7401)  # polling again once the lease is held again
        assert [helps(fake, 7400), helps(fake, 7401)] == [1, 1]
    finally:
        bot.stop()


def wait_logged(caplog: pytest.LogCaptureFixture, event: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not any(
        isinstance(r.msg, dict) and r.msg.get("event") == event for r in list(caplog.records)
    ):
        assert time.monotonic() < deadline, f"no {event} within {within} s"
        time.sleep(0.05)
