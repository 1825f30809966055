"""The dialog: thin handlers that parse the update, call the backend, answer the user.

State lives in the shared DialogStore (not in python-telegram-bot's per-process memory), so any
worker can serve any step. Backend errors are mapped to replies in exactly one place:
`on_error`."""

from dataclasses import dataclass
from typing import Any

import structlog
from telegram import (
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    KeyboardButton,
    Message,
    ReplyKeyboardMarkup,
    Update,
)
from telegram.error import BadRequest
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

from docbot import metrics
from docbot.bot import texts
from docbot.bot.backend import Backend, BackendError, cursor_of
from docbot.bot.state import DialogStore

logger = structlog.get_logger(__name__)

TYPE_NAME_MAX = 64
DOCUMENT_NAME_MAX = 128
PAGE_SIZE = 8

MENU = ReplyKeyboardMarkup(
    [[KeyboardButton(texts.MENU_ADD), KeyboardButton(texts.MENU_BROWSE)]], resize_keyboard=True
)


@dataclass(frozen=True)
class BotConfig:
    mode: str = "polling"
    flood_max_per_second: int = 5
    max_file_bytes: int = 20 * 1024 * 1024


def _deps(context: ContextTypes.DEFAULT_TYPE) -> tuple[Backend, DialogStore, BotConfig]:
    data = context.bot_data
    return data["backend"], data["store"], data["config"]


def _clean(text: str) -> str:
    return " ".join(text.split())


def _name_problem(name: str, limit: int) -> str | None:
    if not name:
        return texts.NAME_EMPTY
    if len(name) > limit:
        return texts.NAME_TOO_LONG.format(limit=limit)
    return None


# --- middleware (group -1): correlation id, dedupe, flood control ------------------------


