"""Backend REST API of docbot (`/api/docbot/`): what the bot reaches data through.

Authentication of the bot's calls: a token of the docbot service identity plus the Telegram
user id header act as that Telegram user. Any other token acts as its own user, and the header
grants it nothing, whatever the account is called."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from common import fields
from common.authentication import TokenAuthentication
from common.pagination import CursorPagination
from common.parsers import InvalidValue
from common.schema import ErrorEnvelopeSerializer
from docbot import schemas, selectors, services

TELEGRAM_USER_HEADER = "X-Telegram-User-Id"
_META_KEY = "HTTP_X_TELEGRAM_USER_ID"


@dataclass(frozen=True)
class ActingForTelegramUser:
    """`request.auth` when the service identity acts for a Telegram user."""

    token: Any
    telegram_user_id: int


class ServiceTelegramAuthentication(TokenAuthentication):
    """The platform's token auth (`Token <token>` or `Bearer <token>`). Only for the user
    marked as the service identity (a `ServiceAccount` row, made by an operator command or the
    bot's own process, never by registration) does the `X-Telegram-User-Id` header (ASCII
    digits within Telegram's id range, else a 400 naming it) select the Telegram user acted
    for, found through the `TelegramAccount` mapping; the identity must have an unusable
    password (else 403 `service_account_has_password`)."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        result = super().authenticate(request)
        if result is None:
            return None
        user, token = result
        raw = request.META.get(_META_KEY)
        telegram_user_id: int | None = None
        problem: InvalidValue | None = None
        if raw is not None:
            try:
                telegram_user_id = schemas.telegram_user_id(raw, field=TELEGRAM_USER_HEADER)
            except InvalidValue as exc:
                problem = exc
        # The bot's every call: one query says both who the token is and whom it acts for.
        if telegram_user_id is not None:
            found = selectors.service_acting_for(user=user, telegram_user_id=telegram_user_id)
            is_service, password_usable, acting = (
                found.is_service,
                found.password_usable,
                found.acting,
            )
        else:
            is_service, acting = selectors.is_service_account(user=user), None
            password_usable = is_service and user.has_usable_password()
        if not is_service:
            return user, token
        if password_usable:
            raise exceptions.PermissionDenied(
                "The docbot service account has a usable password; it may not act for "
                "Telegram users until `manage.py docbot_service_account --rotate` removes it.",
                code="service_account_has_password",
            )
        if raw is None:
            raise exceptions.AuthenticationFailed(
                f"The docbot service token needs a numeric {TELEGRAM_USER_HEADER} header."
            )
        if telegram_user_id is None:
            assert problem is not None
            # A ValidationError (an APIException) so DRF marks the request unauthenticated
            # and the one exception handler answers 400 naming the header.
            raise exceptions.ValidationError(problem.details, code=problem.reason) from None
        if acting is None:  # first contact: the mapping is made
            acting = services.telegram_account_user(telegram_user_id=telegram_user_id)
        return acting, ActingForTelegramUser(token, telegram_user_id)


class IsBotActingForTelegramUser(BasePermission):
    """Only the bot, acting for a Telegram user, may tell what that user sent it."""

    message = "Only the docbot service acting for a Telegram user may do this."
    code = "telegram_bot_only"

    def has_permission(self, request: Request, view: APIView) -> bool:
        return isinstance(request.auth, ActingForTelegramUser)


class ServiceTelegramAuthenticationScheme(OpenApiAuthenticationExtension):
    """OpenAPI: an HTTP bearer scheme like the platform's (Authorize takes the bare token),
    saying what the docbot service token and its Telegram user header do. Outranks the
    platform's scheme, which would otherwise match this subclass."""

    target_class = "docbot.api.ServiceTelegramAuthentication"
    name = "docbotServiceToken"
    priority = 2

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": (
                "An API token, sent as `Authorization: Token <token>` or "
                "`Authorization: Bearer <token>` (paste the bare token into Authorize). Any "
                "user's token acts as that user. A token of the docbot service identity "
                "(issued by `manage.py docbot_service_account`) also needs the "
                f"`{TELEGRAM_USER_HEADER}` header, which names the Telegram user acted for."
            ),
        }


TELEGRAM_HEADER_PARAMETER = OpenApiParameter(
    TELEGRAM_USER_HEADER,
    OpenApiTypes.INT,
    OpenApiParameter.HEADER,
    required=False,
    description="Telegram user id; required with the docbot service token.",
)


