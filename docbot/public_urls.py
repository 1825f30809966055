from django.urls import URLPattern, URLResolver, path

from docbot import public_views, sandbox_views

urlpatterns: list[URLPattern | URLResolver] = [
    path("webhook", public_views.webhook, name="docbot-webhook"),
    path("files/<str:token>", public_views.file_download, name="docbot-file"),
    path("files/<str:token>/<str:name>", public_views.file_download, name="docbot-file-named"),
    # The sandbox (no TELEGRAM_BOT_TOKEN): the staff chat page and the Bot API stand-in.
    path("sandbox/", sandbox_views.chat, name="docbot-sandbox"),
    path("sandbox/transcript", sandbox_views.transcript, name="docbot-sandbox-transcript"),
    path("sandbox/messages", sandbox_views.messages, name="docbot-sandbox-messages"),
    path("sandbox/send", sandbox_views.send, name="docbot-sandbox-send"),
    path("sandbox/press", sandbox_views.press, name="docbot-sandbox-press"),
    path("sandbox/upload", sandbox_views.upload, name="docbot-sandbox-upload"),
    path("sandbox/files/<str:file_id>", sandbox_views.sandbox_file, name="docbot-sandbox-file"),
    path("sandbox/bot<str:token>/<str:method>", sandbox_views.bot_method),
    path("sandbox/file/bot<str:token>/<path:path>", sandbox_views.bot_file),
]
