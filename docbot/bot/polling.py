"""The tolerant getUpdates loop (input-policy.md, "A poison input hurts only itself").

python-telegram-bot's Updater parses a whole getUpdates batch at once: one update it cannot
parse fails the batch, the offset never moves, and the same batch is fetched again at once,
forever. Here the batch is fetched raw (through PTB's own HTTP stack), each update is parsed on
its own by `update_parse`, and an update that is refused is logged and skipped (finished: it
is confirmed like a handled one). Failures back off exponentially (a `RetryAfter` waits as long
as Telegram says) and every wait ends as soon as `stop` is set.

Delivery is at-least-once: a getUpdates offset confirms an update to Telegram for good, so the
offset never passes an update that is not finished here (`Offsets`: 1 + the highest fetched id
such that it and every fetched id before it are handled or deliberately dropped). Updates are
handled concurrently (`handle`, one task each); one still running, or left for later because
another process holds its claim (`DialogStore.admit` says `busy`), holds the offset back, and
the next getUpdates returns it again: it is not handed over twice here (a `busy` one is, once
its claim may have expired), and the poller polls again as soon as the offset can move, or
after `busy_interval`, instead of long-polling. A poller that dies leaves what it had not
finished unconfirmed: whichever poller polls next fetches it again.

Polling is single-active across processes (`PollLease`): a poller calls getUpdates only while it
holds the bot's lease, renewing it every third of its TTL in the background; the others stand by
(logged once, `docbot_polling_standby`) and claim it every fifth of the TTL, so one takes over
within TTL + TTL/5 of a poller's death. A poller that cannot renew gives up a third of the TTL
before the lease can expire: its getUpdates in flight is cancelled and it calls getUpdates no more
until it holds the lease again, so two getUpdates loops never overlap. A stopping poller lets the
updates it handed over finish (still renewing the lease), confirms them and releases the lease,
so a standby takes over at once."""

import asyncio
import contextlib
import json
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog
from telegram import Bot, Update
from telegram.error import InvalidToken, RetryAfter
from telegram.warnings import PTBUserWarning

from common import parsers
from common.parsers import InvalidValue
from docbot import metrics
from docbot.bot.updates import ALLOWED_UPDATES, update_id_of, update_parse

logger = structlog.get_logger(__name__)


class _NotABatch(Exception):
    """getUpdates answered something other than a list of updates."""


#: Handles one update to the end; True when it is finished (handled, or deliberately dropped),
#: False when it must be delivered again later (`busy`: being handled elsewhere).
UpdateHandle = Callable[[Update], Awaitable[bool]]


@dataclass(frozen=True)
class PollPolicy:
    """`timeout`: long-poll seconds; `interval`: pause between successful polls; failures wait
    `retry_first` seconds, doubling up to `retry_max`; while a fetched update is unfinished
    (getUpdates would return it at once), the next poll comes when the offset can move, or after
    `busy_interval` seconds."""

    timeout: int = 10
    interval: float = 0.0
    retry_first: float = 0.5
    retry_max: float = 30.0
    busy_interval: float = 0.5


_State = Literal["running", "later", "done"]


class Offsets:
    """Which fetched updates are finished, and the getUpdates offset that confirms exactly
    those: 1 + the highest fetched update id such that it and every fetched update before it are
    finished. Update ids are tracked from the batch that brought them until that offset passes
    them. One event loop's (not thread-safe)."""

    def __init__(self) -> None:
        self._states: dict[int, _State] = {}
        self._next: int | None = None

    @property
    def next(self) -> int | None:
        """The offset for the next getUpdates (None: nothing fetched yet, ask from the oldest
        unconfirmed update)."""
        return self._next

    @property
    def waiting(self) -> bool:
        """True while a fetched update is unfinished: a getUpdates from `next` returns at once."""
        return bool(self._states)

    def fetched(self, update_id: int) -> bool:
        """Note `update_id` in a batch; True when it is to be handled now (new, or left for
        later), False when it is running or finished here already."""
        if self._next is not None and update_id < self._next:
            return False
        if self._states.get(update_id) in {"running", "done"}:
            return False
        self._states[update_id] = "running"
        return True

    def finished(self, update_id: int, done: bool) -> bool:
        """Record how a handed-over update ended: `done`, or to be handled again when fetched
        again. True when `next` moved on."""
        if update_id not in self._states:
            return False
        self._states[update_id] = "done" if done else "later"
        moved = False
        for tracked in sorted(self._states):
            if self._states[tracked] != "done":
                break
            del self._states[tracked]
            self._next = tracked + 1
            moved = True
        return moved

    def restart(self) -> None:
        """A new lease term: another poller may have confirmed anything meanwhile, so the offset
        is unknown again and only the updates still running here are remembered."""
        self._states = {k: v for k, v in self._states.items() if v == "running"}
        self._next = None


