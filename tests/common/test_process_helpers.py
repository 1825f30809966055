"""The shared helpers of long-running processes: run-until-signal and ORM calls."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from django.db import connection

from common.db import orm_async, orm_call
from common.signals import FORCE_AFTER_SECONDS

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = textwrap.dedent(
    """
    import asyncio, sys
    from common.signals import run_until_signal

    async def main(stop):
        print("ready", flush=True)
        await stop.wait()
        print("finishing", flush=True)
        await asyncio.sleep(float(sys.argv[1]))
        print("finished", flush=True)
        return 0

    sys.exit(run_until_signal(main))
    """
)


def _start(finish_seconds: float) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, str(finish_seconds)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    _wait_for_line(child, "ready")
    return child


def _wait_for_line(child: subprocess.Popen[str], wanted: str) -> None:
    assert child.stdout is not None
    while (line := child.stdout.readline()) and line.strip() != wanted:
        pass
    assert line.strip() == wanted


def _program_lines(out: str) -> list[str]:
    return [line for line in out.split() if line in {"finishing", "finished"}]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_lets_the_unit_of_work_finish(signum: int) -> None:
    child = _start(0.3)
    child.send_signal(signum)
    out, _ = child.communicate(timeout=10)
    assert _program_lines(out) == ["finishing", "finished"]
    assert child.returncode == 0


def test_a_second_signal_stops_at_once_with_status_1_and_no_traceback() -> None:
    child = _start(30)
    child.send_signal(signal.SIGTERM)
    _wait_for_line(child, "finishing")
    time.sleep(FORCE_AFTER_SECONDS)
    started = time.monotonic()
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=10)
    assert time.monotonic() - started < 5
    assert child.returncode == 1
    assert "Traceback" not in out


def test_the_same_signal_delivered_twice_at_once_is_one_request() -> None:
    """`timeout`, or a kill of the process group, delivers the signal twice in a row."""
    child = _start(0.5)
    child.send_signal(signal.SIGTERM)
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=10)
    assert _program_lines(out) == ["finishing", "finished"]
    assert child.returncode == 0


@pytest.mark.django_db(transaction=True)
def test_orm_call_gives_the_connection_back_and_starts_with_a_fresh_one() -> None:
    from django.contrib.auth import get_user_model

    def count() -> int:
        return get_user_model().objects.count()

    assert orm_call(count) == 0
    assert connection.connection is None  # given back right after the call
    connection.connect()
    stale = connection.connection
    assert orm_call(count) == 0
    assert connection.connection is None and stale is not None


@pytest.mark.django_db(transaction=True)
async def test_orm_async_runs_the_call_in_a_worker_thread() -> None:
    import threading

    main = threading.get_ident()
    ident = await orm_async(threading.get_ident)()
    assert ident != main
