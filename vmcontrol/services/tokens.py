"""VM tokens and the enrollment secret: generated, stored as hashes, compared in constant time."""

import hashlib
import hmac
import secrets

TOKEN_BYTES = 32
TOKEN_PREFIX = "vmc_"  # noqa: S105 - a public marker, not a secret
"""Marks a vmcontrol token (secret scanners can recognise it) and keeps it from starting with
`-`, which command lines would read as an option."""

_NO_HASH = "0" * 64
"""Stands in for a missing hash so a refusal does the same work as a comparison."""


def token_hash(raw: str) -> str:
    """The stored form of a raw token: its sha256 hex digest (64 characters). Pure."""
    # sha256 suffices: the token is 32 random bytes, so there is nothing to brute-force.
    return hashlib.sha256(raw.encode()).hexdigest()


def token_generate() -> tuple[str, str]:
    """A new raw token (shown once): `vmc_` and 32 random bytes in URL-safe base64, and the
    hash that is stored."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    return raw, token_hash(raw)


def token_matches(raw: str, stored_hash: str) -> bool:
    """Constant time: the raw token's sha256 hex digest is compared with `hmac.compare_digest`
    against the stored one, or against a stand-in of the same length when there is none (an
    unknown VM is passed as "", a revoked one has ""), so every refusal does the same work.
    An empty `stored_hash` never matches."""
    matched = hmac.compare_digest(token_hash(raw), stored_hash or _NO_HASH)
    return matched and bool(stored_hash)


def secret_matches(given: str, expected: str) -> bool:
    """Constant time whatever the lengths: both secrets' sha256 digests (32 bytes each) are
    compared with `hmac.compare_digest`. An empty `expected` (enrollment off) never matches."""
    matched = hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
    )
    return matched and bool(expected)