class PollLease(Protocol):
    """The right to call getUpdates for one bot, held by at most one poller at a time."""

    @property
    def ttl(self) -> float:
        """Seconds a claim holds the lease, counted from when the claim was sent."""
        ...

    async def claim(self) -> bool:
        """Take the lease when free or expired, or renew it when held; True when held now.
        Raises on transport errors (treated as "not renewed")."""
        ...

    async def release(self) -> None:
        """Give the lease up if held (a standby then takes it at its next claim)."""
        ...


class Backoff:
    """Exponential waits for consecutive failures; `reset()` after a success."""

    def __init__(self, first: float, maximum: float) -> None:
        self._first = first
        self._maximum = maximum
        self._next = first

    def reset(self) -> None:
        self._next = self._first

    def take(self) -> float:
        delay = self._next
        self._next = min(self._maximum, self._next * 2)
        return delay


async def pause(stop: asyncio.Event, seconds: float) -> None:
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)


async def _until_stopped(stop: asyncio.Event, call: Any) -> Any:
    """The result of the coroutine `call`, or None when `stop` is set first (call cancelled)."""
    task = asyncio.ensure_future(call)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return None
    return task.result()


async def fetch_raw(bot: Bot, offset: int | None, long_poll: int) -> list[Any]:
    """One getUpdates call (`long_poll` seconds at most): the raw items of the batch (JSON
    values, not parsed yet)."""
    api_kwargs: dict[str, Any] = {"timeout": long_poll, "allowed_updates": list(ALLOWED_UPDATES)}
    if offset is not None:
        api_kwargs["offset"] = offset
    # `do_api_request` is PTB's public way to get a method's raw JSON (its `get_updates` parses
    # the batch as a whole, which is the problem); it warns that `get_updates` exists. Set on
    # every call because the filter list may have been reset (pytest does, per test); an
    # identical filter replaces the previous one.
    warnings.filterwarnings(
        "ignore", message=r"Please use 'Bot\.getUpdates'", category=PTBUserWarning
    )
    result = await bot.do_api_request(
        "getUpdates", api_kwargs=api_kwargs, read_timeout=long_poll + 10.0
    )
    if not isinstance(result, list):
        raise _NotABatch(f"getUpdates returned {type(result).__name__}, not a list")
    return result


