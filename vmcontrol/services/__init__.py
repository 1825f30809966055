"""vmcontrol writes, one module per topic; import them from here (`from vmcontrol import
services`), which is what other apps may use.

- `vms`: registration, enrollment, tokens rotated or revoked, operator logout; the domain errors
  and the status-change shape published on `vmcontrol.vms`;
- `tokens`: tokens and the enrollment secret, hashed and compared in constant time;
- `commands`: commands to agents over the agent bus (`vmcontrol.bus`), their answers, an
  operator's retry of a failed one, and the sweep of commands whose waiter died;
- `agent_events`: the batched agent events the TCP server applies (enroll, auth, inventory,
  logout, end) and the last-seen flush;
- `leases`: the TCP servers' leases (one live process per server name) and the cleanup of
  sessions whose server is gone.
"""

from vmcontrol.services.agent_events import (
    AgentEvent,
    AgentEventOutcome,
    AgentEventResult,
    agent_events_apply,
    agent_events_apply_isolated,
    last_seen_flush,
)
from vmcontrol.services.commands import (
    AgentTimeout,
    CommandFailed,
    CommandNotRetryable,
    command_complete,
    command_retry,
    command_run,
    commands_expire,
    vm_update_specs,
)
from vmcontrol.services.leases import (
    LeaseHeld,
    LeaseHolder,
    server_lease_acquire,
    server_lease_release,
    server_lease_renew,
    server_leases_reap,
    server_sessions_recover,
)
from vmcontrol.services.tokens import secret_matches, token_generate, token_hash, token_matches
from vmcontrol.services.vms import (
    VMS_TOPIC,
    Actor,
    AuthFailed,
    StatusChange,
    VmNotAuthorized,
    disks_replace,
    status_changes_publish,
    topics_register,
    vm_enroll,
    vm_logout,
    vm_register,
    vm_token_revoke,
    vm_token_rotate,
)

__all__ = [
    "VMS_TOPIC",
    "Actor",
    "AgentEvent",
    "AgentEventOutcome",
    "AgentEventResult",
    "AgentTimeout",
    "AuthFailed",
    "CommandFailed",
    "CommandNotRetryable",
    "LeaseHeld",
    "LeaseHolder",
    "StatusChange",
    "VmNotAuthorized",
    "agent_events_apply",
    "agent_events_apply_isolated",
    "command_complete",
    "command_retry",
    "command_run",
    "commands_expire",
    "disks_replace",
    "last_seen_flush",
    "secret_matches",
    "server_lease_acquire",
    "server_lease_release",
    "server_lease_renew",
    "server_leases_reap",
    "server_sessions_recover",
    "status_changes_publish",
    "token_generate",
    "token_hash",
    "token_matches",
    "topics_register",
    "vm_enroll",
    "vm_logout",
    "vm_register",
    "vm_token_revoke",
    "vm_token_rotate",
    "vm_update_specs",
]
