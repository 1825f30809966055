"""The dialog: thin handlers that parse the update, call the backend, answer the user.

State lives in the shared DialogStore (not in python-telegram-bot's per-process memory), so any
worker can serve any step. The update policy (input-policy.md) is applied once, by
`middleware`: only private chats with their user reach the dialog; a group is told once to use
a private chat; channel posts, edits and other update kinds are ignored silently. Everything the
user typed or tapped is parsed by the shared parsers before use. Failures become replies in
exactly one place: `on_error`, the bot's catch-all. Buttons live in `buttons.py`."""

from typing import Any

import structlog
from telegram import (
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    KeyboardButton,
    Message,
    ReplyKeyboardMarkup,
    Update,
)
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    ApplicationHandlerStop,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)

from common import parsers
from common.console import console_count
from common.parsers import InvalidValue
from docbot import metrics, schemas, texts
from docbot.bot.backend import Backend, BackendError
from docbot.bot.buttons import PAGE_SIZE, on_callback
from docbot.bot.state import DialogStore
from docbot.bot.turn import answer, deps, turn, turn_of, turn_start
from docbot.bot.updates import Route, route

logger = structlog.get_logger(__name__)

TYPE_NAME_MAX = 64
DOCUMENT_NAME_MAX = 128
SEARCH_MAX = 128
_TYPED_MAX = 4096  # a message text's own limit; the step's limit is checked after cleaning

MENU = ReplyKeyboardMarkup(
    [[KeyboardButton(texts.MENU_ADD), KeyboardButton(texts.MENU_BROWSE)]], resize_keyboard=True
)
# Belt and braces behind the middleware: handlers only ever see new messages in private chats.
PRIVATE_MESSAGES = filters.ChatType.PRIVATE & filters.UpdateType.MESSAGE


def _typed(text: str, *, limit: int, invalid: str) -> tuple[str, str | None]:
    """What the user typed as a one-line value: `(value, None)`, or `("", reply)` when it holds
    control characters, is empty or is longer than `limit` once whitespace is collapsed."""
    try:
        raw = parsers.text(text, field="text", max_length=_TYPED_MAX, min_length=0, multiline=True)
    except InvalidValue:
        return "", invalid
    value = " ".join(raw.split())
    if not value:
        return "", texts.NAME_EMPTY
    if len(value) > limit:
        return "", texts.NAME_TOO_LONG.format(limit=limit)
    return value, None


def _hint(state: dict[str, Any]) -> tuple[str, ReplyKeyboardMarkup | None]:
    """What the current step expects, said again when the user sent something else."""
    step = state.get("step")
    if step == "add_pick_type":
        return texts.ADD_PICK_TYPE_HINT, None
    if step == "add_type_name":
        return texts.ADD_ASK_TYPE_NAME, None
    if step == "add_doc_name":
        return texts.ADD_ASK_DOC_NAME.format(type=state.get("type_name", "")), None
    if step == "add_file":
        return texts.ADD_FILE_EXPECTED, None
    if step == "rename":
        return texts.RENAME_HINT, None
    if step == "search":
        return texts.SEARCH_ASK, None
    return texts.UNKNOWN_INPUT, MENU


async def _say_hint(message: Message, state: dict[str, Any]) -> None:
    text, markup = _hint(state)
    await message.reply_text(text, reply_markup=markup)


def _private(update: Update) -> tuple[Message, int]:
    """The message and its user id; `middleware` let only private chats with their user
    through, so replies to `message` go to that user's private chat."""
    message, user = update.effective_message, update.effective_user
    assert message is not None and user is not None
    return message, user.id


# --- middleware (group -1): correlation id, dedupe, update policy, flood control -----------

#: Message fields that carry a file (Bot API `Message`).
_FILE_FIELDS = (
    "document",
    "photo",
    "audio",
    "video",
    "voice",
    "video_note",
    "animation",
    "sticker",
    "paid_media",
)


def carries_file(update: Update) -> bool:
    """True for a message with any file attached: flood control never drops those."""
    message = update.message
    return message is not None and any(getattr(message, name, None) for name in _FILE_FIELDS)


