"""Operator REST API (staff only): parse, call one service or selector, serialize."""

from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.permissions import IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from common import fields
from common.pagination import LimitOffsetPagination
from vmcontrol import selectors, services
from vmcontrol.models import VirtualMachine
from vmcontrol.protocol import MAX_CPU_CORES, MAX_DISK_GB, MAX_DISKS, MAX_NAME_LENGTH, MAX_RAM_MB
from vmcontrol.protocol import Disk as WireDisk


class DiskOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    size_gb = serializers.IntegerField()


class VmOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    status = serializers.CharField(
        source="live_status", help_text="offline once the server holding the session is gone"
    )
    cpu_cores = serializers.IntegerField()
    ram_mb = serializers.IntegerField()
    disks = DiskOutputSerializer(many=True)
    first_connected_at = serializers.DateTimeField(allow_null=True)
    last_seen_at = serializers.DateTimeField(allow_null=True)
    authorized_at = serializers.DateTimeField(allow_null=True)
    token_revoked = serializers.SerializerMethodField()

    def get_token_revoked(self, vm: VirtualMachine) -> bool:
        return not vm.token_hash


class DiskInputSerializer(serializers.Serializer):
    name = fields.TextField(max_length=MAX_NAME_LENGTH)
    size_gb = fields.IntegerField(min_value=0, max_value=MAX_DISK_GB)


def _page_of(item: type[serializers.Serializer], name: str) -> Any:
    return inline_serializer(
        name=name,
        fields={
            "count": serializers.IntegerField(),
            "next": serializers.CharField(allow_null=True),
            "previous": serializers.CharField(allow_null=True),
            "results": item(many=True),
        },
    )


def _disks(raw: list[dict[str, Any]] | None) -> list[WireDisk] | None:
    if raw is None:
        return None
    names = [d["name"] for d in raw]
    if len(set(names)) != len(names):
        raise serializers.ValidationError({"disks": "disk names must be unique"})
    return [WireDisk(name=d["name"], size_gb=d["size_gb"]) for d in raw]


class VmListApi(APIView):
    """List VMs (`?filter=connected|authorized|ever_connected`) or register one (POST); the
    token is in the POST answer only, never again."""

    permission_classes = [IsAdminUser]

    class FilterSerializer(serializers.Serializer):
        filter = serializers.ChoiceField(choices=selectors.VM_FILTERS, required=False)

    class InputSerializer(serializers.Serializer):
        name = fields.TextField(max_length=MAX_NAME_LENGTH)
        cpu_cores = fields.IntegerField(min_value=1, max_value=MAX_CPU_CORES, default=1)
        ram_mb = fields.IntegerField(min_value=1, max_value=MAX_RAM_MB, default=512)
        disks = DiskInputSerializer(many=True, required=False, max_length=MAX_DISKS)  # type: ignore[call-arg]

    class OutputSerializer(VmOutputSerializer):
        token = serializers.CharField(help_text="shown once")

    @extend_schema(
        operation_id="vmcontrol_vms_list",
        parameters=[
            FilterSerializer,
            OpenApiParameter("limit", int),
            OpenApiParameter("offset", int),
        ],
        responses={200: _page_of(VmOutputSerializer, "VmPage")},
    )
    def get(self, request: Request) -> Response:
        query = self.FilterSerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        vms = selectors.vm_list(filter=query.validated_data.get("filter"))
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(vms, request, view=self)
        return paginator.get_paginated_response(VmOutputSerializer(page, many=True).data)

    @extend_schema(request=InputSerializer, responses={201: OutputSerializer})
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        vm, token = services.vm_register(
            name=data.validated_data["name"],
            cpu_cores=data.validated_data["cpu_cores"],
            ram_mb=data.validated_data["ram_mb"],
            disks=_disks(data.validated_data.get("disks")) or [],
            actor=request.user,
        )
        vm = selectors.vm_get(vm_id=vm.pk)
        vm.token = token  # type: ignore[attr-defined]
        return Response(self.OutputSerializer(vm).data, status=status.HTTP_201_CREATED)


class SessionOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    peer = serializers.CharField()
    started_at = serializers.DateTimeField()
    authorized_at = serializers.DateTimeField(allow_null=True)
    ended_at = serializers.DateTimeField(allow_null=True)
    end_reason = serializers.CharField()


