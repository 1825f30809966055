"""The one DRF exception handler, pagination, and the platform's auth endpoints."""

from typing import Any

from django.conf import settings
from django.contrib.auth import authenticate
from django.contrib.auth.signals import user_logged_in
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from drf_spectacular.utils import extend_schema, inline_serializer
from knox.models import AuthToken
from rest_framework import exceptions as drf_exceptions
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from common import exceptions as app_errors
from common import fields, services
from common.throttling import ScopedRateThrottle

HTTP_STATUS_BY_ERROR: dict[type[app_errors.ApplicationError], int] = {
    app_errors.ValidationFailed: status.HTTP_400_BAD_REQUEST,
    app_errors.NotAuthenticated: status.HTTP_401_UNAUTHORIZED,
    app_errors.PermissionDenied: status.HTTP_403_FORBIDDEN,
    app_errors.NotFound: status.HTTP_404_NOT_FOUND,
    app_errors.Conflict: status.HTTP_409_CONFLICT,
    app_errors.PreconditionFailed: status.HTTP_409_CONFLICT,
    app_errors.Unprocessable: status.HTTP_422_UNPROCESSABLE_ENTITY,
    app_errors.RateLimited: status.HTTP_429_TOO_MANY_REQUESTS,
    app_errors.Unavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
    app_errors.UpstreamTimeout: status.HTTP_504_GATEWAY_TIMEOUT,
}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def http_status_for(error: app_errors.ApplicationError) -> int:
    for error_class in type(error).__mro__:
        if error_class in HTTP_STATUS_BY_ERROR:
            return HTTP_STATUS_BY_ERROR[error_class]
    return status.HTTP_400_BAD_REQUEST


