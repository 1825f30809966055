"""Operator actions on VMs (register, enroll, rotate or revoke a token, log out) and what they
share with the other topics: the domain errors, the status-change shape and the disk sync."""

from collections.abc import Iterable, Sequence
from typing import Any, NotRequired, TypedDict

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction

from common.exceptions import Conflict, NotAuthenticated
from realtime.services import TopicAccess, publish, topic_register
from vmcontrol import bus, selectors
from vmcontrol.lock_objects import vm_lock
from vmcontrol.models import AuditEvent, Disk, VirtualMachine, VmStatus
from vmcontrol.protocol import Disk as WireDisk
from vmcontrol.protocol import Inventory
from vmcontrol.services.tokens import secret_matches, token_generate

VMS_TOPIC = "vmcontrol.vms"

Actor = AbstractBaseUser | AnonymousUser | None


class VmNotAuthorized(Conflict):
    """409: the VM has no live authorized session (offline, logged out, or its server died)."""

    code = "not_authorized"
    default_message = "The VM is not authorized (no agent session holds it)."


class AuthFailed(NotAuthenticated):
    """A refused agent credential: wrong token or enrollment secret (the TCP door answers it
    as an `auth_failed` frame, never naming which part was wrong)."""

    code = "auth_failed"
    default_message = "Unknown VM or wrong, revoked or rotated token."


class StatusChange(TypedDict):
    """A VM's status change as published on the realtime topic `vmcontrol.vms`."""

    vm_id: int
    status: str
    """a `VmStatus` value"""
    name: NotRequired[str]
    """present when an operator action changed it"""


def topics_register() -> None:
    """Declare the realtime topic `vmcontrol.vms` (staff only); called by `AppConfig.ready`."""
    topic_register(VMS_TOPIC, access=TopicAccess.STAFF)


def status_changes_publish(changes: Iterable[StatusChange]) -> None:
    """Publish each change on `vmcontrol.vms` (after the current transaction commits; at once
    outside one). Never raises for a lost notification (`realtime.services.publish`)."""
    for change in changes:
        publish(VMS_TOPIC, change)


def actor_id(actor: Actor) -> int | None:
    """The user id to store for `actor` (None for anonymous or a process)."""
    return actor.pk if actor is not None and actor.is_authenticated else None


def audit_add(*, actor: Actor, vm_id: int | None, action: str, **details: Any) -> None:
    """One `AuditEvent` row (in the caller's transaction); `details` must be JSON-ready."""
    AuditEvent.objects.create(actor_id=actor_id(actor), vm_id=vm_id, action=action, details=details)


def _status_event(vm: VirtualMachine) -> StatusChange:
    return {"vm_id": vm.pk, "status": vm.status, "name": vm.name}


def disks_replace(vm_ids_inventories: dict[int, Inventory]) -> None:
    """Make each VM's disks equal to its inventory, matching by name so existing disks keep
    their server-assigned ids; three set-based statements for the whole batch (delete the
    stale, update changed sizes, create the new). Idempotent; call inside the caller's
    transaction (no locks of its own)."""
    if not vm_ids_inventories:
        return
    existing: dict[tuple[int, str], Disk] = {
        (d.vm_id, d.name): d for d in Disk.objects.filter(vm_id__in=vm_ids_inventories.keys())
    }
    wanted: set[tuple[int, str]] = set()
    to_create: list[Disk] = []
    to_update: list[Disk] = []
    for vm_id, inventory in vm_ids_inventories.items():
        for disk in inventory.disks:
            key = (vm_id, disk.name)
            wanted.add(key)
            current = existing.get(key)
            if current is None:
                to_create.append(Disk(vm_id=vm_id, name=disk.name, size_gb=disk.size_gb))
            elif current.size_gb != disk.size_gb:
                current.size_gb = disk.size_gb
                to_update.append(current)
    stale = [d.pk for key, d in existing.items() if key not in wanted]
    if stale:
        Disk.objects.filter(pk__in=stale).delete()
    if to_update:
        Disk.objects.bulk_update(to_update, ["size_gb"])
    if to_create:
        Disk.objects.bulk_create(to_create)


