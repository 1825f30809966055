"""The vmcontrol admin writes only through services (issue 13 item 7), tried as an operator
does: logged in at /admin/ with a password over a real server, posting the forms it serves."""

import hashlib
import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User
from django.utils import timezone

from tests.conftest import LiveServer
from tests.vmcontrol.conftest import VmServer
from tests.vmcontrol.factories import vm_with_token
from tests.vmcontrol.test_api import running_agent
from vmcontrol.models import AgentSession, AuditEvent, Command, Disk, ServerLease, VirtualMachine

pytestmark = pytest.mark.timeout(90)
PASSWORD = "a-long-admin-passphrase"
VMS = "/admin/vmcontrol/virtualmachine"


class _FormFields(HTMLParser):
    """The fields a browser would submit from the page's forms (the admin's forms have
    distinct field names, and the header's logout form carries only the CSRF token)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self.in_form = False
        self.select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag == "form":
            self.in_form = True
        if not self.in_form or ("name" not in attributes and tag != "option"):
            return
        if tag == "input":
            kind = attributes.get("type", "text")
            if kind in ("submit", "button") or (kind == "checkbox" and "checked" not in attributes):
                return
            self.fields[attributes["name"]] = attributes.get("value", "on")
        elif tag == "select":
            self.select = attributes["name"]
            self.fields.setdefault(self.select, "")
        elif tag == "option" and self.select and "selected" in attributes:
            self.fields[self.select] = attributes.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.in_form = False
        elif tag == "select":
            self.select = None


def form_fields(page: str) -> dict[str, str]:
    parser = _FormFields()
    parser.feed(page)
    return parser.fields


@pytest.fixture
async def admin(asgi_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client logged in through /admin/login/ (CSRF cookie and form token)."""
    await sync_to_async(User.objects.create_superuser)("admin-op", "op@example.com", PASSWORD)
    async with httpx.AsyncClient(base_url=asgi_server.http_url, timeout=30) as client:
        page = await client.get("/admin/login/")
        assert page.status_code == 200
        login = await client.post(
            "/admin/login/",
            data={
                **form_fields(page.text),
                "username": "admin-op",
                "password": PASSWORD,
                "next": "/admin/",
            },
        )
        assert login.status_code == 302 and login.headers["location"] == "/admin/", login.text
        yield client


def csrf(client: httpx.AsyncClient) -> str:
    return str(client.cookies["csrftoken"])


async def test_add_registers_the_vm_and_shows_its_token_once(
    admin: httpx.AsyncClient,
) -> None:
    page = await admin.get(f"{VMS}/add/")
    assert page.status_code == 200
    fields = form_fields(page.text)
    assert {"name", "cpu_cores", "ram_mb", "disks-TOTAL_FORMS"} <= fields.keys(), fields
    assert "token_hash" not in page.text
    data = {
        **fields,
        "name": "admin-vm",
        "cpu_cores": "2",
        "ram_mb": "1024",
        "disks-TOTAL_FORMS": "2",
        "disks-0-name": "root",
        "disks-0-size_gb": "20",
        "disks-1-name": "data",
        "disks-1-size_gb": "100",
        "_save": "Save",
    }
    response = await admin.post(f"{VMS}/add/", data=data, follow_redirects=True)
    assert response.status_code == 200, response.text[:2000]
    shown = re.findall(
        r"\(shown once, copy it now; only its hash is kept\): (vmc_[\w-]+)", response.text
    )
    assert len(shown) == 1, response.text[:3000]
    token = shown[0]
    vm = await VirtualMachine.objects.aget(name="admin-vm")
    assert vm.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert (vm.cpu_cores, vm.ram_mb) == (2, 1024)
    disks = await sync_to_async(
        lambda: set(Disk.objects.filter(vm=vm).values_list("name", "size_gb"))
    )()
    assert disks == {("root", 20), ("data", 100)}
    assert f"run_vm_agent --vm-id {vm.pk}" in response.text  # the hint
    audit = await AuditEvent.objects.select_related("actor").aget(vm_id=vm.pk)
    assert audit.action == "vm.registered"
    assert audit.actor is not None and audit.actor.username == "admin-op"
    # Shown once: neither the list nor the VM's page shows it again.
    assert token not in (await admin.get(f"{VMS}/")).text
    assert token not in (await admin.get(f"{VMS}/{vm.pk}/change/")).text