class VmDetailApi(APIView):
    """One VM with disks and last sessions; PATCH pushes `update_specs` to its agent and stores
    the change once the agent acknowledges (409 not authorized, 504 agent timeout)."""

    permission_classes = [IsAdminUser]

    class InputSerializer(serializers.Serializer):
        cpu_cores = fields.IntegerField(min_value=1, max_value=MAX_CPU_CORES, required=False)
        ram_mb = fields.IntegerField(min_value=1, max_value=MAX_RAM_MB, required=False)
        disks = DiskInputSerializer(many=True, required=False, max_length=MAX_DISKS)  # type: ignore[call-arg]

    class OutputSerializer(VmOutputSerializer):
        sessions = SessionOutputSerializer(many=True, source="recent_sessions")

    def _detail(self, vm_id: int) -> Response:
        vm = selectors.vm_get(vm_id=vm_id)
        vm.recent_sessions = selectors.vm_sessions(vm_id=vm_id)  # type: ignore[attr-defined]
        return Response(self.OutputSerializer(vm).data)

    @extend_schema(responses={200: OutputSerializer})
    def get(self, request: Request, vm_id: int) -> Response:
        return self._detail(vm_id)

    @extend_schema(request=InputSerializer, responses={200: OutputSerializer})
    def patch(self, request: Request, vm_id: int) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.vm_update_specs(
            vm_id=vm_id,
            cpu_cores=data.validated_data.get("cpu_cores"),
            ram_mb=data.validated_data.get("ram_mb"),
            disks=_disks(data.validated_data.get("disks")),
            actor=request.user,
        )
        return self._detail(vm_id)


class VmLogoutApi(APIView):
    """Log an authorized VM out (it must authorize again); 409 when it is not authorized."""

    permission_classes = [IsAdminUser]

    @extend_schema(request=None, responses={200: VmOutputSerializer})
    def post(self, request: Request, vm_id: int) -> Response:
        services.vm_logout(vm_id=vm_id, actor=request.user)
        return Response(VmOutputSerializer(selectors.vm_get(vm_id=vm_id)).data)


class VmTokenRotateApi(APIView):
    """Issue a new token (shown once); the old one stops working at once."""

    permission_classes = [IsAdminUser]

    class OutputSerializer(serializers.Serializer):
        vm_id = serializers.IntegerField()
        token = serializers.CharField(help_text="shown once")

    @extend_schema(request=None, responses={200: OutputSerializer})
    def post(self, request: Request, vm_id: int) -> Response:
        token = services.vm_token_rotate(vm_id=vm_id, actor=request.user)
        return Response(self.OutputSerializer({"vm_id": vm_id, "token": token}).data)


class VmTokenRevokeApi(APIView):
    """Revoke the VM's token: no agent can authorize as it until a rotate."""

    permission_classes = [IsAdminUser]

    @extend_schema(request=None, responses={200: VmOutputSerializer})
    def post(self, request: Request, vm_id: int) -> Response:
        services.vm_token_revoke(vm_id=vm_id, actor=request.user)
        return Response(VmOutputSerializer(selectors.vm_get(vm_id=vm_id)).data)


class VmCommandListApi(APIView):
    """Commands sent to the VM, newest first."""

    permission_classes = [IsAdminUser]

    class OutputSerializer(serializers.Serializer):
        id = serializers.UUIDField()
        name = serializers.CharField()
        args = serializers.JSONField()
        status = serializers.CharField()
        result = serializers.JSONField(allow_null=True)
        error = serializers.JSONField(allow_null=True)
        created_at = serializers.DateTimeField()
        sent_at = serializers.DateTimeField(allow_null=True)
        finished_at = serializers.DateTimeField(allow_null=True)

    @extend_schema(
        parameters=[OpenApiParameter("limit", int), OpenApiParameter("offset", int)],
        responses={200: _page_of(OutputSerializer, "VmCommandPage")},
    )
    def get(self, request: Request, vm_id: int) -> Response:
        commands = selectors.vm_commands(vm_id=vm_id)
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(commands, request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)


class DiskListApi(APIView):
    """Every disk with its size and the VM it belongs to."""

    permission_classes = [IsAdminUser]

    class OutputSerializer(serializers.Serializer):
        id = serializers.IntegerField()
        name = serializers.CharField()
        size_gb = serializers.IntegerField()
        vm_id = serializers.IntegerField()
        vm_name = serializers.CharField(source="vm.name")

    @extend_schema(
        parameters=[OpenApiParameter("limit", int), OpenApiParameter("offset", int)],
        responses={200: _page_of(OutputSerializer, "DiskPage")},
    )
    def get(self, request: Request) -> Response:
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(selectors.disk_list(), request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)