async def middleware(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    if not isinstance(update, Update):
        return
    _, store, config = _deps(context)
    structlog.contextvars.bind_contextvars(request_id=f"tg-{update.update_id}")
    if not await store.first_delivery(update.update_id):
        metrics.UPDATES.labels(config.mode, "duplicate").inc()
        logger.info("docbot_update_duplicate", update_id=update.update_id)
        raise ApplicationHandlerStop
    user = update.effective_user
    if user is not None:
        verdict = await store.flood_check(user.id, config.flood_max_per_second)
        if verdict != "ok":
            metrics.UPDATES.labels(config.mode, f"flood_{verdict}").inc()
            if verdict == "warn" and update.effective_chat is not None:
                await context.bot.send_message(update.effective_chat.id, texts.SLOW_DOWN)
            raise ApplicationHandlerStop
    metrics.UPDATES.labels(config.mode, "accepted").inc()
    logger.info("docbot_update", update_id=update.update_id)


# --- commands -----------------------------------------------------------------------------


async def on_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    _, store, _ = _deps(context)
    assert update.effective_user and update.effective_message
    await store.clear(update.effective_user.id)
    await update.effective_message.reply_text(texts.WELCOME, reply_markup=MENU)


async def on_help(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    assert update.effective_message
    await update.effective_message.reply_text(texts.HELP, reply_markup=MENU)


async def on_cancel(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    _, store, _ = _deps(context)
    assert update.effective_user and update.effective_message
    had_state = bool(await store.get(update.effective_user.id))
    await store.clear(update.effective_user.id)
    text = texts.CANCELLED if had_state else texts.NOTHING_TO_CANCEL
    await update.effective_message.reply_text(text, reply_markup=MENU)


async def on_search(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    _, store, _ = _deps(context)
    assert update.effective_user and update.effective_message
    query = " ".join(context.args or [])
    if query:
        await _search(update.effective_message, context, update.effective_user.id, query)
        return
    await store.set(update.effective_user.id, {"step": "search"})
    await update.effective_message.reply_text(texts.SEARCH_ASK)


# --- text input: menu buttons and the step the user is at ---------------------------------


async def on_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    backend, store, _ = _deps(context)
    message, user = update.effective_message, update.effective_user
    assert message and user and message.text is not None
    text = message.text
    if text == texts.MENU_ADD:
        await _add_start(message, backend, store, user.id)
        return
    if text == texts.MENU_BROWSE:
        await store.clear(user.id)
        await _browse_types(message, backend, user.id)
        return
    state = await store.get(user.id)
    step = state.get("step")
    if step == "add_type_name":
        await step_type_name(message, backend, store, user.id, text)
    elif step == "add_doc_name":
        await step_document_name(message, backend, store, user.id, state, text)
    elif step == "add_file":
        await message.reply_text(texts.ADD_FILE_EXPECTED)
    elif step == "rename":
        await _rename(message, backend, store, user.id, state, text)
    elif step == "search":
        await store.clear(user.id)
        await _search(message, context, user.id, text)
    else:
        await message.reply_text(texts.UNKNOWN_INPUT, reply_markup=MENU)


async def _add_start(message: Message, backend: Backend, store: DialogStore, user_id: int) -> None:
    types = await backend.types(user_id, non_empty=False)
    await store.set(user_id, {"step": "add_pick_type"})
    rows = [[InlineKeyboardButton(t["name"], callback_data=f"at:{t['id']}")] for t in types]
    rows.append([InlineKeyboardButton(texts.ADD_NEW_TYPE_BUTTON, callback_data="an")])
    await message.reply_text(texts.ADD_PICK_TYPE, reply_markup=InlineKeyboardMarkup(rows))


async def step_type_name(
    message: Message, backend: Backend, store: DialogStore, user_id: int, text: str
) -> None:
    name = _clean(text)
    problem = _name_problem(name, TYPE_NAME_MAX)
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
    """Validate the name (length, not taken within the type), then ask for the file."""
    name = _clean(text)
    problem = _name_problem(name, DOCUMENT_NAME_MAX)
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
    name = _clean(text)
    problem = _name_problem(name, DOCUMENT_NAME_MAX)
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
    message: Message, context: ContextTypes.DEFAULT_TYPE, user_id: int, query: str
) -> None:
    backend, _, _ = _deps(context)
    query = _clean(query)[:128]
    page = await backend.documents(user_id, query=query, limit=PAGE_SIZE)
    if not page["results"]:
        await message.reply_text(texts.SEARCH_NONE.format(query=query), reply_markup=MENU)
        return
    rows = [
        [InlineKeyboardButton(f"{d['name']} ({d['type_name']})", callback_data=f"d:{d['id']}")]
        for d in page["results"]
    ]
    await message.reply_text(
        texts.SEARCH_RESULTS.format(count=len(page["results"])),
        reply_markup=InlineKeyboardMarkup(rows),
    )


# --- files --------------------------------------------------------------------------------


async def on_file(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    backend, store, config = _deps(context)
    message, user = update.effective_message, update.effective_user
    assert message and user
    state = await store.get(user.id)
    if state.get("step") != "add_file":
        await message.reply_text(texts.UNKNOWN_INPUT, reply_markup=MENU)
        return
    if message.document is not None:
        attachment: Any = message.document
        mime_type = message.document.mime_type or ""
        file_name = message.document.file_name or ""
    elif message.photo:
        attachment = message.photo[-1]
        mime_type, file_name = "image/jpeg", ""
    else:
        await message.reply_text(texts.ADD_FILE_EXPECTED)
        return
    if attachment.file_size and attachment.file_size > config.max_file_bytes:
        await message.reply_text(texts.ADD_FILE_TOO_LARGE)
        return
    # Cleared and said before the call: with eager tasks the worker's confirmation comes back
    # inside it, and the user may already be on the next dialog when it returns.
    await store.clear(user.id)
    await message.reply_text(texts.ADD_RECEIVED.format(name=state["name"]), reply_markup=MENU)
    await backend.document_create(
        user.id,
        type_id=state["type_id"],
        name=state["name"],
        chat_id=message.chat_id,
        file_id=attachment.file_id,
        file_unique_id=attachment.file_unique_id,
        size=attachment.file_size,
        mime_type=mime_type,
        file_name=file_name,
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
                f"{t['name']} ({t['document_count']})", callback_data=f"bt:{t['id']}"
            )
        ]
        for t in types
    ]
    await message.reply_text(texts.BROWSE_PICK_TYPE, reply_markup=InlineKeyboardMarkup(rows))


async def _browse_page(
    query: CallbackQuery,
    backend: Backend,
    store: DialogStore,
    user_id: int,
    type_id: int,
    page_number: int,
) -> None:
    state = await store.get(user_id)
    cursors: list[str | None] = [None]
    if state.get("step") == "browse" and state.get("type_id") == type_id:
        cursors = list(state.get("cursors", [None]))
    if page_number > len(cursors):
        page_number = 1
    page = await backend.documents(
        user_id, type_id=type_id, cursor=cursors[page_number - 1], limit=PAGE_SIZE
    )
    next_cursor = cursor_of(page.get("next"))
    cursors = cursors[:page_number]
    if next_cursor:
        cursors.append(next_cursor)
    await store.set(user_id, {"step": "browse", "type_id": type_id, "cursors": cursors})
    documents = page["results"]
    if not documents:
        await query.edit_message_text(texts.BROWSE_NO_DOCS)
        return
    rows = [[InlineKeyboardButton(d["name"], callback_data=f"d:{d['id']}")] for d in documents]
    nav = []
    if page_number > 1:
        nav.append(
            InlineKeyboardButton(texts.BUTTON_PREV, callback_data=f"bp:{type_id}:{page_number - 1}")
        )
    if next_cursor:
        nav.append(
            InlineKeyboardButton(texts.BUTTON_NEXT, callback_data=f"bp:{type_id}:{page_number + 1}")
        )
    if nav:
        rows.append(nav)
    await query.edit_message_text(
        texts.BROWSE_PAGE.format(type=documents[0]["type_name"], page=page_number),
        reply_markup=InlineKeyboardMarkup(rows),
    )


def _document_actions(document_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton(texts.BUTTON_RENAME, callback_data=f"r:{document_id}"),
                InlineKeyboardButton(texts.BUTTON_RETYPE, callback_data=f"m:{document_id}"),
            ],
            [
                InlineKeyboardButton(texts.BUTTON_DELETE, callback_data=f"x:{document_id}"),
                InlineKeyboardButton(texts.BUTTON_SHARE, callback_data=f"s:{document_id}"),
            ],
        ]
    )


