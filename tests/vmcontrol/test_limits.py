"""The failed-attempt limiter (vmcontrol/limits.py) on a fake clock: the bucket, the escalating
lockout and its reset, peer keys, and bounded memory. The door-level behaviour is in
test_abuse.py."""

import pytest

from vmcontrol.limits import FailureLimiter, Lockout, peer_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, **options: float) -> tuple[FailureLimiter, list[Lockout]]:
    lockouts: list[Lockout] = []
    settings = {"burst": 3, "per_minute": 6.0, "lockout": 60.0, "lockout_max": 200.0}
    settings.update(options)
    return (
        FailureLimiter(
            burst=int(settings["burst"]),
            per_minute=settings["per_minute"],
            lockout=settings["lockout"],
            lockout_max=settings["lockout_max"],
            on_lockout=lockouts.append,
            clock=clock,
            max_peers=int(settings.get("max_peers", 100_000)),
        ),
        lockouts,
    )


def test_a_peer_is_locked_out_when_its_bucket_runs_dry_and_lockouts_double_up_to_the_cap() -> None:
    clock = Clock()
    limits, lockouts = limiter(clock)
    assert [limits.failed("a") for _ in range(2)] == [None, None]
    assert limits.retry_after("a") == 0
    assert limits.failed("a") == Lockout(key="a", seconds=60.0, strikes=1)
    assert limits.retry_after("a") == pytest.approx(60.0)
    clock.now += 60  # six tokens' worth of refill, capped at the burst
    assert limits.retry_after("a") == 0
    for _ in range(2):
        assert limits.failed("a") is None
    assert limits.failed("a") == Lockout(key="a", seconds=120.0, strikes=2)
    clock.now += 120
    for _ in range(2):
        limits.failed("a")
    assert limits.failed("a") == Lockout(key="a", seconds=200.0, strikes=3)  # capped
    assert [lockout.seconds for lockout in lockouts] == [60.0, 120.0, 200.0]


def test_a_peer_quiet_for_a_full_refill_after_its_lockout_starts_over() -> None:
    clock = Clock()
    limits, _ = limiter(clock)
    for _ in range(3):
        limits.failed("a")
    assert limits.retry_after("b") == 0  # other peers are not affected
    clock.now += 60 + 29  # lockout over, bucket full, but not yet quiet for 30 s
    for _ in range(2):
        limits.failed("a")
    assert limits.failed("a") == Lockout(key="a", seconds=120.0, strikes=2)
    clock.now += 120 + 30
    for _ in range(2):
        limits.failed("a")
    assert limits.failed("a") == Lockout(key="a", seconds=60.0, strikes=1)  # forgiven


def test_without_refill_a_dry_bucket_stays_closed() -> None:
    clock = Clock()
    limits, _ = limiter(clock, per_minute=0.0, lockout=0.0)
    for _ in range(3):
        limits.failed("a")
    clock.now += 10_000
    assert limits.retry_after("a") == float("inf")


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_peers_are_keyed_by_address_and_ipv6_by_its_64(address: str, key: str) -> None:
    assert peer_key(address) == key


def test_memory_stays_bounded_forgotten_peers_first() -> None:
    clock = Clock()
    limits, _ = limiter(clock, max_peers=100)
    for number in range(100):
        limits.failed(f"10.0.0.{number}")
    clock.now += 30  # every one of them back to a full bucket, never locked out: forgiven
    limits.failed("10.0.1.1")
    assert limits.prune() == 1
    for number in range(250):
        limits.failed(f"10.0.2.{number}")
        clock.now += 0.001
    assert limits.prune() <= 100
