from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from realtime import services


class TicketCreateApi(APIView):
    """Issue a short-lived, single-use ticket for `GET /ws/?ticket=...`."""

    class OutputSerializer(serializers.Serializer):
        ticket = serializers.CharField()
        expires_in = serializers.IntegerField(help_text="seconds")
        url = serializers.CharField()

    @extend_schema(request=None, responses={201: OutputSerializer})
    def post(self, request: Request) -> Response:
        ticket, ttl = services.ticket_issue(user=request.user)  # type: ignore[arg-type]
        body = {"ticket": ticket, "expires_in": ttl, "url": f"/ws/?ticket={ticket}"}
        return Response(self.OutputSerializer(body).data, status=status.HTTP_201_CREATED)
