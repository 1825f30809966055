"""The per-user frame budget's arithmetic (realtime.fanout.limits), without sockets: the
sliding-window counter, leases, and the local refusal that spares Redis during a flood. Its
global reach across processes is tested on real processes in test_scaleout.py."""

import pytest

from realtime.fanout.limits import MemoryWindows, UserFrameLimit


def test_a_reservation_grants_a_lease_but_never_past_the_limit() -> None:
    windows = MemoryWindows()
    grants = [windows.reserve_now("k", 7, limit=10, lease=4, weight=1.0)[0] for _ in range(4)]
    assert grants == [4, 4, 2, 0]


def test_the_previous_window_counts_by_the_share_the_sliding_window_still_overlaps() -> None:
    windows = MemoryWindows()
    assert windows.reserve_now("k", 1, limit=10, lease=10, weight=1.0)[0] == 10
    # A quarter into window 2 the sliding window still covers 3/4 of window 1: 7.5 of its 10.
    assert windows.reserve_now("k", 2, limit=10, lease=10, weight=0.75) == (2, 0, 10)
    # Two windows on, window 1 no longer counts at all.
    assert windows.reserve_now("k", 4, limit=10, lease=10, weight=0.5) == (10, 0, 0)


@pytest.mark.parametrize(
    ("rate", "burst", "shape"),
    [(40.0, 80, (80, 2000)), (0.1, 4, (4, 40_000)), (1e9, 10**9, (10**9, 1000)), (0.0, 5, None)],
)
def test_a_token_bucket_maps_to_burst_frames_per_burst_over_rate_seconds(
    rate: float, burst: int, shape: tuple[int, int] | None
) -> None:
    limit, window_ms = UserFrameLimit.shape(rate, burst)
    if shape is not None:
        assert (limit, window_ms) == shape
    else:  # no refill: the burst per day, the longest window kept
        assert (limit, window_ms) == (5, 24 * 3600 * 1000)


class CountingWindows(MemoryWindows):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def reserve(
        self, key: str, slot: int, limit: int, lease: int, weight: float, window_ms: int
    ) -> tuple[int, int, int]:
        self.calls += 1
        return await super().reserve(key, slot, limit, lease, weight, window_ms)


async def test_frames_are_spent_from_the_lease_and_a_refused_user_is_refused_locally() -> None:
    limit = UserFrameLimit("test")
    windows = CountingWindows()
    rate, burst = 0.01, 20  # 20 frames per 2000 s; a lease is 2 frames
    allowed = []
    for _ in range(30):
        decision = limit.take_local(1, rate, burst)
        if decision is None:
            decision = await limit.reserve(1, rate, burst, windows)
        allowed.append(decision)
    assert allowed == [True] * 20 + [False] * 10
    # One reservation per lease of 2, and one that found no room: the refusals after it were
    # answered locally.
    assert windows.calls == 11
    # Another user has a budget of their own.
    assert await limit.reserve(2, rate, burst, windows) is True
