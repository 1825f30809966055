from celery import shared_task

from vmcontrol import services


@shared_task(name="vmcontrol.sessions_reap")
def sessions_reap() -> int:
    """Beat (every VMCONTROL_REAP_INTERVAL_SECONDS): close the sessions of TCP servers whose lease
    expired and publish their VMs going offline (a deployment with one server has nobody else
    to do it until that server restarts), and time out the commands whose waiting process died
    (`services.commands_expire`). Returns how many sessions were closed."""
    closed, _ = services.server_leases_reap(publish_changes=True)
    services.commands_expire()
    return closed