async def _send_document(
    query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, user_id: int, document_id: int
) -> None:
    backend, _, _ = _deps(context)
    document = await backend.document(user_id, document_id)
    if document["status"] != "stored":
        await query.answer(texts.DOC_PENDING.format(name=document["name"]))
        return
    await query.answer()
    chat_id = query.message.chat.id if query.message else user_id
    caption = texts.DOC_CAPTION.format(name=document["name"], type=document["type_name"])
    markup = _document_actions(document_id)
    is_photo = document["mime_type"].startswith("image/") and not document["file_name"]
    try:
        if not document["telegram_file_id"]:
            raise BadRequest("no file id")
        if is_photo:
            await context.bot.send_photo(
                chat_id, document["telegram_file_id"], caption=caption, reply_markup=markup
            )
        else:
            await context.bot.send_document(
                chat_id, document["telegram_file_id"], caption=caption, reply_markup=markup
            )
    except BadRequest:
        # Telegram forgot the file id (or never had it): upload the stored copy instead.
        link = await backend.share(user_id, document_id)
        content = await backend.download(link["url"])
        upload = InputFile(content, filename=document["file_name"] or document["name"])
        await context.bot.send_document(chat_id, upload, caption=caption, reply_markup=markup)


# --- callback buttons ---------------------------------------------------------------------


