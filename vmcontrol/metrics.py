"""Prometheus metrics of the agent TCP server (exported by /metrics and by
run_vmcontrol_server's metrics port)."""

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("vmcontrol_connections", "Open agent TCP connections")
AUTHORIZED = Gauge("vmcontrol_authorized_connections", "Authorized agent connections")
FRAMES = Counter("vmcontrol_frames_total", "Agent frames received", ["type"])
BATCH_SIZE = Histogram(
    "vmcontrol_event_batch_size", "Agent events per database batch", buckets=(1, 5, 20, 100, 500)
)
UNAUTHENTICATED = Counter(
    "vmcontrol_unauthenticated_sessions_total",
    "Connections that ended without ever authorizing (not stored as session rows)",
    ["reason"],
)
AUTH_REFUSED = Counter(
    "vmcontrol_auth_refused_total",
    "Refused auth/enroll attempts: `failed` credentials, `rate_limited` peers",
    ["kind", "outcome"],
)
LOCKOUTS = Counter("vmcontrol_auth_lockouts_total", "Peers locked out after failed attempts")
