"""Every sentence docbot says to a user (the bot, the ingestion worker, the process log), in one
place: a wire format of the app, below everything that speaks."""

from datetime import datetime

BOT_OFF = "docbot is off: TELEGRAM_BOT_TOKEN is not set."

MENU_ADD = "Add document"
MENU_BROWSE = "My documents"

WELCOME = (
    "Hi! I keep your documents sorted by type.\n"
    "Use the buttons below, /search to find a document by name, /help for help "
    "and /cancel to stop at any step."
)
HELP = (
    "Add document: pick or create a type, name the document, then send the file "
    "(a document or a photo).\n"
    "My documents: browse by type and tap one to get it back.\n"
    "/search: find documents by name.\n"
    "/cancel: stop what you are doing."
)
CANCELLED = "Cancelled. What next?"
NOTHING_TO_CANCEL = "Nothing to cancel."
SLOW_DOWN = "Slow down, please: I skip messages sent this fast."
FAILED = "Sorry, something went wrong on my side. Please try again in a moment."
UNKNOWN_INPUT = "I did not get that. Use the menu buttons, /help or /cancel."
STALE_BUTTON = "That button is no longer active."
PRIVATE_ONLY = "I keep personal documents, so I only work in a private chat: message me directly."

ADD_PICK_TYPE = "Which type is it? Pick one or create a new type."
ADD_PICK_TYPE_HINT = "Pick a type with the buttons above, or /cancel."
ADD_NEW_TYPE_BUTTON = "+ New type"
ADD_ASK_TYPE_NAME = "Name the new type (1-64 characters):"
ADD_ASK_DOC_NAME = "Type: {type}. Now name the document (1-128 characters):"
ADD_ASK_FILE = "Now send the file for \u201c{name}\u201d (a document or a photo, up to 20 MB)."
ADD_FILE_EXPECTED = "Please send a file (a document or a photo), or /cancel."
ADD_FILE_TOO_LARGE = "That file is larger than 20 MB, which I cannot fetch. Send a smaller one."
ADD_RECEIVED = "Got it, storing \u201c{name}\u201d\u2026"
NAME_TOO_LONG = "That name is too long ({limit} characters at most). Try again:"
NAME_EMPTY = "The name cannot be empty. Try again:"
NAME_INVALID = "That name contains control characters I cannot store. Try again:"
FILE_NAME_INVALID = (
    "The file\u2019s name is too long or contains control characters. "
    "Rename the file and send it again, or /cancel."
)
NAME_TAKEN = "There is already a document \u201c{name}\u201d in {type}. Choose another name:"
TYPE_TAKEN = "You already have the type \u201c{name}\u201d. Choose another name:"

STORED = "Stored \u201c{name}\u201d ({size} bytes)."
DUPLICATE = "This file is already stored as \u201c{existing}\u201d."
INGEST_FAILED = "I could not store \u201c{name}\u201d. Please send it again."

BROWSE_EMPTY = "You have no documents yet. Tap \u201cAdd document\u201d."
BROWSE_PICK_TYPE = "Your document types:"
BROWSE_PAGE = "{type}: page {page}. Tap a document:"
BROWSE_NO_DOCS = "No documents here."
BUTTON_PREV = "\u2039 Prev"
BUTTON_NEXT = "Next \u203a"
DOC_CAPTION = "{name} ({type})"
DOC_PENDING = "\u201c{name}\u201d is still being stored; try again in a moment."
BUTTON_RENAME = "Rename"
BUTTON_RETYPE = "Change type"
BUTTON_DELETE = "Delete"
BUTTON_SHARE = "Share link"
BUTTON_YES = "Yes, delete"
BUTTON_NO = "No"
RENAME_ASK = "New name for \u201c{name}\u201d:"
RENAME_HINT = "Send the new name as text, or /cancel."
RENAMED = "Renamed to \u201c{name}\u201d."
RETYPE_PICK = "Move \u201c{name}\u201d to which type?"
RETYPED = "Moved \u201c{name}\u201d to {type}."
DELETE_CONFIRM = "Delete \u201c{name}\u201d for good?"
DELETED = "Deleted \u201c{name}\u201d."
DELETE_KEPT = "Kept it."
SHARE_LINK = "Link to \u201c{name}\u201d ({file_name}), valid until {expires}:\n{url}"

SEARCH_ASK = "What name are you looking for?"
SEARCH_INVALID = "A search cannot contain control characters. What name are you looking for?"
SEARCH_RESULTS = "Found {count}:"
SEARCH_NONE = "Nothing matches \u201c{query}\u201d."


def expiry(expires_at: datetime, now: datetime) -> str:
    """`2025-06-02 10:00 UTC, in 24 hours`: `expires_at` (aware, already in the zone to show)
    as a date, a time and its zone, then how far off it is from `now`."""
    seconds = (expires_at - now).total_seconds()
    if seconds >= 5400:
        relative = f"in {round(seconds / 3600)} hours"
    elif seconds >= 90:
        relative = f"in {round(seconds / 60)} minutes"
    elif seconds > 0:
        relative = "in a minute"
    else:
        relative = "already expired"
    return f"{expires_at:%Y-%m-%d %H:%M} {expires_at.tzname()}, {relative}"