async def test_a_bad_value_in_the_add_form_is_refused_by_the_shared_parsers(
    admin: httpx.AsyncClient,
) -> None:
    fields = form_fields((await admin.get(f"{VMS}/add/")).text)
    data = {**fields, "name": "x", "cpu_cores": "\u0663", "ram_mb": "512", "_save": "Save"}
    response = await admin.post(f"{VMS}/add/", data=data)
    assert response.status_code == 200 and "must be ASCII digits" in response.text
    assert not await VirtualMachine.objects.aexists()


async def change_cpu(admin: httpx.AsyncClient, vm_id: int, cpu: int) -> httpx.Response:
    page = await admin.get(f"{VMS}/{vm_id}/change/")
    assert page.status_code == 200
    data = {**form_fields(page.text), "cpu_cores": str(cpu), "_save": "Save"}
    return await admin.post(f"{VMS}/{vm_id}/change/", data=data, follow_redirects=True)


async def test_change_of_cpu_reaches_the_agent_and_is_audited(
    admin: httpx.AsyncClient, vmserver: VmServer
) -> None:
    vm, token = await sync_to_async(vm_with_token)("changed")
    agent, finish = await running_agent(vmserver.port, vm.pk, token)
    try:
        response = await change_cpu(admin, vm.pk, 6)
        assert response.status_code == 200
        assert "The agent applied the new specs." in response.text, response.text[:3000]
        assert agent.identity.inventory["cpu_cores"] == 6  # the agent applied it
    finally:
        await finish()
    await vm.arefresh_from_db()
    assert vm.cpu_cores == 6
    actions = await sync_to_async(
        lambda: {
            (a.action, a.actor.username if a.actor else None)
            for a in AuditEvent.objects.filter(vm_id=vm.pk).select_related("actor")
        }
    )()
    assert ("command.update_specs", "admin-op") in actions
    assert ("vm.specs_updated", None) in actions
    command = await Command.objects.aget(vm=vm)
    assert command.status == "succeeded" and command.args["cpu_cores"] == 6


async def test_change_of_a_vm_that_is_not_authorized_changes_nothing_and_says_why(
    admin: httpx.AsyncClient, vmserver: VmServer
) -> None:
    vm, _ = await sync_to_async(vm_with_token)("idle")
    response = await change_cpu(admin, vm.pk, 5)
    assert response.status_code == 200
    assert "Not changed: The VM is not authorized" in response.text, response.text[:3000]
    await vm.arefresh_from_db()
    assert vm.cpu_cores == 1
    assert not await LogEntry.objects.filter(object_id=str(vm.pk), action_flag=2).aexists()


@sync_to_async
def one_row_of_each() -> dict[str, Any]:
    vm, _ = vm_with_token("rows")
    now = timezone.now()
    session = AgentSession.objects.create(
        vm=vm, server_name="s", peer="127.0.0.1:1", started_at=now
    )
    lease = ServerLease.objects.create(name="s", started_at=now, renewed_at=now, expires_at=now)
    command = Command.objects.create(vm=vm, name="update_specs")
    audit = AuditEvent.objects.get(vm_id=vm.pk)
    return {
        "agentsession": session.pk,
        "serverlease": lease.pk,
        "command": command.pk,
        "auditevent": audit.pk,
        "virtualmachine": vm.pk,
    }


async def test_sessions_commands_audit_and_leases_are_read_only(
    admin: httpx.AsyncClient,
) -> None:
    rows = await one_row_of_each()
    refused = {}
    for model, pk in rows.items():
        base = f"/admin/vmcontrol/{model}"
        assert (await admin.get(f"{base}/")).status_code == 200
        assert (await admin.get(f"{base}/{pk}/change/")).status_code == 200
        token = {"csrfmiddlewaretoken": csrf(admin)}
        attempts = {"delete": f"{base}/{pk}/delete/"}
        if model != "virtualmachine":
            attempts |= {"add": f"{base}/add/", "change": f"{base}/{pk}/change/"}
        for kind, url in attempts.items():
            response = await admin.post(url, data={**token, "post": "yes", "action_flag": "1"})
            refused[(model, kind)] = response.status_code
    assert set(refused.values()) == {403}, refused
    assert await AuditEvent.objects.acount() == 1
    assert await AgentSession.objects.acount() == 1
    assert await VirtualMachine.objects.acount() == 1
