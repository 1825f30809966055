"""Operator UI for vmcontrol. Every write goes through a service, as on the other doors:

- "Add" on virtual machines registers the VM (`services.vm_register`) and shows its token once,
  in a message, with the command that starts its agent;
- "Change" of CPU, RAM or disks pushes `update_specs` to the agent (`services.vm_update_specs`,
  audited; stored once the agent acknowledges); a VM that is not authorized, or an agent that
  refuses or does not answer, leaves it unchanged with the reason shown. The name is set at
  registration; VMs are not deleted here (revoke the token instead);
- logout, token rotation (the new token shown once) and revocation are list actions
  (`services.vm_logout`, `vm_token_rotate`, `vm_token_revoke`);
- sessions, commands, audit events and server leases are read-only (written by the TCP server
  and the services only).
"""

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import csrf_protect_m
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect

from common import parsers
from common.admin import ReadOnlyAdmin, ReadOnlyInline
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
from vmcontrol.protocol import MAX_CPU_CORES, MAX_DISK_GB, MAX_DISKS, MAX_NAME_LENGTH, MAX_RAM_MB
from vmcontrol.protocol import Disk as WireDisk

_REFUSED = "_vmcontrol_admin_refused"
"""Request attribute: why the service refused the change (the page says so, nothing is logged)."""


class ParsedIntegerField(forms.CharField):
    """An integer read by the shared parser (ASCII digits only, within bounds)."""

    widget = forms.NumberInput

    def __init__(self, *, min_value: int, max_value: int, **kwargs: Any) -> None:
        self.min_value, self.max_value = min_value, max_value
        super().__init__(**kwargs)

    def to_python(self, value: Any) -> int | None:  # type: ignore[override]
        text = super().to_python(value)
        if text in self.empty_values:
            return None
        try:
            return parsers.integer(
                text, field="value", min_value=self.min_value, max_value=self.max_value
            )
        except parsers.InvalidValue as error:
            raise ValidationError(error.details["value"][0]) from None


class ParsedTextField(forms.CharField):
    """Clean single-line text read by the shared parser."""

    def to_python(self, value: Any) -> str:
        text = super().to_python(value)
        if text in self.empty_values:
            return ""
        try:
            return parsers.text(text, field="value", max_length=MAX_NAME_LENGTH)
        except parsers.InvalidValue as error:
            raise ValidationError(error.details["value"][0]) from None


class VirtualMachineForm(forms.ModelForm):
    name = ParsedTextField(max_length=MAX_NAME_LENGTH)
    cpu_cores = ParsedIntegerField(min_value=1, max_value=MAX_CPU_CORES, initial=1)
    ram_mb = ParsedIntegerField(
        min_value=1, max_value=MAX_RAM_MB, initial=512, label="RAM (MB)", help_text="MiB"
    )

    class Meta:
        model = VirtualMachine
        fields = ["name", "cpu_cores", "ram_mb"]


class DiskForm(forms.ModelForm):
    name = ParsedTextField(max_length=MAX_NAME_LENGTH)
    size_gb = ParsedIntegerField(min_value=0, max_value=MAX_DISK_GB, label="Size (GB)")

    class Meta:
        model = Disk
        fields = ["name", "size_gb"]


class DiskFormSet(BaseInlineFormSet):
    """The VM's disks as the operator wants them: unique names, at most MAX_DISKS. Never saved
    by the formset: `VirtualMachineAdmin.save_related` hands them to a service."""

    def clean(self) -> None:
        super().clean()
        names = [name for name, _ in self.wanted()]
        if len(set(names)) != len(names):
            raise ValidationError("Disk names must be unique.")
        if len(names) > MAX_DISKS:
            raise ValidationError(f"A VM has at most {MAX_DISKS} disks.")

    def wanted(self) -> list[tuple[str, int]]:
        """(name, size in GB) of every disk kept or added, in form order."""
        deleted = set(map(id, self.deleted_forms)) if self.can_delete else set()
        return [
            (form.cleaned_data["name"], form.cleaned_data["size_gb"])
            for form in self.forms
            if id(form) not in deleted
            and getattr(form, "cleaned_data", None)
            and form.cleaned_data.get("name")
        ]


class DiskInline(admin.TabularInline):
    model = Disk
    form = DiskForm
    formset = DiskFormSet
    extra = 0
    fields = ["name", "size_gb"]