@transaction.atomic
def vm_register(
    *,
    name: str,
    cpu_cores: int = 1,
    ram_mb: int = 512,
    disks: Sequence[WireDisk] = (),
    actor: Actor = None,
) -> tuple[VirtualMachine, str]:
    """Add a VM (`ram_mb` in MiB, disk sizes in GB) with its disks and an audit row; returns
    it and its raw token, which is never retrievable again (only its hash is stored). Not
    idempotent: every call adds a VM."""
    raw, hashed = token_generate()
    vm = VirtualMachine.objects.create(
        name=name,
        cpu_cores=cpu_cores,
        ram_mb=ram_mb,
        token_hash=hashed,
        registered_by_id=actor_id(actor),
    )
    disks_replace({vm.pk: Inventory(cpu_cores=cpu_cores, ram_mb=ram_mb, disks=tuple(disks))})
    audit_add(actor=actor, vm_id=vm.pk, action="vm.registered", name=name)
    return vm, raw


def vm_enroll(*, secret: str, name: str, inventory: Inventory) -> tuple[VirtualMachine, str]:
    """Agent self-registration with the shared enrollment secret VMCONTROL_ENROLL_SECRET
    (compared in constant time; disabled when unset): `vm_register` with the reported
    inventory plus a `vm.enrolled` audit row. Raises AuthFailed (`enroll_failed`) for a wrong
    secret. Call inside a transaction so the VM and its audit rows commit together."""
    if not secret_matches(secret, settings.VMCONTROL_ENROLL_SECRET):
        raise AuthFailed("Enrollment refused.", code="enroll_failed")
    vm, raw = vm_register(
        name=name, cpu_cores=inventory.cpu_cores, ram_mb=inventory.ram_mb, disks=inventory.disks
    )
    AuditEvent.objects.create(vm_id=vm.pk, action="vm.enrolled", details={"name": name})
    return vm, raw


def live_authorized(vm: VirtualMachine) -> bool:
    """Authorized by a session whose server is alive (a killed server's VMs are offline)."""
    return (
        vm.status == VmStatus.AUTHORIZED
        and selectors.vm_live_status(vm_id=vm.pk) == VmStatus.AUTHORIZED
    )


def _kick(vm_id: int, reason: str) -> None:
    transaction.on_commit(lambda: bus.vm_logout_send(vm_id, reason))


@transaction.atomic
def vm_token_rotate(*, vm_id: int, actor: Actor = None) -> str:
    """Issue a new token (returned raw, once); the old one stops working. Locks the VM row. A
    live authorized session drops to `connected` (published on `vmcontrol.vms`) and, after
    commit, its connection is told `vm.logout` (`token_rotated`) and must authorize again.
    Raises NotFound (`vm_not_found`)."""
    raw, token_hash = token_generate()
    _token_replace(vm_id=vm_id, token_hash=token_hash, actor=actor, reason="token_rotated")
    return raw


@transaction.atomic
def vm_token_revoke(*, vm_id: int, actor: Actor = None) -> VirtualMachine:
    """Revoke the token: no agent can authorize as this VM until a rotate. Locks the VM row;
    a live session is logged out as in `vm_token_rotate` (`token_revoked`). Idempotent apart
    from the audit row. Raises NotFound (`vm_not_found`)."""
    return _token_replace(vm_id=vm_id, token_hash="", actor=actor, reason="token_revoked")


def _token_replace(*, vm_id: int, token_hash: str, actor: Actor, reason: str) -> VirtualMachine:
    """Store `token_hash` under the VM row lock; a live authorized session drops to
    `connected` (published) and is told `vm.logout` (`reason`) after commit; audited as
    `vm.<reason>`."""
    vm = vm_lock(vm_id)
    vm.token_hash = token_hash
    was_authorized = live_authorized(vm)
    if was_authorized:
        vm.status = VmStatus.CONNECTED
    vm.save(update_fields=["token_hash", "status", "updated_at"])
    audit_add(actor=actor, vm_id=vm.pk, action=f"vm.{reason}")
    if was_authorized:
        publish(VMS_TOPIC, _status_event(vm))
    _kick(vm.pk, reason)
    return vm


@transaction.atomic
def vm_logout(*, vm_id: int, actor: Actor = None) -> VirtualMachine:
    """Log an authorized VM out: it stays connected and must authorize again. Locks the VM
    row; publishes `connected` on `vmcontrol.vms` and, after commit, tells the connection
    `vm.logout` (`operator`). Raises VmNotAuthorized (409) when the VM is not authorized (also
    when the server holding its session is gone: `selectors.vm_live_status`), NotFound
    (`vm_not_found`)."""
    vm = vm_lock(vm_id)
    if not live_authorized(vm):
        raise VmNotAuthorized()
    vm.status = VmStatus.CONNECTED
    vm.save(update_fields=["status", "updated_at"])
    audit_add(actor=actor, vm_id=vm.pk, action="vm.logged_out")
    publish(VMS_TOPIC, _status_event(vm))
    _kick(vm.pk, "operator")
    return vm
