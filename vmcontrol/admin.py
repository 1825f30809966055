from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from common.exceptions import ApplicationError
from vmcontrol import services
from vmcontrol.models import AgentSession, AuditEvent, Command, Disk, VirtualMachine


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


@admin.register(VirtualMachine)
class VirtualMachineAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "status", "cpu_cores", "ram_mb", "last_seen_at", "created_at"]
    list_filter = ["status"]
    search_fields = ["name", "=id"]
    readonly_fields = [
        "status",
        "current_session_id",
        "first_connected_at",
        "last_seen_at",
        "authorized_at",
        "token_hash",
        "registered_by",
    ]
    inlines = [DiskInline, SessionInline]
    actions = ["logout", "revoke_token"]

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
