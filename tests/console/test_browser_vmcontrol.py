"""vmcontrol on the console in real headless Chromium: a real agent connects over TCP to the live
VM control server and the page shows it within 3 s, without a reload (VMs authorized, the live
table, heartbeats); "Log out" on its row logs it out (the agent is told and authorizes again)."""

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.console.conftest import ConsolePage
from tests.vmcontrol.conftest import VmServer
from tests.vmcontrol.factories import vm_with_token
from vmcontrol.agent import Agent, AgentIdentity
from vmcontrol.models import AuditEvent
from vmcontrol.sessions import ServerConfig

pytestmark = pytest.mark.timeout(120)
WITHIN_MS = 3000
INVENTORY = {"cpu_cores": 2, "ram_mb": 2048, "disks": [{"name": "root", "size_gb": 20}]}


class RunningAgent:
    """`Agent.run` (what `run_vm_agent` runs) as a task of the live server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, port: int, vm_id: int, token: str) -> None:
        identity = AgentIdentity(name="console", vm_id=vm_id, token=token, inventory=INVENTORY)
        self.loop = loop
        self.agent = Agent("127.0.0.1", port, identity)
        self.stop = asyncio.Event()
        self.future = asyncio.run_coroutine_threadsafe(self.agent.run(self.stop), loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.future.result(timeout=15)


def total(view: ConsolePage, panel: str, key: str) -> int:
    return int(view.counter_total(panel, key).get_attribute("data-value") or 0)


@contextmanager
def vmcontrol_scenario(view: ConsolePage) -> Iterator[dict[str, Any]]:
    """An agent connects and is logged out from the page; yields what the panel showed, with
    the agent still connected (for a screenshot)."""
    config = ServerConfig(
        heartbeat_interval=0.5,
        missed_heartbeats=4,
        auth_timeout=5.0,
        flush_interval=0.1,
        server_name="console-browser",
    )
    server = VmServer(loop=view.server.loop, config=config).start()
    agent: RunningAgent | None = None
    try:
        vm, token = vm_with_token("web-1")
        expect(view.number("vmcontrol", "offline")).to_have_text("1", timeout=WITHIN_MS)
        authorized = view.number("vmcontrol", "authorized")
        expect(authorized).to_have_text("0")
        beats = total(view, "vmcontrol", "vmcontrol.heartbeats")

        agent = RunningAgent(view.server.loop, server.port, vm.pk, token)

        expect(authorized).to_have_text("1", timeout=WITHIN_MS)
        expect(view.number("vmcontrol", "offline")).to_have_text("0", timeout=WITHIN_MS)
        row = view.row("vmcontrol", "live", str(vm.pk))
        expect(row).to_contain_text(f"web-1 (#{vm.pk})", timeout=WITHIN_MS)
        expect(row).to_contain_text("authorized")
        expect(row.locator("a")).to_have_attribute(
            "href", f"/admin/vmcontrol/virtualmachine/{vm.pk}/change/"
        )
        expect(view.counter_total("vmcontrol", "vmcontrol.heartbeats")).not_to_have_attribute(
            "data-value", str(beats), timeout=WITHIN_MS
        )
        shown = {
            "authorized": authorized.inner_text(),
            "live row": row.inner_text(),
            "heartbeats counted": total(view, "vmcontrol", "vmcontrol.heartbeats") - beats,
        }

        view.action("vmcontrol", "logout", row=f"live/{vm.pk}").click()

        expect(view.flash("vmcontrol")).to_have_text(
            f"VM web-1 (#{vm.pk}) logged out: it must authorize again."
        )
        expect(view.flash("vmcontrol")).to_have_attribute("data-kind", "ok")
        logged_out = AuditEvent.objects.get(vm_id=vm.pk, action="vm.logged_out")
        assert logged_out.actor_id == view.user.pk
        # The agent was told on its live connection and authorized again on it.
        expect(authorized).to_have_text("1", timeout=WITHIN_MS)
        assert agent.agent.stats.logouts == 1
        shown["after log out"] = view.flash("vmcontrol").inner_text()
        yield shown
    finally:
        if agent is not None:
            agent.close()
        server.stop()


def test_an_agent_connecting_shows_live_and_is_logged_out_from_the_page(
    console_page: ConsolePage,
) -> None:
    console_page.page.evaluate("window.__notReloaded = true")
    with vmcontrol_scenario(console_page):
        assert console_page.page.evaluate("window.__notReloaded") is True