async def middleware(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Runs first for every update: joins its turn, binds `tg-<update_id>`, claims the update
    (an update already done is dropped; one being handled elsewhere is left for a later
    delivery, `Turn.busy`), applies the update policy (`updates.route`) and flood control (a
    message carrying a file is never dropped by it), and stops (`ApplicationHandlerStop`)
    whatever the dialog must not see; a button press it stops is still answered, once."""
    if not isinstance(update, Update):
        turn_start()
        raise ApplicationHandlerStop
    current = turn_of(update.update_id)
    console_count("docbot.updates")
    _, store, config = deps(context)
    structlog.contextvars.bind_contextvars(request_id=f"tg-{update.update_id}")
    verdict = route(update)
    user = update.effective_user
    served_user = user.id if verdict is Route.SERVE and user is not None else None
    # Dedupe first, then (served updates only) the user's flood window: one round trip.
    flood = await store.admit(update.update_id, served_user, config.flood_max_per_second)
    if flood == "duplicate":
        metrics.UPDATES.labels(config.mode, "duplicate").inc()
        logger.info("docbot_update_duplicate", update_id=update.update_id)
        raise ApplicationHandlerStop
    if flood == "busy":
        current.busy = True
        metrics.UPDATES.labels(config.mode, "busy").inc()
        logger.info("docbot_update_busy", update_id=update.update_id)
        raise ApplicationHandlerStop
    current.claimed = True
    if verdict is not Route.SERVE:
        metrics.UPDATES.labels(config.mode, verdict.value).inc()
        logger.info("docbot_update_not_served", update_id=update.update_id, route=verdict.value)
        if verdict is Route.GROUP:
            await _tell_group_once(update, context, store)
        elif verdict is Route.STALE and update.callback_query is not None:
            await answer(update.callback_query, texts.STALE_BUTTON)
        raise ApplicationHandlerStop
    assert user is not None
    metrics.dialog_seen(user.id)
    if flood != "ok" and carries_file(update):
        # A file is the user's data, not noise: counted, never dropped (an album or several
        # files at once arrive as a burst of messages).
        metrics.UPDATES.labels(config.mode, "flood_file_kept").inc()
        flood = "ok"
    if flood != "ok":
        metrics.UPDATES.labels(config.mode, f"flood_{flood}").inc()
        if update.callback_query is not None:
            await answer(update.callback_query, texts.SLOW_DOWN)
        elif flood == "warn":
            await context.bot.send_message(user.id, texts.SLOW_DOWN)
        raise ApplicationHandlerStop
    metrics.UPDATES.labels(config.mode, "accepted").inc()
    logger.info("docbot_update", update_id=update.update_id)


async def _tell_group_once(
    update: Update, context: ContextTypes.DEFAULT_TYPE, store: DialogStore
) -> None:
    chat = update.effective_chat
    assert chat is not None
    if not await store.first_group_notice(chat.id):
        return
    try:
        await context.bot.send_message(chat.id, texts.PRIVATE_ONLY)
    except TelegramError as exc:  # removed from the group, muted...: nothing more to say
        logger.warning("docbot_group_notice_failed", chat_id=chat.id, error=repr(exc))


# --- commands -----------------------------------------------------------------------------


async def on_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    _, store, _ = deps(context)
    message, user_id = _private(update)
    await store.clear(user_id)
    await message.reply_text(texts.WELCOME, reply_markup=MENU)


async def on_help(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    message, _ = _private(update)
    await message.reply_text(texts.HELP, reply_markup=MENU)


async def on_cancel(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    _, store, _ = deps(context)
    message, user_id = _private(update)
    had_state = bool(await store.get(user_id))
    await store.clear(user_id)
    text = texts.CANCELLED if had_state else texts.NOTHING_TO_CANCEL
    await message.reply_text(text, reply_markup=MENU)


async def on_search(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    _, store, _ = deps(context)
    message, user_id = _private(update)
    if context.args:
        await _search(message, context, user_id, " ".join(context.args))
        return
    await store.set(user_id, {"step": "search"})
    await message.reply_text(texts.SEARCH_ASK)


# --- text input: menu buttons and the step the user is at ---------------------------------


async def on_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    backend, store, _ = deps(context)
    message, user_id = _private(update)
    text = message.text or ""
    if text == texts.MENU_ADD:
        await _add_start(message, backend, store, user_id)
        return
    if text == texts.MENU_BROWSE:
        await store.clear(user_id)
        await _browse_types(message, backend, user_id)
        return
    state = await store.get(user_id)
    step = state.get("step")
    if step == "add_type_name":
        await step_type_name(message, backend, store, user_id, text)
    elif step == "add_doc_name":
        await step_document_name(message, backend, store, user_id, state, text)
    elif step == "rename":
        await _rename(message, backend, store, user_id, state, text)
    elif step == "search":
        await store.clear(user_id)
        await _search(message, context, user_id, text)
    else:
        await _say_hint(message, state)


async def on_other(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Any other kind of message (voice, sticker, video note, location, an unknown command...):
    the current step's hint again; the step does not move."""
    _, store, _ = deps(context)
    message, user_id = _private(update)
    await _say_hint(message, await store.get(user_id))


async def _add_start(message: Message, backend: Backend, store: DialogStore, user_id: int) -> None:
    types = await backend.types(user_id, non_empty=False)
    await store.set(user_id, {"step": "add_pick_type"})
    rows = [
        [InlineKeyboardButton(t["name"], callback_data=schemas.callback_data("at", t["id"]))]
        for t in types
    ]
    rows.append(
        [InlineKeyboardButton(texts.ADD_NEW_TYPE_BUTTON, callback_data=schemas.callback_data("an"))]
    )
    await message.reply_text(texts.ADD_PICK_TYPE, reply_markup=InlineKeyboardMarkup(rows))


async def step_type_name(
    message: Message, backend: Backend, store: DialogStore, user_id: int, text: str
) -> None:
    name, problem = _typed(text, limit=TYPE_NAME_MAX, invalid=texts.NAME_INVALID)
    if problem:
        await message.reply_text(problem)
        return
    try:
        created = await backend.type_create(user_id, name=name)
    except BackendError as exc:
        if exc.code == "type_exists":
            await message.reply_text(texts.TYPE_TAKEN.format(name=name))
            return
        raise
    await store.set(
        user_id, {"step": "add_doc_name", "type_id": created["id"], "type_name": created["name"]}
    )
    await message.reply_text(texts.ADD_ASK_DOC_NAME.format(type=created["name"]))


async def step_document_name(
    message: Message,
    backend: Backend,
    store: DialogStore,
    user_id: int,
    state: dict[str, Any],
    text: str,
) -> None:
    """Validate the name (clean text, length, not taken within the type), then ask for the
    file."""
    name, problem = _typed(text, limit=DOCUMENT_NAME_MAX, invalid=texts.NAME_INVALID)
    if problem:
        await message.reply_text(problem)
        return
    taken = await backend.documents(user_id, type_id=state["type_id"], name=name, limit=1)
    if taken["results"]:
        await message.reply_text(texts.NAME_TAKEN.format(name=name, type=state["type_name"]))
        return
    await store.set(user_id, {**state, "step": "add_file", "name": name})
    await message.reply_text(texts.ADD_ASK_FILE.format(name=name))


async def _rename(
    message: Message,
    backend: Backend,
    store: DialogStore,
    user_id: int,
    state: dict[str, Any],
    text: str,
) -> None:
    name, problem = _typed(text, limit=DOCUMENT_NAME_MAX, invalid=texts.NAME_INVALID)
    if problem:
        await message.reply_text(problem)
        return
    try:
        document = await backend.document_update(user_id, state["document_id"], name=name)
    except BackendError as exc:
        if exc.code == "name_taken":
            await message.reply_text(texts.NAME_TAKEN.format(name=name, type="this type"))
            return
        raise
    await store.clear(user_id)
    await message.reply_text(texts.RENAMED.format(name=document["name"]), reply_markup=MENU)


async def _search(
    message: Message, context: ContextTypes.DEFAULT_TYPE, user_id: int, text: str
) -> None:
    backend, store, _ = deps(context)
    query, problem = _typed(text, limit=10 * SEARCH_MAX, invalid=texts.SEARCH_INVALID)
    if problem:
        await store.set(user_id, {"step": "search"})
        await message.reply_text(problem if problem == texts.SEARCH_INVALID else texts.SEARCH_ASK)
        return
    query = query[:SEARCH_MAX]
    page = await backend.documents(user_id, query=query, limit=PAGE_SIZE)
    if not page["results"]:
        await message.reply_text(texts.SEARCH_NONE.format(query=query), reply_markup=MENU)
        return
    rows = [
        [
            InlineKeyboardButton(
                f"{d['name']} ({d['type_name']})", callback_data=schemas.callback_data("d", d["id"])
            )
        ]
        for d in page["results"]
    ]
    await message.reply_text(
        texts.SEARCH_RESULTS.format(count=len(page["results"])),
        reply_markup=InlineKeyboardMarkup(rows),
    )


# --- files --------------------------------------------------------------------------------


async def on_file(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    backend, store, config = deps(context)
    message, user_id = _private(update)
    state = await store.get(user_id)
    if state.get("step") != "add_file":
        await _say_hint(message, state)
        return
    if message.document is not None:
        attachment: Any = message.document
        mime_type = schemas.mime_type_or_default(message.document.mime_type or "", "")
        try:
            file_name = parsers.text(
                message.document.file_name or "",
                field="file_name",
                max_length=schemas.FILE_NAME_MAX,
                min_length=0,
            )
        except InvalidValue:
            await message.reply_text(texts.FILE_NAME_INVALID)
            return
    elif message.photo:
        attachment = message.photo[-1]
        mime_type, file_name = "image/jpeg", ""
    else:
        await _say_hint(message, state)
        return
    if attachment.file_size and attachment.file_size > config.max_file_bytes:
        await message.reply_text(texts.ADD_FILE_TOO_LARGE)
        return
    # Cleared and said before the call: with eager tasks the worker's confirmation comes back
    # inside it, and the user may already be on the next dialog when it returns.
    await store.clear(user_id)
    await message.reply_text(texts.ADD_RECEIVED.format(name=state["name"]), reply_markup=MENU)
    # The file is recorded as received from this user, then the document names that record:
    # the backend never takes a Telegram file id or a chat id in a document request.
    received = await backend.file_received(
        user_id,
        file_id=attachment.file_id,
        file_unique_id=attachment.file_unique_id,
        size=attachment.file_size,
        mime_type=mime_type,
        file_name=file_name,
    )
    await backend.document_create(
        user_id, type_id=state["type_id"], name=state["name"], file=received["id"]
    )


# --- browse -------------------------------------------------------------------------------


async def _browse_types(message: Message, backend: Backend, user_id: int) -> None:
    types = await backend.types(user_id, non_empty=True)
    if not types:
        await message.reply_text(texts.BROWSE_EMPTY, reply_markup=MENU)
        return
    rows = [
        [
            InlineKeyboardButton(
                f"{t['name']} ({t['document_count']})",
                callback_data=schemas.callback_data("bt", t["id"]),
            )
        ]
        for t in types
    ]
    await message.reply_text(texts.BROWSE_PICK_TYPE, reply_markup=InlineKeyboardMarkup(rows))


# --- errors: the bot's one catch-all ------------------------------------------------------


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Every exception a handler (or the middleware) raised ends here, once per update: logged
    once with the update's correlation id, answered with a generic reply (a refusal's own
    message for the backend's 4xx) in the user's private chat only, never a second time, and
    no other handler runs after it."""
    error = context.error
    update_id = update.update_id if isinstance(update, Update) else None
    if update_id is not None:
        structlog.contextvars.bind_contextvars(request_id=f"tg-{update_id}")
    text = texts.FAILED
    if isinstance(error, BackendError) and 400 <= error.status < 500:
        if error.status == 404:
            text = texts.STALE_BUTTON
        elif error.status not in {401, 403}:
            text = error.message
        logger.warning(
            "docbot_backend_refused", update_id=update_id, status=error.status, code=error.code
        )
    else:
        logger.error("docbot_handler_failed", update_id=update_id, exc_info=error)
    if isinstance(update, Update):
        await _tell_failure(update, context, text)
    raise ApplicationHandlerStop


async def _tell_failure(update: Update, context: ContextTypes.DEFAULT_TYPE, text: str) -> None:
    current = turn()
    if current.failure_told:
        return
    current.failure_told = True
    verdict = route(update)
    try:
        query = update.callback_query
        answerable = verdict in {Route.SERVE, Route.STALE}
        if query is not None and answerable and not current.callback_answered:
            await answer(query, text)
            return
        if verdict is Route.SERVE and update.effective_user is not None:
            await context.bot.send_message(update.effective_user.id, text)
    except Exception as exc:  # the reply is a courtesy; the failure itself is already logged
        logger.warning("docbot_failure_reply_failed", update_id=update.update_id, error=repr(exc))


def handlers_install(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    application.add_handler(TypeHandler(Update, middleware), group=-1)
    application.add_handler(CommandHandler("start", on_start, filters=PRIVATE_MESSAGES))
    application.add_handler(CommandHandler("help", on_help, filters=PRIVATE_MESSAGES))
    application.add_handler(CommandHandler("cancel", on_cancel, filters=PRIVATE_MESSAGES))
    application.add_handler(CommandHandler("search", on_search, filters=PRIVATE_MESSAGES))
    application.add_handler(
        MessageHandler(PRIVATE_MESSAGES & (filters.Document.ALL | filters.PHOTO), on_file)
    )
    application.add_handler(
        MessageHandler(PRIVATE_MESSAGES & filters.TEXT & ~filters.COMMAND, on_text)
    )
    application.add_handler(MessageHandler(PRIVATE_MESSAGES, on_other))
    application.add_handler(CallbackQueryHandler(on_callback))
    application.add_error_handler(on_error)
