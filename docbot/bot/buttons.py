"""Inline buttons: `callback_data` is client input, parsed by `schemas.callback_parse` (a
forged or stale press is "no longer active"); each action returns the note the press is
answered with, and `on_callback` answers it exactly once. Files and lists go only to the
user's private chat, never to the chat the button sat in."""

from collections.abc import Awaitable, Callable
from datetime import datetime

import structlog
from django.utils import timezone
from telegram import (
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    Message,
    Update,
)
from telegram.error import BadRequest
from telegram.ext import ContextTypes

from common.parsers import InvalidValue
from docbot import schemas, texts
from docbot.bot.backend import cursor_of
from docbot.bot.turn import answer, deps

logger = structlog.get_logger(__name__)

PAGE_SIZE = 8


async def _edit(
    query: CallbackQuery,
    context: ContextTypes.DEFAULT_TYPE,
    user_id: int,
    text: str,
    markup: InlineKeyboardMarkup | None = None,
) -> None:
    """Replace the message the button sits on; one Telegram can no longer edit (an
    inaccessible message) gets a new message in the user's private chat instead."""
    if isinstance(query.message, Message):
        await query.edit_message_text(text, reply_markup=markup)
    else:
        await context.bot.send_message(user_id, text, reply_markup=markup)


async def _browse_page(
    query: CallbackQuery,
    context: ContextTypes.DEFAULT_TYPE,
    user_id: int,
    type_id: int,
    page_number: int,
) -> str | None:
    """Show page `page_number` of a type. Pages past the first are reached only through the
    cursors this dialog remembered: a page button from another dialog is stale."""
    backend, store, _ = deps(context)
    state = await store.get(user_id)
    cursors: list[str | None] = [None]
    if state.get("step") == "browse" and state.get("type_id") == type_id:
        cursors = list(state.get("cursors", [None]))
    if page_number > len(cursors):
        return texts.STALE_BUTTON
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
        await _edit(query, context, user_id, texts.BROWSE_NO_DOCS)
        return None
    rows = [
        [InlineKeyboardButton(d["name"], callback_data=schemas.callback_data("d", d["id"]))]
        for d in documents
    ]
    nav = []
    if page_number > 1:
        previous = schemas.callback_data("bp", type_id, page_number - 1)
        nav.append(InlineKeyboardButton(texts.BUTTON_PREV, callback_data=previous))
    if next_cursor and page_number < schemas.PAGE_MAX:
        following = schemas.callback_data("bp", type_id, page_number + 1)
        nav.append(InlineKeyboardButton(texts.BUTTON_NEXT, callback_data=following))
    if nav:
        rows.append(nav)
    title = texts.BROWSE_PAGE.format(type=documents[0]["type_name"], page=page_number)
    await _edit(query, context, user_id, title, InlineKeyboardMarkup(rows))
    return None


def _document_actions(document_id: int) -> InlineKeyboardMarkup:
    def button(label: str, kind: str) -> InlineKeyboardButton:
        return InlineKeyboardButton(label, callback_data=schemas.callback_data(kind, document_id))

    return InlineKeyboardMarkup(
        [
            [button(texts.BUTTON_RENAME, "r"), button(texts.BUTTON_RETYPE, "m")],
            [button(texts.BUTTON_DELETE, "x"), button(texts.BUTTON_SHARE, "s")],
        ]
    )


async def _send_document(
    query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, user_id: int, document_id: int
) -> str | None:
    """Send the file back to the user's private chat (never to the chat the button sat in)."""
    backend, _, _ = deps(context)
    document = await backend.document(user_id, document_id)
    if document["status"] != "stored":
        return texts.DOC_PENDING.format(name=document["name"])
    await answer(query)  # before the send: an upload from storage may take a while
    caption = texts.DOC_CAPTION.format(name=document["name"], type=document["type_name"])
    markup = _document_actions(document_id)
    is_photo = document["mime_type"].startswith("image/") and not document["file_name"]
    try:
        if not document["telegram_file_id"]:
            raise BadRequest("no file id")
        if is_photo:
            await context.bot.send_photo(
                user_id, document["telegram_file_id"], caption=caption, reply_markup=markup
            )
        else:
            await context.bot.send_document(
                user_id, document["telegram_file_id"], caption=caption, reply_markup=markup
            )
    except BadRequest:
        # Telegram forgot the file id (or never had it): upload the stored copy instead.
        link = await backend.share(user_id, document_id)
        content = await backend.download(link["url"])
        upload = InputFile(content, filename=document["file_name"] or document["name"])
        await context.bot.send_document(user_id, upload, caption=caption, reply_markup=markup)
    return None


ButtonAction = Callable[..., Awaitable[str | None]]


