"""vmcontrol's panel on the operator console (`shared/specs/console.md`).

Now: VMs connected / authorized / offline (live status), heartbeats per second (the
`vmcontrol.heartbeats` counter, counted where a ping arrives), commands queued, sent, failed
and timed out. Needs a human: VMs that went offline in the last hour, failed or timed-out
commands (each with a retry). Table: the VMs live now (an authorized one can be logged out).

The two actions are interfaces like an API view: parse `params` with the shared parsers, call
one service, answer one line; a refusal is the service's `ApplicationError`.
"""

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from django.urls import reverse
from django.utils import timezone

from common import parsers
from common.console import (
    ActionRef,
    Attention,
    ConsoleAction,
    ConsolePanel,
    PanelSample,
    Row,
    console_count_totals,
    console_when,
)
from vmcontrol import selectors, services
from vmcontrol.models import Command, CommandStatus, VirtualMachine, VmStatus

PANEL = "vmcontrol"
HEARTBEATS = "vmcontrol.heartbeats"
OFFLINE_WINDOW = timedelta(hours=1)
LIMIT = 20


def _vm_link(vm_id: int) -> str:
    return reverse("admin:vmcontrol_virtualmachine_change", args=[vm_id])


def _command_link(command: Command) -> str:
    return reverse("admin:vmcontrol_command_change", args=[command.pk])


def _logout_ref(vm_id: int) -> ActionRef:
    return {"action": "logout", "label": "Log out", "params": {"vm_id": vm_id}}


def _retry_ref(command: Command) -> ActionRef:
    return {"action": "retry", "label": "Retry", "params": {"command_id": str(command.pk)}}


def _gone_offline(vm: VirtualMachine) -> Attention:
    reason = getattr(vm, "last_end_reason", "") or "its server stopped"
    return {
        "key": f"offline-{vm.pk}",
        "text": (
            f"VM {vm.name} (#{vm.pk}) offline, last seen {console_when(vm.last_seen_at)} ({reason})"
        ),
        "link": _vm_link(vm.pk),
    }


def _failed(command: Command) -> Attention:
    error = command.error if isinstance(command.error, dict) else {}
    why = str(error.get("message") or error.get("code") or "")[:120]
    outcome = "timed out" if command.status == CommandStatus.TIMED_OUT else "failed"
    return {
        "key": f"command-{command.pk}",
        "text": (
            f"{command.name} to VM {command.vm.name} (#{command.vm_id}) {outcome} "
            f"at {console_when(command.finished_at or command.created_at)}"
            + (f": {why}" if why else "")
        ),
        "link": _command_link(command),
        "actions": [_retry_ref(command)],
    }


def _live_row(vm: VirtualMachine) -> Row:
    status = str(getattr(vm, "live_status", vm.status))
    row: Row = {
        "key": str(vm.pk),
        "cells": [f"{vm.name} (#{vm.pk})", status, console_when(vm.last_seen_at)],
        "link": _vm_link(vm.pk),
    }
    if status == VmStatus.AUTHORIZED:
        row["actions"] = [_logout_ref(vm.pk)]
    return row


def sample() -> PanelSample:
    """The panel now: five small queries (`selectors.console_*`), no lock; at most `LIMIT`
    rows per list."""
    vms = selectors.console_vm_counts()
    commands = selectors.console_command_counts()
    gone = selectors.console_vms_gone_offline(since=timezone.now() - OFFLINE_WINDOW, limit=LIMIT)
    failed = selectors.console_commands_failed(limit=LIMIT)
    live = selectors.console_vms_live(limit=LIMIT)
    heartbeats = console_count_totals([HEARTBEATS]).get(HEARTBEATS, 0)
    return {
        "counters": {HEARTBEATS: {"label": "heartbeats", "value": heartbeats}},
        "numbers": [
            {"key": "connected", "label": "VMs connected", "value": vms["connected"]},
            {"key": "authorized", "label": "VMs authorized", "value": vms["authorized"]},
            {"key": "offline", "label": "VMs offline", "value": vms["offline"]},
            {"key": "queued", "label": "commands queued", "value": commands["queued"]},
            {"key": "sent", "label": "commands sent", "value": commands["sent"]},
            {"key": "failed", "label": "commands failed", "value": commands["failed"]},
            {"key": "timed_out", "label": "commands timed out", "value": commands["timed_out"]},
        ],
        "attention": [*(_gone_offline(vm) for vm in gone), *(_failed(c) for c in failed)],
        "tables": [
            {
                "key": "live",
                "title": "VMs live now",
                "columns": ["VM", "status", "last seen"],
                "rows": [_live_row(vm) for vm in live],
            }
        ],
    }


def logout(*, params: Mapping[str, Any], user: Any) -> str:
    """`{"vm_id": int}`: log the VM out (`services.vm_logout`); it stays connected and must
    authorize again. Refuses with NotFound or VmNotAuthorized (409)."""
    vm_id = parsers.integer(params.get("vm_id"), field="vm_id", min_value=1)
    vm = services.vm_logout(vm_id=vm_id, actor=user)
    return f"VM {vm.name} (#{vm.pk}) logged out: it must authorize again."


def retry(*, params: Mapping[str, Any], user: Any) -> str:
    """`{"command_id": uuid}`: send a failed or timed-out command again
    (`services.command_retry`, blocking up to VMCONTROL_COMMAND_TIMEOUT_SECONDS). Refuses with
    NotFound, CommandNotRetryable, VmNotAuthorized, AgentTimeout or CommandFailed."""
    command_id = parsers.uuid_value(params.get("command_id"), field="command_id")
    command = services.command_retry(command_id=command_id, actor=user)
    return f"{command.name} sent again to VM #{command.vm_id}: {command.status}."


panel = ConsolePanel(
    name=PANEL,
    title="VM control",
    sample=sample,
    order=20,
    actions={
        "logout": ConsoleAction(label="Log out a VM", run=logout),
        "retry": ConsoleAction(label="Retry a failed command", run=retry),
    },
)
