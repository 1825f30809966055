"""The tolerant getUpdates loop (input-policy.md, "A poison input hurts only itself").

python-telegram-bot's Updater parses a whole getUpdates batch at once: one update it cannot
parse fails the batch, the offset never moves, and the same batch is fetched again at once,
forever. Here the batch is fetched raw (through PTB's own HTTP stack), each update is parsed on
its own by `update_parse`, an update that is refused is logged and skipped, and the offset
always moves past every update with a usable id. Failures back off exponentially (a
`RetryAfter` waits as long as Telegram says) and every wait ends as soon as `stop` is set."""

import asyncio
import contextlib
import json
import warnings
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class PollPolicy:
    """`timeout`: long-poll seconds; `interval`: pause between successful polls; failures wait
    `retry_first` seconds, doubling up to `retry_max`."""

    timeout: int = 10
    interval: float = 0.0
    retry_first: float = 0.5
    retry_max: float = 30.0


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


class Poller:
    """Feeds parsed updates into `queue` (the Application's update queue) until `stop`."""

    def __init__(
        self, bot: Bot, queue: "asyncio.Queue[object]", policy: PollPolicy, *, mode: str = "polling"
    ) -> None:
        self.bot = bot
        self.queue = queue
        self.policy = policy
        self.mode = mode
        self.offset: int | None = None
        self._backoff = Backoff(policy.retry_first, policy.retry_max)

    async def run(self, stop: asyncio.Event) -> None:
        await self._bootstrap(stop)
        while not stop.is_set():
            delay = await self._poll_once(stop)
            await pause(stop, delay)
        await self._confirm()

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

    async def _poll_once(self, stop: asyncio.Event) -> float:
        """Fetch and hand over one batch; returns how long to wait before the next poll."""
        try:
            batch = await _until_stopped(
                stop, fetch_raw(self.bot, self.offset, self.policy.timeout)
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
        if batch and not await self._hand_over(batch):
            return self._failed(_NotABatch("no update in the batch has a usable update_id"))
        self._backoff.reset()
        return self.policy.interval

    def _failed(self, exc: BaseException) -> float:
        delay = self._backoff.take()
        logger.warning("docbot_polling_failed", error=repr(exc)[:500], retry_in=delay)
        return delay

    async def _hand_over(self, batch: list[Any]) -> bool:
        """Queue every update of the batch that parses, skip the others; move the offset past
        every usable id. False when nothing in a non-empty batch could be confirmed."""
        confirmed = False
        for item in batch:
            update_id = update_id_of(item)
            if update_id is not None:
                self.offset = max(self.offset or 0, update_id + 1)
                confirmed = True
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
                continue
            await self.queue.put(update)
        return confirmed

    async def _confirm(self) -> None:
        """Tell Telegram the updates handed over are done, so a restart does not fetch them
        again (PTB's Updater does the same on stop)."""
        if self.offset is None:
            return
        try:
            await fetch_raw(self.bot, self.offset, 0)
        except Exception as exc:
            logger.warning("docbot_polling_confirm_failed", error=repr(exc)[:500])
