"""The audit trail every betting write appends to, in the writer's transaction."""

from typing import Any

from betting.models import AuditEntry


def audit_append(
    *, subject: str, subject_id: str, action: str, actor_id: int | None, via: str, data: Any
) -> None:
    """One `AuditEntry` row; `via` names the door (`rest`, `grpc`, `admin`, `task`, ...)."""
    AuditEntry.objects.create(
        subject=subject, subject_id=subject_id, action=action, actor_id=actor_id, via=via, data=data
    )
