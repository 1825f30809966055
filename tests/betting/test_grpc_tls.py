"""Transport security of the line provider (issue 11 item 10), over real gRPC servers.

Certificates are generated per session with the `openssl` CLI: a CA the server's certificate
chains to, a CA for client certificates (mutual TLS) and a stranger CA that signs both a server
and a client certificate nobody should accept.
"""

import asyncio
import logging
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import free_port
from betting.grpc.generated import betting_pb2 as pb
from betting.grpc.generated import betting_pb2_grpc as pb_grpc
from betting.grpc.transport import is_loopback
from betting.models import Event
from tests.betting.certificates import Pair, authority, encrypted_key, issue
from tests.betting.servers import command_env, line_provider_running
from tests.factories import StaffFactory, token_for

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
CALL_TIMEOUT = 10


@dataclass(frozen=True)
class Pki:
    ca: Pair
    server: Pair
    client_ca: Pair
    client: Pair
    stranger_ca: Pair
    stranger_server: Pair
    stranger_client: Pair
    not_pem: Path
    encrypted_key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = authority(directory, "quintet-test-ca")
    client_ca = authority(directory, "quintet-client-ca")
    stranger_ca = authority(directory, "stranger-ca")
    not_pem = directory / "not.pem"
    not_pem.write_bytes(b"\x00certificate? no\n")
    server = issue(ca, directory, "line-provider", usage="server")
    return Pki(
        ca=ca,
        server=server,
        client_ca=client_ca,
        client=issue(client_ca, directory, "bookmaker-client", usage="client"),
        stranger_ca=stranger_ca,
        stranger_server=issue(stranger_ca, directory, "stranger-server", usage="server"),
        stranger_client=issue(stranger_ca, directory, "stranger-client", usage="client"),
        not_pem=not_pem,
        encrypted_key=encrypted_key(server, directory),
    )


@pytest.fixture
def tls(settings: Any, pki: Pki, transactional_db: None, fast_watch: None) -> Pki:
    """The line provider's settings: TLS with the test CA's server certificate."""
    settings.BETTING_GRPC_TLS_CERT = str(pki.server.cert)
    settings.BETTING_GRPC_TLS_KEY = str(pki.server.key)
    return pki


@pytest.fixture
def mtls(tls: Pki, settings: Any) -> Pki:
    """TLS plus client certificates required, signed by the client CA."""
    settings.BETTING_GRPC_TLS_CLIENT_CA = str(tls.client_ca.cert)
    return tls


def in_an_hour() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    return stamp


@sync_to_async
def staff_auth(scheme: str = "Bearer") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"{scheme} {token_for(StaffFactory.create())}"),)


def tls_channel(
    port: int, *, roots: Pair, client: Pair | None = None, name: str | None = None
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=roots.cert_pem(),
        private_key=None if client is None else client.key_pem(),
        certificate_chain=None if client is None else client.cert_pem(),
    )
    options = [] if name is None else [("grpc.ssl_target_name_override", name)]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


async def create_and_list(channel: grpc.aio.Channel, event_id: str, scheme: str) -> list[str]:
    stub = pb_grpc.LineProviderStub(channel)
    auth = await staff_auth(scheme)
    request = pb.CreateEventRequest(
        id=event_id, name=f"Match {event_id}", coefficient="1.90", deadline=in_an_hour()
    )
    created = await stub.CreateEvent(request, metadata=auth, timeout=CALL_TIMEOUT)
    assert (created.id, created.coefficient) == (event_id, "1.90")
    listed = await stub.ListEvents(pb.ListEventsRequest(open_only=True), timeout=CALL_TIMEOUT)
    return [event.id for event in listed.events]