async def _set_on_first(target: asyncio.Event, *events: asyncio.Event) -> None:
    """Set `target` as soon as one of `events` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    target.set()


class Poller:
    """Hands each fetched update to `handle` (a task each) until `stop`, while it holds `lease`
    (None: the only poller by construction, e.g. of the in-process sandbox), confirming only
    finished updates (`Offsets`). `run` returns once every update it handed over has finished."""

    def __init__(
        self,
        bot: Bot,
        handle: UpdateHandle,
        policy: PollPolicy,
        *,
        mode: str = "polling",
        lease: PollLease | None = None,
    ) -> None:
        self.bot = bot
        self.handle = handle
        self.policy = policy
        self.mode = mode
        self.lease = lease
        self.offsets = Offsets()
        self._tasks: set[asyncio.Task[None]] = set()
        self._moved = asyncio.Event()  # the offset moved on since the last poll began
        self._backoff = Backoff(policy.retry_first, policy.retry_max)
        self._held_until = 0.0  # loop time the lease may expire at, as of the last claim
        self._claims_failing = False

    async def run(self, stop: asyncio.Event) -> None:
        try:
            if self.lease is None:
                await self._serve(stop)
                await self._drain(None)
                await self._confirm()
                return
            try:
                while await self._lease_take(stop):
                    await self._hold(stop)
            finally:
                await self._lease_release()
        finally:
            # Updates still running after the lease was lost finish before the application
            # stops; the next holder fetches them again (done by then, or claimed: `busy`).
            await self._drain(None)

    async def _hold(self, stop: asyncio.Event) -> None:
        """One lease term: poll until `stop` or the lease is lost; on `stop`, let the updates
        handed over finish while the lease is still renewed, then confirm them if the lease
        still safely allows a getUpdates."""
        lost, halt = asyncio.Event(), asyncio.Event()
        keeper = asyncio.ensure_future(self._lease_keep(lost))
        linker = asyncio.ensure_future(_set_on_first(halt, stop, lost))
        try:
            self.offsets.restart()
            await self._serve(halt)
            if not lost.is_set():
                await self._drain(lost)
            if not lost.is_set() and self._lease_left():
                await self._confirm()
        finally:
            for task in (keeper, linker):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if lost.is_set():
            logger.warning("docbot_polling_lease_lost")

    async def _serve(self, halt: asyncio.Event) -> None:
        """Poll until `halt`."""
        await self._bootstrap(halt)
        while not halt.is_set():
            delay = await self._poll_once(halt)
            if delay is None:
                await self._settle(halt)
            else:
                await pause(halt, delay)

    async def _settle(self, halt: asyncio.Event) -> None:
        """Wait until the offset can move (an update finished), `busy_interval` or `halt`."""
        waiter = asyncio.ensure_future(self._moved.wait())
        try:
            await _until_stopped(halt, asyncio.wait_for(waiter, self.policy.busy_interval))
        except TimeoutError:
            pass
        finally:
            waiter.cancel()

    async def _drain(self, lost: asyncio.Event | None) -> None:
        """Wait until every update handed over has finished (or `lost` is set)."""
        if not self._tasks:
            return
        finished = asyncio.ensure_future(asyncio.wait(set(self._tasks)))
        if lost is None:
            await finished
            return
        await _until_stopped(lost, finished)

    # --- the lease ------------------------------------------------------------------------

    def _lease_left(self) -> bool:
        """True while the lease is certainly ours for more than a third of its TTL."""
        assert self.lease is not None
        margin = self.lease.ttl / 3
        return asyncio.get_running_loop().time() < self._held_until - margin

    async def _lease_claim(self, within: float) -> bool | None:
        """One claim, given up after `within` seconds; True/False, None when it failed or took
        too long. Moves `_held_until` on success."""
        assert self.lease is not None
        sent = asyncio.get_running_loop().time()
        try:
            held = await asyncio.wait_for(self.lease.claim(), within)
        except Exception as exc:
            if not self._claims_failing:  # once per outage, not once per claim
                logger.warning("docbot_polling_lease_unavailable", error=repr(exc)[:300])
                self._claims_failing = True
            return None
        if self._claims_failing:
            logger.info("docbot_polling_lease_available")
            self._claims_failing = False
        if held:
            self._held_until = sent + self.lease.ttl
        return held

    async def _lease_take(self, stop: asyncio.Event) -> bool:
        """Wait as standby until the lease is ours (True) or `stop` (False)."""
        assert self.lease is not None
        said = False
        while not stop.is_set():
            if await self._lease_claim(self.lease.ttl / 3):
                logger.info("docbot_polling_active", ttl=self.lease.ttl)
                return True
            if not said:
                logger.info("docbot_polling_standby", retry_every=self.lease.ttl / 5)
                said = True
            await pause(stop, self.lease.ttl / 5)
        return False

    async def _lease_keep(self, lost: asyncio.Event) -> None:
        """Renew every third of the TTL until cancelled; set `lost` when another holder has the
        lease, or when renewals failed until only a third of the TTL is left (a renewal is given
        up at that moment too, however slow the store is)."""
        assert self.lease is not None
        loop = asyncio.get_running_loop()
        margin = self.lease.ttl / 3
        while True:
            await asyncio.sleep(max(0.0, min(margin, self._held_until - margin - loop.time())))
            give_up_in = self._held_until - margin - loop.time()
            if give_up_in <= 0:
                break
            if await self._lease_claim(min(margin, give_up_in)) is False or not self._lease_left():
                break
        lost.set()

    async def _lease_release(self) -> None:
        if self.lease is None or self._held_until == 0.0:
            return
        self._held_until = 0.0
        try:
            await self.lease.release()
        except Exception as exc:  # it expires within the TTL anyway
            logger.warning("docbot_polling_lease_release_failed", error=repr(exc)[:300])

    async def _bootstrap(self, stop: asyncio.Event) -> None:
        """Remove a registered webhook (Telegram refuses getUpdates while one is set), retrying
        with the same backoff until it works or `stop` is set."""
        while not stop.is_set():
            try:
                await _until_stopped(stop, self.bot.delete_webhook(drop_pending_updates=False))
            except InvalidToken:
                logger.error("docbot_polling_invalid_token")
                raise
            except Exception as exc:
                await pause(stop, self._failed(exc))
                continue
            self._backoff.reset()
            return

    async def _poll_once(self, stop: asyncio.Event) -> float | None:
        """Fetch and hand over one batch; returns how long to wait before the next poll (None:
        until the offset can move, `_settle`)."""
        self._moved.clear()
        try:
            batch = await _until_stopped(
                stop, fetch_raw(self.bot, self.offsets.next, self.policy.timeout)
            )
        except InvalidToken:
            logger.error("docbot_polling_invalid_token")
            raise
        except RetryAfter as exc:
            retry_after = exc.retry_after
            seconds = (
                retry_after if isinstance(retry_after, int | float) else retry_after.total_seconds()
            )
            logger.warning("docbot_polling_retry_after", seconds=seconds)
            return float(seconds) + 0.5
        except Exception as exc:  # Telegram, transport or library: the loop must survive it
            return self._failed(exc)
        if batch is None:  # stopped
            return 0.0
        if batch and not self._hand_over(batch):
            return self._failed(_NotABatch("no update in the batch has a usable update_id"))
        self._backoff.reset()
        if self.offsets.waiting and not self._moved.is_set():
            return None
        return self.policy.interval

    def _failed(self, exc: BaseException) -> float:
        delay = self._backoff.take()
        logger.warning("docbot_polling_failed", error=repr(exc)[:500], retry_in=delay)
        return delay

    def _hand_over(self, batch: list[Any]) -> bool:
        """Hand every update of the batch that parses and is new here (or left for later) to
        `handle`; one that is refused is logged and finished. False when nothing in a non-empty
        batch has a usable id (nothing in it can ever be confirmed)."""
        usable = False
        for item in batch:
            update_id = update_id_of(item)
            if update_id is not None:
                usable = True
                if not self.offsets.fetched(update_id):
                    continue  # running or finished here already: fetched again, not redone
            try:
                # The same judgement as a webhook body: NUL or a lone surrogate anywhere refuses
                # the update (PTB's JSON decoder let them through).
                parsers.json_document(json.dumps(item), field="update")
                update: Update = update_parse(item, self.bot)
            except InvalidValue as exc:
                metrics.UPDATES.labels(self.mode, "refused").inc()
                logger.warning(
                    "docbot_update_refused",
                    request_id=f"tg-{update_id}" if update_id is not None else None,
                    update_id=update_id,
                    field=exc.field,
                    reason=exc.reason,
                )
                if update_id is not None:
                    self._finished(update_id, True)
                continue
            # `update_parse` accepted it, so it has the same usable id.
            task = asyncio.ensure_future(self._handle_one(update.update_id, update))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return usable

    async def _handle_one(self, update_id: int, update: Update) -> None:
        try:
            done = await self.handle(update)
        except Exception as exc:  # under the bot's catch-all: logged and dropped, never redone
            logger.error("docbot_update_failed", update_id=update_id, exc_info=exc)
            done = True
        self._finished(update_id, done)

    def _finished(self, update_id: int, done: bool) -> None:
        if self.offsets.finished(update_id, done):
            self._moved.set()

    async def _confirm(self) -> None:
        """Tell Telegram the finished updates are done (`Offsets.next`), so a restart does not
        fetch them again (PTB's Updater does the same on stop)."""
        if self.offsets.next is None:
            return
        try:
            await fetch_raw(self.bot, self.offsets.next, 0)
        except Exception as exc:
            logger.warning("docbot_polling_confirm_failed", error=repr(exc)[:500])
