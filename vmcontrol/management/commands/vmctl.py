"""Operator console: a client of the running system's REST API (`/api/vmcontrol/`), as
readable tables.

Like other control-plane CLIs it talks to the API server (`--url`, default
`http://127.0.0.1:$HTTP_PORT`), never to the database or the channel layer directly, so a
logout or an update reaches the agent through the process that holds its connection in every
mode: `make run` (one process, in-memory channel layer) and the real services alike.

It authenticates with `--token` (or QUINTET_TOKEN); without one it issues itself a short-lived
API token for the staff user `--user` (default DJANGO_SUPERUSER_USERNAME, else `operator`),
which it can do because it runs with the project's database settings, and deletes it when done.
An unreachable server is one line naming the URL; an API error is its code and message; both
exit with status 1.
"""

import argparse
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from types import FrameType
from typing import IO, Any, cast

import httpx
from django.conf import settings
from django.core.management.base import CommandError, CommandParser
from django.db import DatabaseError
from rich.console import Console
from rich.table import Table

from common import services as platform
from common.exceptions import ApplicationError
from common.parsers import INT64_MAX
from vmcontrol.management.options import (
    OptionValuesCommand,
    disk_option,
    identifier_option,
    integer_option,
    seconds_option,
    text_option,
)
from vmcontrol.protocol import MAX_CPU_CORES, MAX_NAME_LENGTH, MAX_RAM_MB, Disk

VM_ID = integer_option(min_value=1, max_value=INT64_MAX)
CPU = integer_option(min_value=1, max_value=MAX_CPU_CORES)
RAM = integer_option(min_value=1, max_value=MAX_RAM_MB)
TOKEN_TTL = timedelta(minutes=10)
"""Lifetime of the token vmctl issues itself (it deletes it when it is done)."""
TIMEOUT_SECONDS = 15.0
PAGE_SIZE = 100


