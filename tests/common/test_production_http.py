"""The production web path (issue 14): granian's WSGI server for plain HTTP, behind the nginx
proxy of docker-compose.yml that routes /ws/ and /docbot/ to the ASGI server. Real processes
over real sockets, with production settings (DEBUG off), against the test database.

Every guarantee of the normal path holds there: token auth, throttling, the correlation id,
security headers, the Host check, metrics, static files, JSON errors.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from websockets.sync.client import connect

from tests.factories import UserFactory, auth_header, token_for
from tests.vmcontrol.conftest import free_port, test_database_url, wait_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCRAPER_TOKEN = "production-path-scraper-token"


def production_env(static_root: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": test_database_url(),
        "DATABASE_POOL": "false",
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "production-path-test-" + "k" * 40,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_SECURE_SSL_REDIRECT": "false",
        "DJANGO_SECURE_COOKIES": "false",
        "STATIC_ROOT": str(static_root),
        "METRICS_BEARER_TOKEN": SCRAPER_TOKEN,
        **extra,
    }


def start(command: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """Start a server and wait until it listens; on failure the error quotes its output."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the server writes to it until stop())
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, wait=90)
    except RuntimeError:
        child.kill()
        child.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")[-3000:]
        raise RuntimeError(f"{command[0]} did not listen on {port}:\n{output}") from None
    return child


def stop(child: subprocess.Popen[bytes]) -> None:
    child.terminate()
    try:
        child.wait(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


@pytest.fixture(scope="module")
def static_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("static")
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=production_env(root),
        check=True,
    )
    return root


def granian_wsgi(port: int) -> list[str]:
    # One worker: /metrics is per process, and the assertions read one process's counters.
    return [
        str(BIN / "granian"),
        "--interface",
        "wsgi",
        "config.wsgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--blocking-threads",
        "4",
        "--no-ws",
        "--log-level",
        "warning",
    ]


@pytest.fixture(scope="module")
def wsgi_url(django_db_setup: None, django_db_blocker: object, static_root: Path) -> Iterator[str]:
    port = free_port()
    child = start(granian_wsgi(port), production_env(static_root, API_THROTTLE_USER="20/min"), port)
    yield f"http://127.0.0.1:{port}"
    stop(child)


@pytest.fixture
def wsgi(wsgi_url: str, transactional_db: None) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=wsgi_url, timeout=10) as client:
        yield client


def test_token_auth_answers_on_the_wsgi_server_with_the_request_id_and_security_headers(
    wsgi: httpx.Client,
) -> None:
    user = UserFactory.create()
    me = wsgi.get("/api/auth/me", headers={**auth_header(user), "X-Request-ID": "prod-path.1"})
    assert me.status_code == 200
    assert me.json()["username"] == user.username
    assert me.headers["X-Request-ID"] == "prod-path.1"
    assert me.headers["X-Content-Type-Options"] == "nosniff"
    assert me.headers["X-Frame-Options"] == "DENY"
    assert me.headers["Referrer-Policy"] == "same-origin"
    assert wsgi.get("/api/auth/me").status_code == 401
    refused = wsgi.get("/api/auth/me", headers={"Authorization": "Token not-a-token"})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "authentication_failed"


def test_static_files_are_served_from_the_collected_root_without_debug(
    wsgi: httpx.Client,
) -> None:
    css = wsgi.get("/static/admin/css/base.css")
    assert css.status_code == 200
    assert "body" in css.text
    assert "max-age=60" in css.headers["Cache-Control"]
    assert wsgi.get("/static/admin/css/no-such-file.css").status_code == 404


def test_an_unknown_host_and_an_unknown_path_get_the_json_errors(wsgi: httpx.Client) -> None:
    for path in ("/health", "/api/auth/me", "/admin/"):
        refused = wsgi.get(path, headers={"Host": "evil.example"})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "bad_request"
    missing = wsgi.get("/api/no-such-endpoint", headers={"X-Request-ID": "prod-path.2"})
    assert missing.status_code == 404
    assert missing.headers["Content-Type"].startswith("application/json")
    assert missing.headers["X-Request-ID"] == "prod-path.2"


def test_requests_are_counted_in_the_metrics(wsgi: httpx.Client) -> None:
    scraper = {"Authorization": f"Bearer {SCRAPER_TOKEN}"}
    pattern = re.compile(
        r'^django_http_responses_total_by_status_view_method_total\{method="GET",'
        r'status="200",view="health"\} (\S+)$',
        re.M,
    )

    def served() -> float:
        found = pattern.search(wsgi.get("/metrics", headers=scraper).text)
        return float(found.group(1)) if found else 0.0

    before = served()
    for _ in range(3):
        assert wsgi.get("/health").status_code == 200
    assert served() == before + 3


def test_a_user_over_the_rate_is_throttled_with_retry_after(wsgi: httpx.Client) -> None:
    headers = auth_header(UserFactory.create())
    statuses = [wsgi.get("/api/auth/me", headers=headers).status_code for _ in range(21)]
    assert statuses[:20] == [200] * 20
    assert statuses[20] == 429
    refused = wsgi.get("/api/auth/me", headers=headers)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "throttled"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # Another user has a budget of their own.
    assert wsgi.get("/api/auth/me", headers=auth_header(UserFactory.create())).status_code == 200


@pytest.mark.django_db
def test_an_authenticated_request_costs_one_query() -> None:
    token = token_for(UserFactory.create())
    client = Client()
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/api/auth/me", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200
    assert len(queries.captured_queries) == 1, [q["sql"] for q in queries.captured_queries]


@pytest.mark.skipif(
    shutil.which("nginx") is None, reason="nginx is not installed (.ci/run installs it)"
)
def test_one_public_port_routes_websocket_to_asgi_and_http_to_wsgi(
    wsgi_url: str, static_root: Path, transactional_db: None, tmp_path: Path
) -> None:
    asgi_port, proxy_port = free_port(), free_port()
    asgi = start(
        [
            str(BIN / "uvicorn"),
            "config.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(asgi_port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        production_env(static_root, TRUSTED_PROXY_HOPS="1"),
        asgi_port,
    )
    conf = (ROOT / "docker" / "nginx.conf").read_text()
    conf = conf.replace("server web:8000;", f"server {wsgi_url.removeprefix('http://')};")
    conf = conf.replace("server asgi:8001;", f"server 127.0.0.1:{asgi_port};")
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{proxy_port};")
    conf = conf.replace("/tmp/nginx", str(tmp_path / "nginx"))
    (tmp_path / "nginx.conf").write_text(conf)
    proxy = start(
        ["nginx", "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
        dict(os.environ),
        proxy_port,
    )
    try:
        base = f"http://127.0.0.1:{proxy_port}"
        user = UserFactory.create()
        with httpx.Client(base_url=base, timeout=10) as client:
            me = client.get("/api/auth/me", headers=auth_header(user))
            assert me.status_code == 200, me.text
            assert me.json()["username"] == user.username
            ticket = client.post("/api/realtime/ticket", headers=auth_header(user)).json()["ticket"]
        with connect(f"ws://127.0.0.1:{proxy_port}/ws/?ticket={ticket}") as ws:
            ws.send('{"type": "ping"}')
            deadline = time.monotonic() + 10
            frames = []
            while time.monotonic() < deadline:
                frames.append(ws.recv(timeout=5))
                if '"pong"' in str(frames[-1]):
                    break
            assert '"pong"' in str(frames[-1]), frames
    finally:
        stop(proxy)
        stop(asgi)