async def on_callback(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    backend, store, _ = _deps(context)
    query, user = update.callback_query, update.effective_user
    assert query and user
    parts = (query.data or "").split(":")
    kind, args = parts[0], [int(p) for p in parts[1:] if p.lstrip("-").isdigit()]
    uid = user.id
    state = await store.get(uid)
    if kind == "an" and state.get("step") == "add_pick_type":
        await store.set(uid, {"step": "add_type_name"})
        await query.answer()
        await query.edit_message_text(texts.ADD_ASK_TYPE_NAME)
    elif kind == "at" and args and state.get("step") == "add_pick_type":
        names = {t["id"]: t["name"] for t in await backend.types(uid, non_empty=False)}
        if args[0] not in names:
            await query.answer(texts.STALE_BUTTON)
            return
        await store.set(
            uid, {"step": "add_doc_name", "type_id": args[0], "type_name": names[args[0]]}
        )
        await query.answer()
        await query.edit_message_text(texts.ADD_ASK_DOC_NAME.format(type=names[args[0]]))
    elif kind == "bt" and args:
        await query.answer()
        await _browse_page(query, backend, store, uid, args[0], 1)
    elif kind == "bp" and len(args) == 2:
        await query.answer()
        await _browse_page(query, backend, store, uid, args[0], args[1])
    elif kind == "d" and args:
        await _send_document(query, context, uid, args[0])
    elif kind == "r" and args:
        document = await backend.document(uid, args[0])
        await store.set(uid, {"step": "rename", "document_id": args[0]})
        await query.answer()
        await context.bot.send_message(uid, texts.RENAME_ASK.format(name=document["name"]))
    elif kind == "m" and args:
        document = await backend.document(uid, args[0])
        types = await backend.types(uid, non_empty=False)
        rows = [
            [InlineKeyboardButton(t["name"], callback_data=f"mt:{args[0]}:{t['id']}")]
            for t in types
            if t["id"] != document["type_id"]
        ]
        await query.answer()
        await context.bot.send_message(
            uid,
            texts.RETYPE_PICK.format(name=document["name"]),
            reply_markup=InlineKeyboardMarkup(rows),
        )
    elif kind == "mt" and len(args) == 2:
        document = await backend.document_update(uid, args[0], type_id=args[1])
        await query.answer()
        await query.edit_message_text(
            texts.RETYPED.format(name=document["name"], type=document["type_name"])
        )
    elif kind == "x" and args:
        document = await backend.document(uid, args[0])
        buttons = [
            InlineKeyboardButton(texts.BUTTON_YES, callback_data=f"xy:{args[0]}"),
            InlineKeyboardButton(texts.BUTTON_NO, callback_data=f"xn:{args[0]}"),
        ]
        await query.answer()
        await context.bot.send_message(
            uid,
            texts.DELETE_CONFIRM.format(name=document["name"]),
            reply_markup=InlineKeyboardMarkup([buttons]),
        )
    elif kind == "xy" and args:
        document = await backend.document(uid, args[0])
        await backend.document_delete(uid, args[0])
        await query.answer()
        await query.edit_message_text(texts.DELETED.format(name=document["name"]))
    elif kind == "xn" and args:
        await query.answer()
        await query.edit_message_text(texts.DELETE_KEPT)
    elif kind == "s" and args:
        document = await backend.document(uid, args[0])
        link = await backend.share(uid, args[0])
        await query.answer()
        await context.bot.send_message(
            uid,
            texts.SHARE_LINK.format(
                name=document["name"], expires=link["expires_at"], url=link["url"]
            ),
        )
    else:
        await query.answer(texts.STALE_BUTTON)


# --- errors: the one place backend/application errors become replies -----------------------


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    error = context.error
    text = texts.FAILED
    if isinstance(error, BackendError):
        if error.status == 404:
            text = texts.STALE_BUTTON
        elif 400 <= error.status < 500 and error.status not in {401, 403}:
            text = error.message
        logger.warning("docbot_backend_error", status=error.status, code=error.code)
    else:
        logger.error("docbot_handler_failed", error=repr(error), exc_info=error)
    if isinstance(update, Update) and update.effective_chat is not None:
        try:
            if update.callback_query is not None:
                await update.callback_query.answer()
            await context.bot.send_message(update.effective_chat.id, text)
        except Exception:
            logger.exception("docbot_error_reply_failed")


def handlers_install(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    application.add_handler(TypeHandler(Update, middleware), group=-1)
    application.add_handler(CommandHandler("start", on_start))
    application.add_handler(CommandHandler("help", on_help))
    application.add_handler(CommandHandler("cancel", on_cancel))
    application.add_handler(CommandHandler("search", on_search))
    application.add_handler(MessageHandler(filters.Document.ALL | filters.PHOTO, on_file))
    application.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, on_text))
    application.add_handler(CallbackQueryHandler(on_callback))
    application.add_error_handler(on_error)
