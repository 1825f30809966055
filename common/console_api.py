"""The console's REST doors: the snapshot a page starts from, and the actions it posts.

Staff only (an admin session or a staff API token): anonymous callers get 401, others 403,
in the one error envelope. Session callers must send the CSRF token (DRF's
SessionAuthentication checks it), as the console page does.
"""

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from common import console_publisher
from common.fields import IdentifierField


class ConsoleActionRefSerializer(serializers.Serializer[Any]):
    action = serializers.CharField()
    label = serializers.CharField()  # type: ignore[assignment]  # a field named like Field.label
    params = serializers.DictField(help_text="Posted back as is to /api/console/actions.")


class ConsoleCounterSerializer(serializers.Serializer[Any]):
    label = serializers.CharField()  # type: ignore[assignment]  # a field named like Field.label
    value = serializers.IntegerField(help_text="Monotonic total.")


class ConsoleNumberSerializer(serializers.Serializer[Any]):
    key = serializers.CharField()
    label = serializers.CharField()  # type: ignore[assignment]  # a field named like Field.label
    value = serializers.JSONField(help_text="A number, a short string or null.")
    link = serializers.CharField(required=False, help_text="Its admin page.")


class ConsoleAttentionSerializer(serializers.Serializer[Any]):
    key = serializers.CharField()
    text = serializers.CharField()
    link = serializers.CharField(required=False)
    actions = ConsoleActionRefSerializer(many=True, required=False)


class ConsoleRowSerializer(serializers.Serializer[Any]):
    key = serializers.CharField()
    cells = serializers.ListField(child=serializers.JSONField())
    link = serializers.CharField(required=False)
    actions = ConsoleActionRefSerializer(many=True, required=False)


class ConsoleTableSerializer(serializers.Serializer[Any]):
    key = serializers.CharField()
    title = serializers.CharField()
    columns = serializers.ListField(child=serializers.CharField())
    rows = ConsoleRowSerializer(many=True)


class ConsoleSampleSerializer(serializers.Serializer[Any]):
    counters = serializers.DictField(child=ConsoleCounterSerializer())
    numbers = ConsoleNumberSerializer(many=True)
    attention = ConsoleAttentionSerializer(many=True, help_text="What needs a human, newest first.")
    tables = ConsoleTableSerializer(many=True)


class ConsoleRateSerializer(serializers.Serializer[Any]):
    label = serializers.CharField()  # type: ignore[assignment]  # a field named like Field.label
    per_second = serializers.FloatField(allow_null=True, help_text="Null until two samples.")
    series = serializers.ListField(
        child=serializers.ListField(child=serializers.FloatField(), min_length=2, max_length=2),
        help_text="[[epoch seconds, per second], ...] over CONSOLE_WINDOW_SECONDS, oldest first.",
    )


class ConsolePanelSerializer(serializers.Serializer[Any]):
    name = serializers.CharField()
    title = serializers.CharField()
    topic = serializers.CharField(help_text="Staff-only /ws/ topic carrying this panel's deltas.")
    sample = ConsoleSampleSerializer(allow_null=True, help_text="Null until first sampled.")
    status = serializers.ChoiceField(choices=["ok", "unavailable", "waiting"])
    error = serializers.CharField(allow_null=True)
    at = serializers.FloatField(allow_null=True, help_text="Epoch seconds of the sample.")
    ms = serializers.FloatField(allow_null=True, help_text="How long sampling took.")
    rates = serializers.DictField(child=ConsoleRateSerializer())


class ConsoleSnapshotApi(APIView):
    """What the console publisher last published for every panel, in page order, with each
    counter's rate series over the last CONSOLE_WINDOW_SECONDS, and how to follow the live
    deltas over `/ws/` (subscribe to each panel's staff-only `topic`). Staff only. Samples
    nothing: it reads the publisher's stored state, so it equals the live stream."""

    permission_classes = [IsAdminUser]

    class OutputSerializer(serializers.Serializer[Any]):
        panels = ConsolePanelSerializer(many=True)
        ws = serializers.DictField(help_text="`path`, `hello` and `subscribe` frames, `event`.")
        sample_seconds = serializers.FloatField()
        window_seconds = serializers.FloatField()
        now = serializers.FloatField(help_text="The server's clock (epoch seconds).")

    @extend_schema(responses={200: OutputSerializer})
    def get(self, request: Request) -> Response:
        return Response(console_publisher.console_snapshot())


class ConsoleActionRunApi(APIView):
    """Run one console action (a button on the page): `params` go to the panel's action, which
    parses them and calls its app's service; the panel is then sampled and published at once.
    Staff only; with a session, the CSRF token is required. 404 `unknown_panel` /
    `unknown_action`; the action's own refusals in the error envelope (400, 404, 409...)."""

    permission_classes = [IsAdminUser]

    class InputSerializer(serializers.Serializer[Any]):
        panel = IdentifierField(max_length=64)
        action = IdentifierField(max_length=64)
        params = serializers.DictField(required=False, default=dict)

    class OutputSerializer(serializers.Serializer[Any]):
        detail = serializers.CharField(help_text="The action's one line for the operator.")

    @extend_schema(request=InputSerializer, responses={200: OutputSerializer})
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        detail = console_publisher.console_action_run(
            panel_name=data.validated_data["panel"],
            action_name=data.validated_data["action"],
            params=data.validated_data["params"],
            user=request.user,  # type: ignore[arg-type]
        )
        return Response(self.OutputSerializer({"detail": detail}).data)
