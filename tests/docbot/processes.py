"""Real bot processes for the multi-process tests: `manage.py run_docbot --mode polling`
copies whose Bot API calls the stand-in records under a label of their own, each with its log."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.docbot.conftest import BotEnv
from tests.realtime.nodes import database_url

ROOT = Path(__file__).resolve().parents[2]
#: A loaded machine may take tens of seconds to start a Django process.
START_SECONDS = 120.0
SETTINGS_MODULE = "config.settings_test"


@dataclass
class Poller:
    """One `run_docbot --mode polling` process and its log."""

    process: subprocess.Popen[bytes]
    log: Path

    def said(self, event: str) -> bool:
        return event in self.log.read_text(errors="replace")

    def wait_said(self, event: str, within: float) -> None:
        deadline = time.monotonic() + within
        while not self.said(event):
            if self.process.poll() is not None:
                raise AssertionError(f"poller exited: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event} in {within} s: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: nothing is finished, confirmed, renewed or released any more."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> int:
        """SIGTERM, then its exit status once it has finished what it was handling."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


def bot_variables(env: BotEnv, label: str, **extra: str) -> dict[str, str]:
    """The settings (environment variables) of a bot process whose Bot API calls the stand-in
    records as `label`'s, on the test's database and backend; `extra` added."""
    fake, server = env.fake, env.server
    return {
        "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
        "DATABASE_URL": database_url(),
        "TELEGRAM_BOT_TOKEN": fake.token,
        "TELEGRAM_API_BASE_URL": fake.base_url_for(label),
        "TELEGRAM_FILE_BASE_URL": fake.base_file_url,
        "DOCBOT_BACKEND_URL": server.http_url,
        "DOCBOT_PUBLIC_BASE_URL": server.http_url,
        "DOCBOT_FLOOD_MAX_PER_SECOND": "50",
        "DOCBOT_SANDBOX": "false",
        "METRICS_PORT": "0",
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def bot_environment(env: BotEnv, label: str, **extra: str) -> dict[str, str]:
    """This process's environment (Redis when set, ...) with `bot_variables`, without a broker
    (tasks run eagerly) or a configured service token (the identity the test made is used)."""
    environment = {**os.environ, **bot_variables(env, label, **extra)}
    for name in ("CELERY_BROKER_URL", "DOCBOT_SERVICE_TOKEN"):
        environment.pop(name, None)
    return environment


@contextmanager
def poller(env: BotEnv, label: str, log_dir: Path, **extra: str) -> Iterator[Poller]:
    """`run_docbot --mode polling` (1 s long polls) whose Bot API calls the stand-in records as
    `label`'s; `extra` is added to its environment. Stopped (or found killed) on exit."""
    log = log_dir / f"{label}.log"
    command = [sys.executable, "manage.py", "run_docbot", "--mode", "polling"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--poll-timeout", "1"],
            cwd=ROOT,
            env=bot_environment(env, label, **extra),
            stdout=out,
            stderr=out,
        )
    try:
        yield Poller(process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
