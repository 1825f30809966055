"""Throwaway certificate authorities and certificates for TLS tests, made with the `openssl` CLI
(the `cryptography` package is not a dependency). EC P-256 keys, valid for one day."""

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {name}
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
"""


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path

    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    def key_pem(self) -> bytes:
        return self.key.read_bytes()


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def _config(directory: Path, name: str) -> Path:
    path = directory / f"{name}.cnf"
    path.write_text(CONFIG.format(name=name))
    return path


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


def authority(directory: Path, name: str) -> Pair:
    """A self-signed CA named `name` in `directory`."""
    config = _config(directory, name)
    pair = Pair(cert=directory / f"{name}.pem", key=directory / f"{name}.key")
    _key(pair.key)
    _openssl(
        "req", "-x509", "-new", "-key", pair.key, "-out", pair.cert, "-days", "1",
        "-config", config, "-extensions", "ca", "-sha256",
    )  # fmt: skip
    return pair


def issue(ca: Pair, directory: Path, name: str, *, usage: str) -> Pair:
    """A certificate for `name` signed by `ca`; `usage` "server" (SAN localhost, 127.0.0.1, ::1)
    or "client"."""
    config = _config(directory, name)
    pair = Pair(cert=directory / f"{name}.pem", key=directory / f"{name}.key")
    request = directory / f"{name}.csr"
    _key(pair.key)
    _openssl("req", "-new", "-key", pair.key, "-out", request, "-config", config)
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca.cert, "-CAkey", ca.key, "-set_serial",
        str(secrets.randbits(62) + 1), "-days", "1", "-sha256",
        "-extfile", config, "-extensions", usage, "-out", pair.cert,
    )  # fmt: skip
    return pair


def encrypted_key(pair: Pair, directory: Path, passphrase: str = "secret") -> Path:
    """A passphrase-protected copy of `pair`'s key."""
    path = directory / f"{pair.key.stem}-encrypted.key"
    _openssl("pkey", "-in", pair.key, "-aes256", "-passout", f"pass:{passphrase}", "-out", path)
    return path
