"""A URLconf for the HTTP catch-all tests: the project's URLs plus views that fail on purpose."""

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.urls import path
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.urls import urlpatterns as project_urlpatterns


class CrashingApi(APIView):
    authentication_classes: list[type] = []
    permission_classes = [AllowAny]

    def get(self, request: Request) -> Response:
        raise RuntimeError("secret internal detail: password=hunter2")


class UnrenderableApi(APIView):
    authentication_classes: list[type] = []
    permission_classes = [AllowAny]

    def get(self, request: Request) -> Response:
        return Response({"value": object()})


def crashing_plain_view(request: HttpRequest) -> HttpResponse:
    raise KeyError("secret internal detail")


def crashing_admin_like_view(request: HttpRequest) -> HttpResponse:
    raise ValueError("not a JSON path")


urlpatterns: list[Any] = [
    path("api/test/crash", CrashingApi.as_view()),
    path("api/test/unrenderable", UnrenderableApi.as_view()),
    path("docbot/test/crash", crashing_plain_view),
    path("pages/test/crash", crashing_admin_like_view),
    *project_urlpatterns,
]
