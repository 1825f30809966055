"""Backend REST API of docbot (`/api/docbot/`): what the bot reaches data through."""

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from common.pagination import CursorPagination
from docbot import selectors, services
from docbot.auth import TELEGRAM_USER_HEADER, ServiceTelegramAuthentication

TELEGRAM_HEADER_PARAMETER = OpenApiParameter(
    TELEGRAM_USER_HEADER,
    OpenApiTypes.INT,
    OpenApiParameter.HEADER,
    required=False,
    description="Telegram user id; required with the docbot service token.",
)


class DocbotApi(APIView):
    authentication_classes = [ServiceTelegramAuthentication, SessionAuthentication]


class DocumentPagination(CursorPagination):
    page_size = 8
    ordering = ("-created_at", "-id")


class TypeOutput(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    document_count = serializers.IntegerField(required=False)


class DocumentOutput(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    type_id = serializers.IntegerField()
    type_name = serializers.CharField(source="type.name")
    status = serializers.CharField()
    size = serializers.IntegerField(allow_null=True)
    sha256 = serializers.CharField()
    mime_type = serializers.CharField()
    file_name = serializers.CharField()
    telegram_file_id = serializers.CharField()
    created_at = serializers.DateTimeField()


class TypeListCreateApi(DocbotApi):
    class InputSerializer(serializers.Serializer):
        name = serializers.CharField(max_length=200, allow_blank=True)

    @extend_schema(
        operation_id="docbot_types_list",
        parameters=[
            TELEGRAM_HEADER_PARAMETER,
            OpenApiParameter("non_empty", OpenApiTypes.BOOL, description="only types with docs"),
        ],
        responses={200: TypeOutput(many=True)},
    )
    def get(self, request: Request) -> Response:
        non_empty = request.query_params.get("non_empty", "") in {"1", "true"}
        types = selectors.type_list(user=request.user, non_empty=non_empty)
        return Response(TypeOutput(types, many=True).data)

    @extend_schema(
        operation_id="docbot_types_create",
        parameters=[TELEGRAM_HEADER_PARAMETER],
        request=InputSerializer,
        responses={201: TypeOutput},
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        doc_type = services.type_create(user=request.user, name=data.validated_data["name"])
        return Response(TypeOutput(doc_type).data, status=status.HTTP_201_CREATED)


class TypeDetailApi(DocbotApi):
    class InputSerializer(serializers.Serializer):
        name = serializers.CharField(max_length=200, allow_blank=True)

    @extend_schema(
        operation_id="docbot_types_rename",
        parameters=[TELEGRAM_HEADER_PARAMETER],
        request=InputSerializer,
        responses={200: TypeOutput},
    )
    def patch(self, request: Request, type_id: int) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        doc_type = services.type_rename(
            user=request.user, type_id=type_id, name=data.validated_data["name"]
        )
        return Response(TypeOutput(doc_type).data)

    @extend_schema(
        operation_id="docbot_types_delete",
        parameters=[TELEGRAM_HEADER_PARAMETER],
        responses={204: None},
    )
    def delete(self, request: Request, type_id: int) -> Response:
        services.type_delete(user=request.user, type_id=type_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class DocumentListCreateApi(DocbotApi):
    class InputSerializer(serializers.Serializer):
        type_id = serializers.IntegerField()
        name = serializers.CharField(max_length=400, allow_blank=True)
        chat_id = serializers.IntegerField()
        file_id = serializers.CharField(max_length=256)
        file_unique_id = serializers.CharField(max_length=128, required=False, default="")
        size = serializers.IntegerField(required=False, allow_null=True, min_value=0)
        mime_type = serializers.CharField(required=False, default="", allow_blank=True)
        file_name = serializers.CharField(required=False, default="", allow_blank=True)

    class FilterSerializer(serializers.Serializer):
        type = serializers.IntegerField(required=False)
        q = serializers.CharField(required=False, default="", max_length=128)
        name = serializers.CharField(required=False, default="", max_length=400)

    @extend_schema(
        operation_id="docbot_documents_list",
        parameters=[TELEGRAM_HEADER_PARAMETER, FilterSerializer],
        responses={200: DocumentOutput(many=True)},
    )
    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        documents = selectors.document_list(
            user=request.user,
            type_id=filters.validated_data.get("type"),
            query=filters.validated_data["q"],
            name=filters.validated_data["name"],
        )
        paginator = DocumentPagination()
        page = paginator.paginate_queryset(documents, request, view=self)
        return paginator.get_paginated_response(DocumentOutput(page, many=True).data)

    @extend_schema(
        operation_id="docbot_documents_create",
        parameters=[TELEGRAM_HEADER_PARAMETER],
        request=InputSerializer,
        responses={202: DocumentOutput},
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        document = services.document_create(user=request.user, **data.validated_data)
        return Response(DocumentOutput(document).data, status=status.HTTP_202_ACCEPTED)


class DocumentDetailApi(DocbotApi):
    class InputSerializer(serializers.Serializer):
        name = serializers.CharField(max_length=400, required=False, allow_blank=True)
        type_id = serializers.IntegerField(required=False)

    @extend_schema(
        operation_id="docbot_documents_retrieve",
        parameters=[TELEGRAM_HEADER_PARAMETER],
        responses={200: DocumentOutput},
    )
    def get(self, request: Request, document_id: int) -> Response:
        document = selectors.document_get(user=request.user, document_id=document_id)
        return Response(DocumentOutput(document).data)

    @extend_schema(
        operation_id="docbot_documents_update",
        parameters=[TELEGRAM_HEADER_PARAMETER],
        request=InputSerializer,
        responses={200: DocumentOutput},
    )
    def patch(self, request: Request, document_id: int) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        document = services.document_update(
            user=request.user, document_id=document_id, **data.validated_data
        )
        return Response(DocumentOutput(document).data)

    @extend_schema(
        operation_id="docbot_documents_delete",
        parameters=[TELEGRAM_HEADER_PARAMETER],
        responses={204: None},
    )
    def delete(self, request: Request, document_id: int) -> Response:
        services.document_delete(user=request.user, document_id=document_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class DocumentShareApi(DocbotApi):
    class OutputSerializer(serializers.Serializer):
        url = serializers.CharField()
        expires_at = serializers.DateTimeField()

    @extend_schema(
        operation_id="docbot_documents_share",
        parameters=[TELEGRAM_HEADER_PARAMETER],
        request=None,
        responses={201: OutputSerializer},
    )
    def post(self, request: Request, document_id: int) -> Response:
        link = services.share_link_create(user=request.user, document_id=document_id)
        body: dict[str, Any] = {"url": link.url, "expires_at": link.expires_at}
        return Response(self.OutputSerializer(body).data, status=status.HTTP_201_CREATED)
