"""Transport security of the line provider (`input-policy.md`, "Identity and abuse").

Staff API tokens travel in the call metadata, so the wire must be private wherever it leaves
the machine:

- `BETTING_GRPC_TLS_CERT` + `BETTING_GRPC_TLS_KEY` (PEM paths): the server speaks TLS only. With
  `BETTING_GRPC_TLS_CLIENT_CA` as well, every client must present a certificate signed by that
  CA (mutual TLS). The files are read and checked (parseable, key matching the certificate) at
  start; a bad file stops the process with the setting's name.
- Without TLS, a loopback bind host (127.0.0.0/8, ::1, `localhost`) serves plaintext. Any other
  host is refused at start when DJANGO_DEBUG is false, unless `BETTING_GRPC_ALLOW_PLAINTEXT` is
  true (the operator vouches for the network in between: a container network whose port is
  published on 127.0.0.1 only, a TLS-terminating proxy); then, as in debug, it starts with a
  warning logged as `line_provider_plaintext`.
"""

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

logger = structlog.get_logger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass(frozen=True)
class Transport:
    """How the server listens: `credentials` None means plaintext."""

    mode: str
    """"plaintext", "tls" or "mtls"."""
    credentials: grpc.ServerCredentials | None = None


def is_loopback(host: str) -> bool:
    """True for a host that only this machine can reach: a loopback address (IPv6 may be in
    brackets) or a loopback name. Anything else, the wildcard and other names included, is
    treated as reachable from the network."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_address(host: str, port: int) -> str:
    """`host:port` for grpc, an IPv6 address in brackets (`[::1]:50051`)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def configured_mode() -> str:
    """The transport the settings ask for, without reading any file (for banners)."""
    if not settings.BETTING_GRPC_TLS_CERT:
        return "plaintext"
    return "mtls" if settings.BETTING_GRPC_TLS_CLIENT_CA else "tls"


def _pem(path: str, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImproperlyConfigured(f"{setting}: cannot read {path}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ImproperlyConfigured(f"{setting}: {path} is not a PEM file")
    return data


def _no_password() -> bytes:
    # An encrypted key would otherwise make OpenSSL prompt on the terminal; grpc cannot use one.
    raise ImproperlyConfigured("BETTING_GRPC_TLS_KEY: the key is encrypted; give it unencrypted")


def _tls() -> Transport:
    cert_path = settings.BETTING_GRPC_TLS_CERT
    key_path = settings.BETTING_GRPC_TLS_KEY
    client_ca_path = settings.BETTING_GRPC_TLS_CLIENT_CA
    if not key_path:
        raise ImproperlyConfigured("BETTING_GRPC_TLS_CERT is set without BETTING_GRPC_TLS_KEY")
    cert = _pem(cert_path, "BETTING_GRPC_TLS_CERT")
    key = _pem(key_path, "BETTING_GRPC_TLS_KEY")
    client_ca = _pem(client_ca_path, "BETTING_GRPC_TLS_CLIENT_CA") if client_ca_path else None
    # grpc reports bad material only as "failed to bind"; the ssl module names the problem.
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        check.load_cert_chain(cert_path, key_path, password=_no_password)
    except ssl.SSLError as error:
        raise ImproperlyConfigured(
            f"BETTING_GRPC_TLS_CERT/_KEY: {cert_path} and {key_path} are not a certificate and "
            f"its private key ({error.reason or error})"
        ) from None
    if client_ca is not None:
        try:
            check.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except ssl.SSLError as error:
            raise ImproperlyConfigured(
                f"BETTING_GRPC_TLS_CLIENT_CA: {client_ca_path} holds no usable CA certificate "
                f"({error.reason or error})"
            ) from None
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    return Transport(mode="tls" if client_ca is None else "mtls", credentials=credentials)


def server_transport(host: str) -> Transport:
    """The transport for a server bound to `host`, by settings (see the module doc).

    Raises ImproperlyConfigured for unusable TLS files and for plaintext on a non-loopback host
    outside debug without BETTING_GRPC_ALLOW_PLAINTEXT; logs the warning otherwise."""
    if settings.BETTING_GRPC_TLS_CERT or settings.BETTING_GRPC_TLS_KEY:
        if not settings.BETTING_GRPC_TLS_CERT:
            raise ImproperlyConfigured("BETTING_GRPC_TLS_KEY is set without BETTING_GRPC_TLS_CERT")
        return _tls()
    if settings.BETTING_GRPC_TLS_CLIENT_CA:
        raise ImproperlyConfigured("BETTING_GRPC_TLS_CLIENT_CA needs BETTING_GRPC_TLS_CERT/_KEY")
    if is_loopback(host):
        return Transport(mode="plaintext")
    if not settings.DEBUG and not settings.BETTING_GRPC_ALLOW_PLAINTEXT:
        raise ImproperlyConfigured(
            f"refusing to serve gRPC in plaintext on {host!r}: staff tokens would cross the "
            "network in clear text. Set BETTING_GRPC_TLS_CERT and BETTING_GRPC_TLS_KEY, bind a "
            "loopback host, or set BETTING_GRPC_ALLOW_PLAINTEXT=true if the network in between "
            "is trusted."
        )
    logger.warning(
        "line_provider_plaintext",
        host=host,
        allowed_by="DJANGO_DEBUG" if settings.DEBUG else "BETTING_GRPC_ALLOW_PLAINTEXT",
        detail=(
            "gRPC without TLS on a non-loopback host: staff tokens in call metadata can be read "
            "on the network; set BETTING_GRPC_TLS_CERT and BETTING_GRPC_TLS_KEY"
        ),
    )
    return Transport(mode="plaintext")