class SessionInline(ReadOnlyInline):
    model = AgentSession
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
    form = VirtualMachineForm
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
    actions = ["logout", "rotate_token", "revoke_token"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[VirtualMachine]:
        return selectors.with_live_status(super().get_queryset(request))

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ["name", "cpu_cores", "ram_mb"]
        return ["name", "cpu_cores", "ram_mb", *self.readonly_fields]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        # The name is given at registration; the rest is the server's to write.
        return [] if obj is None else ["name", *self.readonly_fields]

    def get_inlines(self, request: HttpRequest, obj: Any) -> list[type]:
        return [DiskInline] if obj is None else [DiskInline, SessionInline]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="status", ordering="live_status")
    def live_status(self, vm: VirtualMachine) -> str:
        """The live status (offline once the server holding the session is gone)."""
        return str(getattr(vm, "live_status", None) or selectors.vm_live_status(vm_id=vm.pk))

    # Writes: all in `save_related`, where the disks are known; each calls one service.

    @csrf_protect_m
    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # Without the admin's request-wide transaction: the services own theirs, and an update
        # waits for the agent, whose answer is recorded on another connection that must see
        # the committed command row.
        view = self._changeform_view  # type: ignore[attr-defined]  # Django's, unwrapped
        return view(request, object_id, form_url, extra_context)

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        """Nothing is written here: `save_related` calls the service with the disks too."""

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        disks_formset = next(f for f in formsets if isinstance(f, DiskFormSet))
        # The formsets are not saved (the service writes the disks); the admin's change
        # message reads these.
        for formset in formsets:
            formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []
        disks = [WireDisk(name=name, size_gb=size) for name, size in disks_formset.wanted()]
        data = form.cleaned_data
        if not change:
            self._register(request, form, data, disks)
        elif form.has_changed() or disks_formset.has_changed():
            self._update(request, form.instance.pk, data, disks)

    def _register(
        self, request: HttpRequest, form: Any, data: dict[str, Any], disks: list[WireDisk]
    ) -> None:
        vm, token = services.vm_register(
            name=data["name"],
            cpu_cores=data["cpu_cores"],
            ram_mb=data["ram_mb"],
            disks=disks,
            actor=request.user,
        )
        form.instance.pk = vm.pk
        self.message_user(
            request,
            f"Token of {vm} (shown once, copy it now; only its hash is kept): {token}",
            messages.WARNING,
        )
        self.message_user(
            request,
            f"Start its agent with: python manage.py run_vm_agent --vm-id {vm.pk} "
            "--token <the token>. Lost it? Select the VM in the list and run “Rotate the "
            "selected VMs' tokens”.",
            messages.INFO,
        )

    def _update(
        self, request: HttpRequest, vm_id: int, data: dict[str, Any], disks: list[WireDisk]
    ) -> None:
        try:
            services.vm_update_specs(
                vm_id=vm_id,
                cpu_cores=data["cpu_cores"],
                ram_mb=data["ram_mb"],
                disks=disks,
                actor=request.user,
            )
        except ApplicationError as error:
            setattr(request, _REFUSED, error.message)
        else:
            self.message_user(request, "The agent applied the new specs.", messages.SUCCESS)

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        if getattr(request, _REFUSED, None) is not None:
            return None
        return super().log_change(request, obj, message)

    def response_change(self, request: HttpRequest, obj: Any) -> HttpResponse:
        refused = getattr(request, _REFUSED, None)
        if refused is None:
            return super().response_change(request, obj)
        self.message_user(request, f"Not changed: {refused}", messages.ERROR)
        return HttpResponseRedirect(request.path)

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

    @admin.action(description="Rotate the selected VMs' tokens (each new token shown once)")
    def rotate_token(self, request: HttpRequest, queryset: QuerySet[VirtualMachine]) -> None:
        for vm in queryset:
            try:
                token = services.vm_token_rotate(vm_id=vm.pk, actor=request.user)
            except ApplicationError as error:
                self.message_user(request, f"{vm}: {error.message}", messages.WARNING)
            else:
                self.message_user(
                    request, f"{vm}: new token (shown once): {token}", messages.WARNING
                )

    @admin.action(description="Revoke the selected VMs' tokens")
    def revoke_token(self, request: HttpRequest, queryset: QuerySet[VirtualMachine]) -> None:
        self._each(request, queryset, services.vm_token_revoke, "token revoked")


@admin.register(AgentSession)
class AgentSessionAdmin(ReadOnlyAdmin):
    list_display = ["id", "vm", "peer", "started_at", "authorized_at", "ended_at", "end_reason"]
    list_filter = ["end_reason", "server_name"]
    search_fields = ["peer", "=vm__id"]
    list_select_related = ["vm"]


@admin.register(ServerLease)
class ServerLeaseAdmin(ReadOnlyAdmin):
    list_display = ["name", "host", "pid", "started_at", "renewed_at", "expires_at"]


@admin.register(Command)
class CommandAdmin(ReadOnlyAdmin):
    list_display = ["id", "vm", "name", "status", "created_at", "sent_at", "finished_at"]
    list_filter = ["status", "name"]
    search_fields = ["=vm__id"]
    list_select_related = ["vm"]


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ["at", "action", "vm_id", "actor"]
    list_filter = ["action"]
    search_fields = ["=vm_id", "action"]