def _drf_error_code(exc: drf_exceptions.APIException) -> str:
    codes = exc.get_codes()
    if isinstance(codes, str):
        return codes
    return "invalid" if isinstance(exc, drf_exceptions.ValidationError) else exc.default_code


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Map every error to `{"error": {"code", "message", "details"}}`."""
    if isinstance(exc, app_errors.ApplicationError):
        return Response(error_body(exc.code, exc.message, exc.details), status=http_status_for(exc))
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    if not isinstance(exc, drf_exceptions.APIException):
        return None
    headers: dict[str, str] = {}
    auth_header = getattr(exc, "auth_header", None)
    if auth_header:
        headers["WWW-Authenticate"] = str(auth_header)
    if getattr(exc, "wait", None):
        headers["Retry-After"] = str(int(exc.wait))  # type: ignore[attr-defined]
    if isinstance(exc, drf_exceptions.ValidationError):
        body = error_body("invalid", "The input is invalid.", exc.detail)
    else:
        body = error_body(_drf_error_code(exc), str(exc.detail))
    return Response(body, status=exc.status_code, headers=headers)


def json_not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse(error_body("not_found", "Not found."), status=404)


def json_bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """A request Django refuses before any view (an unknown Host, a malformed cookie or
    multipart body: SuspiciousOperation), in the error envelope."""
    return JsonResponse(error_body("bad_request", "Bad request."), status=400)


def json_permission_denied(
    request: HttpRequest, exception: Exception | None = None
) -> JsonResponse:
    return JsonResponse(error_body("permission_denied", "Permission denied."), status=403)


def json_server_error(request: HttpRequest) -> JsonResponse:
    return JsonResponse(error_body("server_error", "Internal server error."), status=500)


class _TokenOutputSerializer(serializers.Serializer):
    token = serializers.CharField()
    expiry = serializers.DateTimeField(allow_null=True)


class AuthTokenCreateApi(APIView):
    """Exchange a username and password for an API token (`Authorization: Token <token>`).

    The token expires API_TOKEN_TTL_HOURS after its last use. LOGIN_FAILURE_LIMIT failed
    attempts for one account or from one client IP answer 429 `login_locked` (Retry-After)
    until LOGIN_LOCKOUT_SECONDS pass, even for the right password (django-axes)."""

    authentication_classes: list[type] = []
    permission_classes = [AllowAny]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "login"

    class InputSerializer(serializers.Serializer):
        username = fields.TextField(max_length=150)
        password = fields.TextField(max_length=128, trim_whitespace=False)

    @extend_schema(request=InputSerializer, responses={200: _TokenOutputSerializer}, auth=[])
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user = authenticate(
            request._request,
            username=data.validated_data["username"],
            password=data.validated_data["password"],
        )
        if user is None or not user.is_active:
            raise app_errors.NotAuthenticated(
                "Invalid username or password.", code="bad_credentials"
            )
        # A login like the admin's: last_login is stamped and django-axes resets the counts.
        user_logged_in.send(sender=type(user), request=request._request, user=user)
        instance, token = AuthToken.objects.create(user=user)
        return Response(_TokenOutputSerializer({"token": token, "expiry": instance.expiry}).data)


class AuthRegisterApi(APIView):
    """Create a bettor / messenger account and return its first token."""

    authentication_classes: list[type] = []
    permission_classes = [AllowAny]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "register"

    class InputSerializer(serializers.Serializer):
        username = serializers.RegexField(r"^[\w.@+-]+\Z", max_length=150)
        password = fields.TextField(max_length=128, trim_whitespace=False)
        email = serializers.EmailField(required=False, allow_blank=True)

    class OutputSerializer(serializers.Serializer):
        id = serializers.IntegerField()
        username = serializers.CharField()
        token = serializers.CharField()

    @extend_schema(request=InputSerializer, responses={201: OutputSerializer}, auth=[])
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user = services.user_register(**data.validated_data)
        _, token = AuthToken.objects.create(user=user)
        body = {"id": user.pk, "username": user.get_username(), "token": token}
        return Response(self.OutputSerializer(body).data, status=status.HTTP_201_CREATED)


def login_lockout_response(
    request: HttpRequest, original_response: Any = None, credentials: Any = None
) -> HttpResponse:
    """django-axes' lockout answer (AXES_LOCKOUT_CALLABLE): 429 with Retry-After, as the JSON
    error envelope on the API and as a short page on /admin/login/."""
    retry_after = str(int(settings.AXES_COOLOFF_TIME.total_seconds()))
    message = "Too many failed login attempts; try again later."
    response: HttpResponse
    if request.path.startswith("/api/"):
        response = JsonResponse(error_body("login_locked", message), status=429)
    else:
        response = HttpResponse(
            f"<!doctype html><title>Locked</title><h1>Locked</h1><p>{message}</p>",
            status=429,
            content_type="text/html; charset=utf-8",
        )
    response["Retry-After"] = retry_after
    return response


class AuthLogoutApi(APIView):
    """Revoke the token this request was made with."""

    permission_classes = [IsAuthenticated]

    @extend_schema(request=None, responses={204: None})
    def post(self, request: Request) -> Response:
        if isinstance(request.auth, AuthToken):
            request.auth.delete()
        return Response(status=status.HTTP_204_NO_CONTENT)


class AuthLogoutAllApi(APIView):
    """Revoke every API token of the authenticated user (all devices), this one included."""

    permission_classes = [IsAuthenticated]

    @extend_schema(request=None, responses={204: None})
    def post(self, request: Request) -> Response:
        assert request.user.is_authenticated  # IsAuthenticated
        services.user_tokens_revoke(user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MeApi(APIView):
    """Who am I: the authenticated user's id, name and staff flag."""

    @extend_schema(
        responses=inline_serializer(
            "Me",
            {
                "id": serializers.IntegerField(),
                "username": serializers.CharField(),
                "is_staff": serializers.BooleanField(),
            },
        )
    )
    def get(self, request: Request) -> Response:
        user = request.user
        return Response({"id": user.pk, "username": user.get_username(), "is_staff": user.is_staff})
