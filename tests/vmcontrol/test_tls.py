"""Issue 11 item 10 (vmcontrol): TLS between `run_vm_agent` and `run_vmcontrol_server`, with a
throwaway CA and server certificate generated at test time (`openssl` CLI; `cryptography` is
not installed). An agent process authorizes over TLS when it trusts the CA (flags or env); a
plaintext client gets nothing from a TLS server; an agent that does not trust the certificate
(other CA, other host name, system trust store) refuses to talk; a TLS handshake that never
finishes is closed at the authorization deadline."""

import asyncio
import contextlib
import json
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command

from tests.vmcontrol.conftest import (
    VmServer,
    free_port,
    manage,
    test_database_url,
    wait_port,
)
from tests.vmcontrol.factories import vm_with_token
from vmcontrol.agent import Agent, AgentIdentity, client_tls_context
from vmcontrol.models import AgentSession, VirtualMachine

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> Path:
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2"),
        *("-subj", f"/CN=Quintet test {name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        *("-addext", "subjectKeyIdentifier=hash"),
        cwd=directory,
    )
    return directory / f"{name}.pem"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate it signed for `localhost` and 127.0.0.1, and an unrelated CA."""
    directory = tmp_path_factory.mktemp("pki")
    ca = _ca(directory, "ca")
    other = _ca(directory, "other-ca")
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"),
        cwd=directory,
    )
    (directory / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl(
        *("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext"),
        cwd=directory,
    )
    return Pki(ca=ca, other_ca=other, cert=directory / "server.pem", key=directory / "server.key")


@pytest.fixture
def tls_vmserver(start_vmserver: Callable[..., VmServer], pki: Pki) -> Callable[..., VmServer]:
    def start(**overrides: Any) -> VmServer:
        return start_vmserver(tls_cert=str(pki.cert), tls_key=str(pki.key), **overrides)

    return start


async def run_agent(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    child = manage(
        ["run_vm_agent", *args],
        {"DATABASE_URL": await sync_to_async(test_database_url)(), **(env or {})},
    )
    output, _ = await asyncio.to_thread(child.communicate, timeout=90)
    return child.returncode, output.decode(errors="replace")


@pytest.fixture
def tls_server_process(transactional_db: None, pki: Pki) -> Iterator[int]:
    """`run_vmcontrol_server` in its own process, serving TLS from the environment."""
    port = free_port()
    child = manage(
        ["run_vmcontrol_server", "--host", "127.0.0.1", "--port", str(port)],
        {
            "DATABASE_URL": test_database_url(),
            "VMCONTROL_SERVER_NAME": "tls-1",
            "VMCONTROL_TLS_CERT": str(pki.cert),
            "VMCONTROL_TLS_KEY": str(pki.key),
        },
    )
    try:
        wait_port(port)
        yield port
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@pytest.mark.parametrize("configured_by", ["flags", "env"])
async def test_an_agent_process_authorizes_over_tls_with_the_ca_file(
    tls_server_process: int, pki: Pki, configured_by: str
) -> None:
    vm, token = await sync_to_async(vm_with_token)("tls-agent")
    common = ["--host", "localhost", "--port", str(tls_server_process)]
    common += ["--vm-id", str(vm.pk), "--token", token, "--duration", "3"]
    if configured_by == "flags":
        code, output = await run_agent(*common, "--tls", "--ca-file", str(pki.ca))
    else:
        code, output = await run_agent(
            *common,
            env={"VMCONTROL_AGENT_TLS": "true", "VMCONTROL_AGENT_CA_FILE": str(pki.ca)},
        )
    assert code == 0, output
    session = await sync_to_async(AgentSession.objects.get)(vm=vm)
    assert session.authorized_at is not None and session.end_reason == "bye", output
    assert session.server_name == "tls-1"


async def test_a_plaintext_client_is_refused_by_a_tls_server(
    tls_vmserver: Callable[..., VmServer], pki: Pki
) -> None:
    server = tls_vmserver()
    vm, token = await sync_to_async(vm_with_token)("plain")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    hello = {"type": "hello", "id": "h", "protocol": 1, "vm_id": vm.pk}
    writer.write(json.dumps(hello).encode() + b"\n")
    writer.write(json.dumps({"type": "auth", "vm_id": vm.pk, "token": token}).encode() + b"\n")
    await writer.drain()
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(4096), 10):
            received += chunk
    except ConnectionError:
        pass
    writer.close()
    assert b"welcome" not in received and b"auth_ok" not in received
    assert not received.startswith(b"{")  # at most a TLS alert, never a protocol frame
    await asyncio.sleep(0.3)
    assert await sync_to_async(AgentSession.objects.count)() == 0

    # The server goes on serving agents that speak TLS.
    agent = Agent(
        "127.0.0.1",
        server.port,
        AgentIdentity(name="t", vm_id=vm.pk, token=token),
        tls=client_tls_context(pki.ca),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.authorized.wait(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.mark.parametrize(
    ("distrust", "reason"),
    [
        ("other_ca", "unable to get local issuer certificate"),
        ("other_host_name", "Hostname mismatch"),
        ("system_store", "unable to get local issuer certificate"),
    ],
)
async def test_an_agent_that_does_not_trust_the_certificate_refuses_to_talk(
    tls_vmserver: Callable[..., VmServer], pki: Pki, tmp_path: Path, distrust: str, reason: str
) -> None:
    server = tls_vmserver()
    vm, token = await sync_to_async(vm_with_token)("wary")
    stats = tmp_path / "stats.json"
    args = ["--host", "127.0.0.1", "--port", str(server.port), "--vm-id", str(vm.pk)]
    args += ["--token", token, "--duration", "2", "--stats-file", str(stats), "--tls"]
    if distrust == "other_ca":
        args += ["--ca-file", str(pki.other_ca)]
    elif distrust == "other_host_name":
        args += ["--ca-file", str(pki.ca), "--tls-server-name", "vmcontrol.example.org"]
    code, output = await run_agent(*args)
    assert code == 0, output
    counters = json.loads(stats.read_text())
    assert counters["connects"] == 0 and counters["auths"] == 0, counters
    assert counters["tls_failures"] >= 1, counters
    assert "vmcontrol_agent_tls_refused" in output and "certificate verify failed" in output
    assert reason in output
    assert output.count("vmcontrol_agent_tls_refused") == 1  # once per run of failures
    assert await sync_to_async(AgentSession.objects.count)() == 0
    assert (await sync_to_async(VirtualMachine.objects.get)(pk=vm.pk)).status == "offline"


async def test_a_tls_handshake_that_never_finishes_is_closed_at_the_auth_deadline(
    tls_vmserver: Callable[..., VmServer],
) -> None:
    server = tls_vmserver(auth_timeout=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    opened = time.monotonic()
    writer.write(b"\x16\x03\x01")  # the start of a ClientHello record, never completed
    await writer.drain()
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 10) == b""
    open_for = time.monotonic() - opened
    writer.close()
    assert 0.9 <= open_for <= 2.5, open_for


def test_an_agent_with_a_missing_or_bad_ca_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="no such file"):
        call_command("run_vm_agent", "--ca-file", str(tmp_path / "absent.pem"), "--port", "9")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(CommandError, match="not a PEM CA bundle"):
        call_command("run_vm_agent", "--ca-file", str(garbage), "--port", "9")


def test_the_server_refuses_to_start_with_an_unreadable_certificate(tmp_path: Path) -> None:
    from vmcontrol.server import tls_context
    from vmcontrol.sessions import ServerConfig

    assert tls_context(ServerConfig(tls_cert="", tls_key="")) is None
    with pytest.raises((OSError, ssl.SSLError)):
        tls_context(ServerConfig(tls_cert=str(tmp_path / "absent.pem"), tls_key=""))


def test_tls_contexts_verify_and_require_tls_1_2(pki: Pki) -> None:
    from vmcontrol.server import tls_context
    from vmcontrol.sessions import ServerConfig

    client = client_tls_context(pki.ca)
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    assert client.minimum_version >= ssl.TLSVersion.TLSv1_2
    served = tls_context(ServerConfig(tls_cert=str(pki.cert), tls_key=str(pki.key)))
    assert served is not None and served.minimum_version >= ssl.TLSVersion.TLSv1_2