def url_option(value: str) -> str:
    """An http(s) URL of the running system, such as `http://127.0.0.1:8000`."""
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as error:
        raise argparse.ArgumentTypeError(f"not a URL: {error}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError("wants http://HOST:PORT or https://HOST")
    return value.rstrip("/")


def _when(value: str | None) -> str:
    if not value:
        return "—"
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the issued token is deleted on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Api:
    """The REST API under `<url>/api/vmcontrol`; every failure becomes one CommandError line."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.client = httpx.Client(
            base_url=f"{url}/api/vmcontrol",
            headers={"Authorization": f"Token {token}", "Accept": "application/json"},
            timeout=TIMEOUT_SECONDS,
        )

    def close(self) -> None:
        self.client.close()

    def call(self, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> Any:
        try:
            response = self.client.request(method, path, timeout=timeout or TIMEOUT_SECONDS, **kw)
        except httpx.TimeoutException:
            raise CommandError(
                f"The Quintet API at {self.url} did not answer within "
                f"{timeout or TIMEOUT_SECONDS:g} s."
            ) from None
        except httpx.TransportError as error:
            raise CommandError(
                f"Cannot reach the Quintet API at {self.url} ({_one_line(str(error))}): "
                "is it running (`make run`)? Point --url at it."
            ) from None
        if response.is_success:
            return response.json()
        raise CommandError(self._error(response))

    def _error(self, response: httpx.Response) -> str:
        try:
            error = response.json()["error"]
            text = f"{error['code']}: {error['message']}"
            if error.get("details"):
                text += f" {error['details']}"
        except (ValueError, KeyError, TypeError):
            text = f"HTTP {response.status_code} from {self.url}{response.request.url.path}"
        return _one_line(text)

    def pages(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a paginated list, page after page."""
        offset = 0
        while True:
            page = self.call("GET", path, params={**params, "limit": PAGE_SIZE, "offset": offset})
            yield from page["results"]
            if not page.get("next") or not page["results"]:
                return
            offset += len(page["results"])


class Command(OptionValuesCommand):
    help = (
        "VM control console, a client of the running system's REST API: list, disks, register, "
        "update, logout, rotate-token, revoke-token."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        self._connection_options(parser, with_defaults=True)
        # Also after the subcommand (`vmctl list --url ...`), without overriding the defaults.
        common = CommandParser(add_help=False)
        self._connection_options(common, with_defaults=False)
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="list VMs", parents=[common])
        which = listing.add_mutually_exclusive_group()
        which.add_argument("--connected", action="store_true")
        which.add_argument("--authorized", action="store_true")
        which.add_argument("--ever-connected", action="store_true")
        sub.add_parser("disks", help="every disk with its VM", parents=[common])
        register = sub.add_parser(
            "register", help="add a VM and print its token once", parents=[common]
        )
        register.add_argument("--name", required=True, type=text_option(max_length=MAX_NAME_LENGTH))
        register.add_argument("--cpu", type=CPU, default=1)
        register.add_argument("--ram", type=RAM, default=512, help="MB")
        register.add_argument("--disk", action="append", type=disk_option, help="NAME:SIZE_GB")
        update = sub.add_parser(
            "update", help="push new specs to an authorized VM", parents=[common]
        )
        update.add_argument("vm_id", type=VM_ID)
        update.add_argument("--cpu", type=CPU)
        update.add_argument("--ram", type=RAM, help="MB")
        update.add_argument("--disk", action="append", type=disk_option, help="NAME:SIZE_GB (all)")
        update.add_argument(
            "--timeout",
            type=seconds_option(),
            help="seconds to wait for the answer (default: VMCONTROL_COMMAND_TIMEOUT_SECONDS + 5; "
            "the server waits that long for the agent)",
        )
        for name in ("logout", "rotate-token", "revoke-token"):
            sub.add_parser(name, parents=[common]).add_argument("vm_id", type=VM_ID)

    @staticmethod
    def _connection_options(parser: argparse.ArgumentParser, *, with_defaults: bool) -> None:
        """`--url`, `--user`, `--token`; their defaults only on the main parser."""

        def default(value: Any) -> Any:
            return value if with_defaults else argparse.SUPPRESS

        parser.add_argument(
            "--url",
            type=url_option,
            default=default(f"http://127.0.0.1:{settings.HTTP_PORT}"),
            help="the running system (default http://127.0.0.1:$HTTP_PORT)",
        )
        parser.add_argument(
            "--user",
            type=text_option(max_length=150),
            default=default(settings.DJANGO_SUPERUSER_USERNAME or "operator"),
            help="staff user to act as with a short-lived token vmctl issues and deletes "
            "(default DJANGO_SUPERUSER_USERNAME, else operator)",
        )
        parser.add_argument(
            "--token",
            type=identifier_option(max_length=256),
            default=default(os.environ.get("QUINTET_TOKEN") or None),
            help="an API token to use instead (env QUINTET_TOKEN; from POST /api/auth/token)",
        )

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        self.console = Console(file=cast(IO[str], self.stdout), width=140)
        with _interrupt_on_sigterm():
            token, issued = self._token(options)
            try:
                self.api = Api(options["url"], token)
                try:
                    getattr(self, "do_" + action.replace("-", "_"))(**options)
                finally:
                    self.api.close()
            finally:
                if issued is not None:
                    platform.api_token_revoke(token=issued)

    def _token(self, options: dict[str, Any]) -> tuple[str, Any]:
        """The token to send, and the row to delete afterwards when vmctl issued it."""
        if options["token"]:
            return str(options["token"]), None
        user = options["user"]
        try:
            issued, token = platform.operator_token_issue(username=user, ttl=TOKEN_TTL)
        except ApplicationError as error:
            raise CommandError(
                f"{error.message} Pass --user NAME (default DJANGO_SUPERUSER_USERNAME), or "
                "--token / QUINTET_TOKEN."
            ) from None
        except DatabaseError as error:
            raise CommandError(
                f"Cannot issue a token for {user!r}: the database is not ready "
                f"({_one_line(str(error))}); pass --token or QUINTET_TOKEN."
            ) from None
        return token, issued

    def _vms(self, vms: list[dict[str, Any]], title: str) -> None:
        table = Table(title=title)
        for column in ("ID", "Name", "Status", "CPU", "RAM MB", "Disks", "First seen", "Last"):
            table.add_column(column)
        for vm in vms:
            disks = ", ".join(f"{d['name']} {d['size_gb']} GB" for d in vm["disks"]) or "—"
            table.add_row(
                str(vm["id"]),
                vm["name"],
                vm["status"],
                str(vm["cpu_cores"]),
                str(vm["ram_mb"]),
                disks,
                _when(vm.get("first_connected_at")),
                _when(vm.get("last_seen_at")),
            )
        self.console.print(table)

    def do_list(self, **options: Any) -> None:
        which = next(
            (k for k in ("connected", "authorized", "ever_connected") if options.get(k)), None
        )
        params = {"filter": which} if which else {}
        self._vms(list(self.api.pages("/vms", **params)), f"VMs ({which or 'all'})")

    def do_disks(self, **options: Any) -> None:
        table = Table(title="Disks")
        for column in ("Disk ID", "Name", "Size GB", "VM ID", "VM"):
            table.add_column(column)
        for disk in self.api.pages("/disks"):
            table.add_row(
                str(disk["id"]),
                disk["name"],
                str(disk["size_gb"]),
                str(disk["vm_id"]),
                disk["vm_name"],
            )
        self.console.print(table)

    @staticmethod
    def _disks(disks: list[Disk]) -> list[dict[str, Any]]:
        return [{"name": d.name, "size_gb": d.size_gb} for d in disks]

    def do_register(self, *, name: str, cpu: int, ram: int, disk: Any, **options: Any) -> None:
        vm = self.api.call(
            "POST",
            "/vms",
            json={
                "name": name,
                "cpu_cores": cpu,
                "ram_mb": ram,
                "disks": self._disks(disk or []),
            },
        )
        self._vms([vm], "Registered")
        self.console.print(f"VM id: {vm['id']}\nToken (shown once): {vm['token']}")
        self.console.print(
            f"Start its agent: python manage.py run_vm_agent --vm-id {vm['id']} "
            "--token <the token>",
            highlight=False,
        )

    def do_update(self, *, vm_id: int, cpu: Any, ram: Any, disk: Any, **options: Any) -> None:
        body: dict[str, Any] = {}
        if cpu is not None:
            body["cpu_cores"] = cpu
        if ram is not None:
            body["ram_mb"] = ram
        if disk is not None:
            body["disks"] = self._disks(disk)
        wait = options.get("timeout") or settings.VMCONTROL_COMMAND_TIMEOUT_SECONDS + 5
        vm = self.api.call("PATCH", f"/vms/{vm_id}", json=body, timeout=wait)
        self._vms([vm], "Updated (acknowledged by the agent)")

    def do_logout(self, *, vm_id: int, **options: Any) -> None:
        self._vms([self.api.call("POST", f"/vms/{vm_id}/logout")], "Logged out")

    def do_rotate_token(self, *, vm_id: int, **options: Any) -> None:
        token = self.api.call("POST", f"/vms/{vm_id}/rotate-token")["token"]
        self.console.print(f"VM {vm_id} new token (shown once): {token}")

    def do_revoke_token(self, *, vm_id: int, **options: Any) -> None:
        self.api.call("POST", f"/vms/{vm_id}/revoke-token")
        self.console.print(f"VM {vm_id}: token revoked")
