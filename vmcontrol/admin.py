from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from common.exceptions import ApplicationError
from vmcontrol import selectors, services
from vmcontrol.models import (
    AgentSession,
    AuditEvent,
    Command,
    Disk,
    ServerLease,
    VirtualMachine,
    VmStatus,
)


class DiskInline(admin.TabularInline):
    model = Disk
    extra = 0
    readonly_fields = ["id"]


class SessionInline(admin.TabularInline):
    model = AgentSession
    extra = 0
    can_delete = False
    max_num = 0
    fields = ["id", "peer", "started_at", "authorized_at", "ended_at", "end_reason"]
    readonly_fields = ["id", "peer", "started_at", "authorized_at", "ended_at", "end_reason"]
    ordering = ["-started_at"]


class LiveStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "live_status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(choice.value, str(choice.label)) for choice in VmStatus]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(live_status=value) if value else queryset


@admin.register(VirtualMachine)
class VirtualMachineAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "name",
        "live_status",
        "cpu_cores",
        "ram_mb",
        "last_seen_at",
        "created_at",
    ]
    list_filter = [LiveStatusFilter]
    search_fields = ["name", "=id"]
    # The stored status is what the owning server last wrote; operators see the live one.
    exclude = ["status"]
    readonly_fields = [
        "live_status",
        "current_session_id",
        "first_connected_at",
        "last_seen_at",
        "authorized_at",
        "token_hash",
        "registered_by",
    ]
    inlines = [DiskInline, SessionInline]
    actions = ["logout", "revoke_token"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[VirtualMachine]:
        return selectors.with_live_status(super().get_queryset(request))

    @admin.display(description="status", ordering="live_status")
    def live_status(self, vm: VirtualMachine) -> str:
        """The live status (offline once the server holding the session is gone)."""
        return str(getattr(vm, "live_status", None) or selectors.vm_live_status(vm_id=vm.pk))

    def _each(self, request: HttpRequest, queryset: QuerySet[Any], call: Any, done: str) -> None:
        for vm in queryset:
            try:
                call(vm_id=vm.pk, actor=request.user)
            except ApplicationError as error:
                self.message_user(request, f"{vm}: {error.message}", messages.WARNING)
            else:
                self.message_user(request, f"{vm}: {done}")

    @admin.action(description="Log out the selected VMs")
    def logout(self, request: HttpRequest, queryset: QuerySet[VirtualMachine]) -> None:
        self._each(request, queryset, services.vm_logout, "logged out")

    @admin.action(description="Revoke the selected VMs' tokens")
    def revoke_token(self, request: HttpRequest, queryset: QuerySet[VirtualMachine]) -> None:
        self._each(request, queryset, services.vm_token_revoke, "token revoked")


@admin.register(AgentSession)
class AgentSessionAdmin(admin.ModelAdmin):
    list_display = ["id", "vm", "peer", "started_at", "authorized_at", "ended_at", "end_reason"]
    list_filter = ["end_reason", "server_name"]
    search_fields = ["peer", "=vm__id"]
    list_select_related = ["vm"]


@admin.register(ServerLease)
class ServerLeaseAdmin(admin.ModelAdmin):
    list_display = ["name", "host", "pid", "started_at", "renewed_at", "expires_at"]
    readonly_fields = ["name", "host", "pid", "started_at", "renewed_at", "expires_at"]


@admin.register(Command)
class CommandAdmin(admin.ModelAdmin):
    list_display = ["id", "vm", "name", "status", "created_at", "finished_at"]
    list_filter = ["status", "name"]
    search_fields = ["=vm__id"]
    list_select_related = ["vm"]
    readonly_fields = [f.name for f in Command._meta.fields]


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ["at", "action", "vm_id", "actor"]
    list_filter = ["action"]
    search_fields = ["=vm_id", "action"]
    readonly_fields = ["at", "action", "vm_id", "actor", "details"]