async def on_callback(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Parse the button (client input: a forged or stale one is "no longer active"), run its
    action, and answer the press exactly once with the action's note, if any."""
    query, user = update.callback_query, update.effective_user
    assert query is not None and user is not None
    try:
        button = schemas.callback_parse(query.data)
    except InvalidValue as exc:
        logger.info("docbot_button_refused", field=exc.field, reason=exc.reason)
        await answer(query, texts.STALE_BUTTON)
        return
    note = await BUTTON_ACTIONS[button.kind](query, context, user.id, *button.args)
    await answer(query, note)


async def _button_new_type(
    query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, uid: int
) -> str | None:
    _, store, _ = deps(context)
    if (await store.get(uid)).get("step") != "add_pick_type":
        return texts.STALE_BUTTON
    await store.set(uid, {"step": "add_type_name"})
    await _edit(query, context, uid, texts.ADD_ASK_TYPE_NAME)
    return None


async def _button_pick_type(
    query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, uid: int, type_id: int
) -> str | None:
    backend, store, _ = deps(context)
    if (await store.get(uid)).get("step") != "add_pick_type":
        return texts.STALE_BUTTON
    names = {t["id"]: t["name"] for t in await backend.types(uid, non_empty=False)}
    if type_id not in names:
        return texts.STALE_BUTTON
    await store.set(uid, {"step": "add_doc_name", "type_id": type_id, "type_name": names[type_id]})
    await _edit(query, context, uid, texts.ADD_ASK_DOC_NAME.format(type=names[type_id]))
    return None


async def _button_browse_type(
    query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, uid: int, type_id: int
) -> str | None:
    return await _browse_page(query, context, uid, type_id, 1)


async def _button_browse_page(
    query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, uid: int, type_id: int, page: int
) -> str | None:
    return await _browse_page(query, context, uid, type_id, page)


async def _button_rename(
    query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, uid: int, document_id: int
) -> str | None:
    backend, store, _ = deps(context)
    document = await backend.document(uid, document_id)
    await store.set(uid, {"step": "rename", "document_id": document_id})
    await context.bot.send_message(uid, texts.RENAME_ASK.format(name=document["name"]))
    return None


async def _button_retype(
    query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, uid: int, document_id: int
) -> str | None:
    backend, _, _ = deps(context)
    document = await backend.document(uid, document_id)
    types = await backend.types(uid, non_empty=False)
    rows = [
        [
            InlineKeyboardButton(
                t["name"], callback_data=schemas.callback_data("mt", document_id, t["id"])
            )
        ]
        for t in types
        if t["id"] != document["type_id"]
    ]
    await context.bot.send_message(
        uid,
        texts.RETYPE_PICK.format(name=document["name"]),
        reply_markup=InlineKeyboardMarkup(rows),
    )
    return None


async def _button_move(
    query: CallbackQuery,
    context: ContextTypes.DEFAULT_TYPE,
    uid: int,
    document_id: int,
    type_id: int,
) -> str | None:
    backend, _, _ = deps(context)
    document = await backend.document_update(uid, document_id, type_id=type_id)
    await _edit(
        query,
        context,
        uid,
        texts.RETYPED.format(name=document["name"], type=document["type_name"]),
    )
    return None


async def _button_delete(
    query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, uid: int, document_id: int
) -> str | None:
    backend, _, _ = deps(context)
    document = await backend.document(uid, document_id)
    buttons = [
        InlineKeyboardButton(
            texts.BUTTON_YES, callback_data=schemas.callback_data("xy", document_id)
        ),
        InlineKeyboardButton(
            texts.BUTTON_NO, callback_data=schemas.callback_data("xn", document_id)
        ),
    ]
    await context.bot.send_message(
        uid,
        texts.DELETE_CONFIRM.format(name=document["name"]),
        reply_markup=InlineKeyboardMarkup([buttons]),
    )
    return None


async def _button_delete_confirmed(
    query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, uid: int, document_id: int
) -> str | None:
    backend, _, _ = deps(context)
    document = await backend.document(uid, document_id)
    await backend.document_delete(uid, document_id)
    await _edit(query, context, uid, texts.DELETED.format(name=document["name"]))
    return None


async def _button_delete_kept(
    query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, uid: int, document_id: int
) -> str | None:
    await _edit(query, context, uid, texts.DELETE_KEPT)
    return None


async def _button_share(
    query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, uid: int, document_id: int
) -> str | None:
    backend, _, _ = deps(context)
    document = await backend.document(uid, document_id)
    link = await backend.share(uid, document_id)
    # Shown in the installation's TIME_ZONE with its name, and how far off it is.
    expires = timezone.localtime(datetime.fromisoformat(link["expires_at"]))
    text = texts.SHARE_LINK.format(
        name=document["name"],
        file_name=link["file_name"],
        expires=texts.expiry(expires, timezone.now()),
        url=link["url"],
    )
    await context.bot.send_message(uid, text)
    return None


#: The named action of each button kind (`schemas.CALLBACK_FIELDS` is the grammar of the same
#: codes: how many integer fields follow each one).
BUTTON_ACTIONS: dict[str, ButtonAction] = {
    "an": _button_new_type,
    "at": _button_pick_type,
    "bt": _button_browse_type,
    "bp": _button_browse_page,
    "d": _send_document,
    "r": _button_rename,
    "m": _button_retype,
    "mt": _button_move,
    "x": _button_delete,
    "xy": _button_delete_confirmed,
    "xn": _button_delete_kept,
    "s": _button_share,
}
