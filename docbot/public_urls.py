from django.urls import URLPattern, URLResolver, path

from docbot import public_views

urlpatterns: list[URLPattern | URLResolver] = [
    path("webhook", public_views.webhook, name="docbot-webhook"),
    path("files/<str:token>", public_views.file_download, name="docbot-file"),
]