def _refusal(description: str) -> OpenApiResponse:
    """A documented refusal of an operation, in the one error envelope."""
    return OpenApiResponse(ErrorEnvelopeSerializer, description=description)


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


def _type_name() -> fields.TextField:
    # Whitespace is collapsed and the 64-character limit applied by the service.
    return fields.TextField(max_length=200, allow_blank=True)


def _document_name(**kwargs: Any) -> fields.TextField:
    # Whitespace is collapsed and the 128-character limit applied by the service.
    return fields.TextField(max_length=400, allow_blank=True, **kwargs)


class TypeListCreateApi(DocbotApi):
    class InputSerializer(serializers.Serializer):
        name = _type_name()

    class FilterSerializer(serializers.Serializer):
        non_empty = serializers.BooleanField(
            required=False, default=False, help_text="only types with documents"
        )

    @extend_schema(
        operation_id="docbot_types_list",
        description=(
            "The acting user's document types by name, each with `document_count` (failed uploads "
            "not counted); `non_empty=true` keeps types that hold a document."
        ),
        parameters=[TELEGRAM_HEADER_PARAMETER, FilterSerializer],
        responses={200: TypeOutput(many=True)},
    )
    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        types = selectors.type_list(
            user=request.user, non_empty=filters.validated_data["non_empty"]
        )
        return Response(TypeOutput(types, many=True).data)

    @extend_schema(
        operation_id="docbot_types_create",
        description=(
            "A new document type for the acting user; the name has its whitespace collapsed (1-64 "
            "characters) and is unique per user case-insensitively (409 `type_exists`)."
        ),
        parameters=[TELEGRAM_HEADER_PARAMETER],
        request=InputSerializer,
        responses={
            201: TypeOutput,
            409: _refusal("`type_exists`: the user already has that type."),
        },
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        doc_type = services.type_create(user=request.user, name=data.validated_data["name"])
        return Response(TypeOutput(doc_type).data, status=status.HTTP_201_CREATED)


class TypeDetailApi(DocbotApi):
    class InputSerializer(serializers.Serializer):
        name = _type_name()

    @extend_schema(
        operation_id="docbot_types_rename",
        description=(
            "Rename one of the acting user's types (same rules as creating one); another user's "
            "type is a 404."
        ),
        parameters=[TELEGRAM_HEADER_PARAMETER],
        request=InputSerializer,
        responses={200: TypeOutput, 409: _refusal("`type_exists`: another type has that name.")},
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
        description=(
            "Delete one of the acting user's types; 409 `type_not_empty` while it holds documents."
        ),
        parameters=[TELEGRAM_HEADER_PARAMETER],
        responses={204: None, 409: _refusal("`type_not_empty`: the type holds documents.")},
    )
    def delete(self, request: Request, type_id: int) -> Response:
        services.type_delete(user=request.user, type_id=type_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ReceivedFileCreateApi(DocbotApi):
    """The bot tells the backend which file a Telegram user just sent it; a document can then
    be made from that file, by that user only. Nobody else can name a Telegram file id."""

    permission_classes = [IsAuthenticated, IsBotActingForTelegramUser]

    class InputSerializer(serializers.Serializer):
        file_id = fields.IdentifierField(
            max_length=schemas.FILE_ID_MAX, pattern=schemas.FILE_ID_PATTERN
        )
        file_unique_id = fields.IdentifierField(
            max_length=schemas.FILE_UNIQUE_ID_MAX, pattern=schemas.FILE_ID_PATTERN
        )
        size = fields.IntegerField(required=False, allow_null=True)
        mime_type = fields.IdentifierField(
            max_length=schemas.MIME_TYPE_MAX,
            pattern=schemas.MIME_TYPE_PATTERN,
            required=False,
            default="",
            allow_blank=True,
        )
        file_name = fields.TextField(
            max_length=schemas.FILE_NAME_MAX, required=False, default="", allow_blank=True
        )

    class OutputSerializer(serializers.Serializer):
        id = serializers.IntegerField()
        file_unique_id = serializers.CharField()
        size = serializers.IntegerField(allow_null=True)

    @extend_schema(
        operation_id="docbot_received_files_create",
        description=(
            "The bot (service token acting for a Telegram user) records a file that user sent it; "
            "the returned `id` names the file in `POST documents/`. Idempotent on the file's "
            "`file_unique_id`."
        ),
        parameters=[TELEGRAM_HEADER_PARAMETER],
        request=InputSerializer,
        responses={201: OutputSerializer},
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        received = services.received_file_record(user=request.user, **data.validated_data)
        return Response(self.OutputSerializer(received).data, status=status.HTTP_201_CREATED)


#: Body fields a caller once chose and now may not: the chat is the acting user's own, the file
#: one they sent the bot (`file`, from `POST received-files/`).
SERVER_CHOSEN_FIELDS = ("chat_id", "file_id", "file_unique_id", "size", "mime_type", "file_name")


class DocumentListCreateApi(DocbotApi):
    class InputSerializer(serializers.Serializer):
        type_id = fields.IntegerField()
        name = _document_name()
        file = fields.IntegerField(
            min_value=1, help_text="id of a file this Telegram user sent the bot"
        )

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            raw = self.initial_data if isinstance(self.initial_data, Mapping) else {}
            refused = {
                name: ["is chosen by the server, not the caller"]
                for name in SERVER_CHOSEN_FIELDS
                if name in raw
            }
            if refused:
                raise serializers.ValidationError(refused)
            return attrs

    class FilterSerializer(serializers.Serializer):
        type = fields.IntegerField(required=False)
        q = fields.TextField(required=False, default="", max_length=128, allow_blank=True)
        name = _document_name(required=False, default="")

    @extend_schema(
        operation_id="docbot_documents_list",
        description=(
            "The acting user's documents (pending and stored), newest first, 8 per page by "
            "cursor; `type` keeps one type, `q` matches names case-insensitively, `name` exactly."
        ),
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
        description=(
            "A pending document from a file this Telegram user sent the bot (`file`, from `POST "
            "received-files/`); 202, and its ingestion is queued after commit (the user is told "
            "in Telegram when it is stored). The same request again returns the same document."
        ),
        parameters=[TELEGRAM_HEADER_PARAMETER],
        request=InputSerializer,
        responses={
            202: DocumentOutput,
            409: _refusal("`name_taken`: another file has that name in the type."),
            422: _refusal("`file_too_large`: over DOCBOT_MAX_FILE_BYTES (20 MB)."),
        },
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        document = services.document_create(user=request.user, **data.validated_data)
        return Response(DocumentOutput(document).data, status=status.HTTP_202_ACCEPTED)


class DocumentDetailApi(DocbotApi):
    class InputSerializer(serializers.Serializer):
        name = _document_name(required=False)
        type_id = fields.IntegerField(required=False)

    @extend_schema(
        operation_id="docbot_documents_retrieve",
        description=("One of the acting user's documents; another user's is a 404."),
        parameters=[TELEGRAM_HEADER_PARAMETER],
        responses={200: DocumentOutput},
    )
    def get(self, request: Request, document_id: int) -> Response:
        document = selectors.document_get(user=request.user, document_id=document_id)
        return Response(DocumentOutput(document).data)

    @extend_schema(
        operation_id="docbot_documents_update",
        description=(
            "Rename a document and/or move it to another of the acting user's types; 409 "
            "`name_taken` when the target type already has that name."
        ),
        parameters=[TELEGRAM_HEADER_PARAMETER],
        request=InputSerializer,
        responses={200: DocumentOutput, 409: _refusal("`name_taken` in the target type.")},
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
        description=("Delete a document and, after commit, its stored file."),
        parameters=[TELEGRAM_HEADER_PARAMETER],
        responses={204: None},
    )
    def delete(self, request: Request, document_id: int) -> Response:
        services.document_delete(user=request.user, document_id=document_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class DocumentShareApi(DocbotApi):
    class OutputSerializer(serializers.Serializer):
        url = serializers.CharField(
            help_text="`/docbot/files/<token>/<file name>`: anyone holding it can download"
        )
        expires_at = serializers.DateTimeField()
        file_name = serializers.CharField(help_text="the name the download is saved as")

    @extend_schema(
        operation_id="docbot_documents_share",
        description=(
            "A signed download link to a stored document, valid for "
            "DOCBOT_SHARE_LINK_TTL_SECONDS; its last segment and `file_name` are the name the "
            "download is saved as. 409 `not_stored` while ingestion is pending or after it "
            "failed."
        ),
        parameters=[TELEGRAM_HEADER_PARAMETER],
        request=None,
        responses={
            201: OutputSerializer,
            409: _refusal("`not_stored`: ingestion is pending or failed."),
        },
    )
    def post(self, request: Request, document_id: int) -> Response:
        link = services.share_link_create(user=request.user, document_id=document_id)
        body: dict[str, Any] = {
            "url": link.url,
            "expires_at": link.expires_at,
            "file_name": link.file_name,
        }
        return Response(self.OutputSerializer(body).data, status=status.HTTP_201_CREATED)
