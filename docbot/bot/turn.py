"""One update's turn through the dialog: the bot's dependencies, and what the bot already said
while handling that update, so a button press is answered exactly once and a failure is
replied to at most once, whichever path (action, middleware, catch-all) got there first."""

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
    callback_answered: bool = False
    failure_told: bool = False


# One per update: the middleware starts it; the handlers and the catch-all of that update run
# in the same asyncio task (python-telegram-bot awaits them in turn), so they all see it.
_TURN: ContextVar[Turn | None] = ContextVar("docbot_turn", default=None)


def turn_start() -> Turn:
    turn = Turn()
    _TURN.set(turn)
    return turn


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