async def refused(channel: grpc.aio.Channel, event_id: str) -> grpc.StatusCode:
    """The status of a staff CreateEvent on `channel` that must not get through."""
    auth = await staff_auth()
    request = pb.CreateEventRequest(
        id=event_id, name="Never", coefficient="1.50", deadline=in_an_hour()
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await pb_grpc.LineProviderStub(channel).CreateEvent(
            request, metadata=auth, timeout=CALL_TIMEOUT
        )
    return error.value.code()


@sync_to_async
def event_exists(event_id: str) -> bool:
    return Event.objects.filter(pk=event_id).exists()


@pytest.mark.parametrize("scheme", ["Bearer", "Token"])
async def test_tls_client_trusting_the_ca_creates_and_lists_with_a_staff_token(
    tls: Pki, scheme: str
) -> None:
    async with (
        line_provider_running() as port,
        tls_channel(port, roots=tls.ca) as channel,
    ):
        assert await create_and_list(channel, "tls-1", scheme) == ["tls-1"]
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(
            health_pb2.HealthCheckRequest(service="betting.v1.LineProvider")
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # The certificate names localhost as well as 127.0.0.1: hostname checks pass by name.
        async with tls_channel(port, roots=tls.ca, name="localhost") as channel:
            assert await create_and_list(channel, "tls-2", scheme) == ["tls-1", "tls-2"]


def plaintext(port: int, pki: Pki) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def other_ca(port: int, pki: Pki) -> grpc.aio.Channel:
    return tls_channel(port, roots=pki.stranger_ca)


def wrong_name(port: int, pki: Pki) -> grpc.aio.Channel:
    return tls_channel(port, roots=pki.ca, name="line-provider.example.com")


@pytest.mark.parametrize("client", [plaintext, other_ca, wrong_name])
async def test_a_client_that_cannot_verify_the_server_gets_nothing_through(
    tls: Pki, client: Any
) -> None:
    async with (
        line_provider_running() as port,
        client(port, tls) as channel,
    ):
        assert await refused(channel, "never") == grpc.StatusCode.UNAVAILABLE
        async with tls_channel(port, roots=tls.ca) as channel:  # the server is still fine
            assert await create_and_list(channel, "after", "Bearer") == ["after"]
    assert not await event_exists("never")


async def test_a_tls_client_does_not_trust_a_server_with_a_strangers_certificate(
    settings: Any, pki: Pki, transactional_db: None
) -> None:
    settings.BETTING_GRPC_TLS_CERT = str(pki.stranger_server.cert)
    settings.BETTING_GRPC_TLS_KEY = str(pki.stranger_server.key)
    async with line_provider_running() as port, tls_channel(port, roots=pki.ca) as channel:
        assert await refused(channel, "impostor") == grpc.StatusCode.UNAVAILABLE
    assert not await event_exists("impostor")


async def test_mutual_tls_serves_a_client_certificate_signed_by_the_client_ca(mtls: Pki) -> None:
    async with (
        line_provider_running() as port,
        tls_channel(port, roots=mtls.ca, client=mtls.client) as channel,
    ):
        assert await create_and_list(channel, "mtls-1", "Bearer") == ["mtls-1"]


@pytest.mark.parametrize("certificate", ["none", "stranger", "server-ca-signed"])
async def test_mutual_tls_refuses_clients_without_a_certificate_from_the_client_ca(
    mtls: Pki, certificate: str
) -> None:
    client = {
        "none": None,
        "stranger": mtls.stranger_client,
        # Signed by the CA the client trusts for the server, not by the client CA.
        "server-ca-signed": mtls.server,
    }[certificate]
    async with (
        line_provider_running() as port,
        tls_channel(port, roots=mtls.ca, client=client) as channel,
    ):
        assert await refused(channel, "anonymous") == grpc.StatusCode.UNAVAILABLE
    assert not await event_exists("anonymous")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.10", "line.example.com"])
async def test_plaintext_on_a_network_host_is_refused_at_start_outside_debug(
    settings: Any, transactional_db: None, host: str
) -> None:
    settings.DEBUG = False
    settings.BETTING_GRPC_ALLOW_PLAINTEXT = False
    with pytest.raises(ImproperlyConfigured, match="BETTING_GRPC_ALLOW_PLAINTEXT"):
        async with line_provider_running(host):
            pass


def plaintext_warnings(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        record.msg
        for record in caplog.records
        if isinstance(record.msg, dict) and record.msg.get("event") == "line_provider_plaintext"
    ]


@pytest.mark.parametrize(
    ("debug", "allow", "allowed_by"),
    [(False, True, "BETTING_GRPC_ALLOW_PLAINTEXT"), (True, False, "DJANGO_DEBUG")],
)
async def test_plaintext_on_a_network_host_starts_with_a_warning_when_allowed(
    settings: Any,
    transactional_db: None,
    caplog: pytest.LogCaptureFixture,
    debug: bool,
    allow: bool,
    allowed_by: str,
) -> None:
    caplog.set_level(logging.INFO)
    settings.DEBUG = debug
    settings.BETTING_GRPC_ALLOW_PLAINTEXT = allow
    async with (
        line_provider_running("0.0.0.0") as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        assert await create_and_list(channel, "open-1", "Bearer") == ["open-1"]
    [warning] = plaintext_warnings(caplog)
    assert (warning["host"], warning["allowed_by"]) == ("0.0.0.0", allowed_by)
    assert warning["level"] == "warning"


@pytest.mark.parametrize(("host", "target"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
async def test_plaintext_on_loopback_starts_without_a_warning(
    settings: Any, transactional_db: None, caplog: pytest.LogCaptureFixture, host: str, target: str
) -> None:
    caplog.set_level(logging.INFO)
    settings.DEBUG = False
    async with (
        line_provider_running(host) as port,
        grpc.aio.insecure_channel(f"{target}:{port}") as channel,
    ):
        assert await create_and_list(channel, "local-1", "Bearer") == ["local-1"]
    assert plaintext_warnings(caplog) == []


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.1", False),
        ("::ffff:127.0.0.1", False),
        ("localhost.evil.example", False),
    ],
)
def test_loopback_hosts_are_only_the_machines_own(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _bad_settings(pki: Pki, case: str) -> tuple[dict[str, str], str]:
    """The TLS settings of a broken configuration and the setting its error must name."""
    server = {"BETTING_GRPC_TLS_CERT": str(pki.server.cert)}
    return {
        "cert without key": (server, "BETTING_GRPC_TLS_KEY"),
        "key without cert": (
            {"BETTING_GRPC_TLS_KEY": str(pki.server.key)},
            "BETTING_GRPC_TLS_CERT",
        ),
        "missing cert file": (
            {"BETTING_GRPC_TLS_CERT": "/nonexistent/cert.pem", "BETTING_GRPC_TLS_KEY": "k"},
            "BETTING_GRPC_TLS_CERT",
        ),
        "cert not PEM": (
            {"BETTING_GRPC_TLS_CERT": str(pki.not_pem), "BETTING_GRPC_TLS_KEY": str(pki.ca.key)},
            "BETTING_GRPC_TLS_CERT",
        ),
        "key of another certificate": (
            {**server, "BETTING_GRPC_TLS_KEY": str(pki.client.key)},
            "BETTING_GRPC_TLS_CERT/_KEY",
        ),
        "key file is a certificate": (
            {**server, "BETTING_GRPC_TLS_KEY": str(pki.server.cert)},
            "BETTING_GRPC_TLS_CERT/_KEY",
        ),
        "encrypted key": (
            {**server, "BETTING_GRPC_TLS_KEY": str(pki.encrypted_key)},
            "BETTING_GRPC_TLS_KEY: the key is encrypted",
        ),
        "client CA not PEM": (
            {
                **server,
                "BETTING_GRPC_TLS_KEY": str(pki.server.key),
                "BETTING_GRPC_TLS_CLIENT_CA": str(pki.not_pem),
            },
            "BETTING_GRPC_TLS_CLIENT_CA",
        ),
        "client CA without TLS": (
            {"BETTING_GRPC_TLS_CLIENT_CA": str(pki.client_ca.cert)},
            "BETTING_GRPC_TLS_CLIENT_CA",
        ),
    }[case]


@pytest.mark.parametrize(
    "case",
    [
        "cert without key",
        "key without cert",
        "missing cert file",
        "cert not PEM",
        "key of another certificate",
        "key file is a certificate",
        "encrypted key",
        "client CA not PEM",
        "client CA without TLS",
    ],
)
async def test_unusable_tls_settings_stop_the_server_at_start_naming_the_setting(
    settings: Any, pki: Pki, transactional_db: None, case: str
) -> None:
    values, named = _bad_settings(pki, case)
    for name in ("BETTING_GRPC_TLS_CERT", "BETTING_GRPC_TLS_KEY", "BETTING_GRPC_TLS_CLIENT_CA"):
        setattr(settings, name, values.get(name, ""))
    with pytest.raises(ImproperlyConfigured, match=named):
        async with line_provider_running():
            pass


def run_command(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "run_line_provider", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


PRODUCTION = {"DJANGO_DEBUG": "false", "DJANGO_SECRET_KEY": "test-" + "k" * 50}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "BETTING_GRPC_ALLOW_PLAINTEXT"),
        ({"BETTING_GRPC_TLS_CERT": "/etc/hostname"}, "BETTING_GRPC_TLS_KEY go together"),
        ({"BETTING_GRPC_TLS_CERT": "/nonexistent", "BETTING_GRPC_TLS_KEY": "/x"}, "cannot read"),
    ],
)
def test_run_line_provider_refuses_to_start_on_a_network_host_without_usable_tls(
    transactional_db: None, extra: dict[str, str], message: str
) -> None:
    env = command_env(**PRODUCTION, **extra)
    env.pop("BETTING_GRPC_ALLOW_PLAINTEXT", None)
    child = run_command(env, "--host", "0.0.0.0", "--port", str(free_port()))
    try:
        stdout, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode != 0
    assert message in stderr
    assert "serving gRPC" not in stdout


def test_run_line_provider_serves_tls_configured_by_environment(
    transactional_db: None, pki: Pki
) -> None:
    port = free_port()
    env = command_env(
        **PRODUCTION,
        BETTING_GRPC_TLS_CERT=str(pki.server.cert),
        BETTING_GRPC_TLS_KEY=str(pki.server.key),
    )
    child = run_command(env, "--host", "0.0.0.0", "--port", str(port))
    try:
        assert child.stdout is not None
        assert f"0.0.0.0:{port} (tls)" in child.stdout.readline()

        async def check() -> tuple[int, grpc.StatusCode]:
            async with tls_channel(port, roots=pki.ca) as channel:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="betting.v1.LineProvider"),
                    timeout=CALL_TIMEOUT,
                )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT
                    )
            return int(answer.status), error.value.code()

        status, plaintext_code = asyncio.run(check())
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert plaintext_code == grpc.StatusCode.UNAVAILABLE
    finally:
        child.terminate()
        assert child.wait(timeout=20) == 0
