"""One update's turn through the dialog: the bot's dependencies, what the bot already said
while handling that update, so a button press is answered exactly once and a failure is
replied to at most once, whichever path (action, middleware, catch-all) got there first, and
what the middleware's admission decided (the delivery, `application.update_handle`, marks a
claimed update done afterwards, or reports a busy one as not finished)."""

from contextvars import ContextVar
from dataclasses import dataclass

from telegram import CallbackQuery
from telegram.ext import ContextTypes

from docbot.bot.backend import Backend
from docbot.bot.state import DialogStore


@dataclass(frozen=True)
class BotConfig:
    mode: str = "polling"
    flood_max_per_second: int = 5
    max_file_bytes: int = 20 * 1024 * 1024


@dataclass
class Turn:
    update_id: int | None = None
    callback_answered: bool = False
    failure_told: bool = False
    #: this delivery claimed the update (it must be marked done once handled)
    claimed: bool = False
    #: the update is being handled elsewhere: not handled here, to be delivered again later
    busy: bool = False


# One per update: the delivery (or else the middleware) starts it; the handlers and the
# catch-all of that update run in the same asyncio task (python-telegram-bot awaits them in
# turn), so they all see it.
_TURN: ContextVar[Turn | None] = ContextVar("docbot_turn", default=None)


def turn_start(update_id: int | None = None) -> Turn:
    turn = Turn(update_id=update_id)
    _TURN.set(turn)
    return turn


def turn_of(update_id: int) -> Turn:
    """The turn the delivery started for `update_id`, or a new one (an update handed to the
    application some other way)."""
    current = _TURN.get()
    if current is not None and current.update_id == update_id:
        return current
    return turn_start(update_id)


def turn() -> Turn:
    current = _TURN.get()
    return current if current is not None else turn_start()


async def answer(query: CallbackQuery, text: str | None = None) -> None:
    """Answer the button press unless this update already did (never twice, even when the
    first answer failed in transit)."""
    current = turn()
    if current.callback_answered:
        return
    current.callback_answered = True
    await query.answer(text)


def deps(context: ContextTypes.DEFAULT_TYPE) -> tuple[Backend, DialogStore, BotConfig]:
    data = context.bot_data
    return data["backend"], data["store"], data["config"]
