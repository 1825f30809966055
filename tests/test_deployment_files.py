"""The operator-facing files agree with the code: every env var is documented, every Procfile
process has a compose service."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV_READ = re.compile(r"""env(?:\.\w+)?\(\s*["']([A-Z][A-Z0-9_]+)["']""")


def _variables_read_by_settings() -> set[str]:
    return set(ENV_READ.findall((ROOT / "config" / "settings.py").read_text()))


def _documented_variables() -> set[str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if re.match(r"^[A-Z][A-Z0-9_]*=", line)}


def test_env_example_documents_every_variable_settings_reads() -> None:
    missing = _variables_read_by_settings() - _documented_variables()
    assert missing == set()


def test_every_procfile_process_has_a_compose_service() -> None:
    processes = {
        line.split(":", 1)[0]
        for line in (ROOT / "Procfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert processes - set(compose["services"]) == set()
    for name in processes:
        assert compose["services"][name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_needs_no_env_file_and_ships_no_fixed_password() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "env_file" not in text
    for service in _compose()["services"].values():
        environment = service.get("environment") or {}
        for name, value in environment.items():
            if any(word in name for word in ("PASSWORD", "SECRET", "TOKEN")):
                assert str(value).startswith("${") or name.endswith("_FILE"), name
        for url in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"):
            assert "@" not in str(environment.get(url, "")), url


def test_compose_publishes_ports_on_loopback_by_default() -> None:
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("${PUBLISH_HOST:-127.0.0.1}:"), (name, port)


def test_compose_has_one_public_http_port_in_front_of_the_wsgi_and_asgi_servers() -> None:
    services = _compose()["services"]
    http_ports = [
        (name, port)
        for name, service in services.items()
        for port in service.get("ports", [])
        if port.endswith(":8000") or port.endswith(":8001")
    ]
    assert http_ports == [("proxy", "${PUBLISH_HOST:-127.0.0.1}:${HTTP_PORT:-8000}:8000")]
    assert "granian --interface wsgi config.wsgi:application" in " ".join(
        services["web"]["command"]
    )
    assert services["asgi"]["command"][:2] == ["uvicorn", "config.asgi:application"]
    procfile_asgi = next(
        line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("asgi:")
    )
    for command in (" ".join(services["asgi"]["command"]), procfile_asgi):
        # The WebSocket server options the tests and `runall` use (settings).
        assert "--ws websockets-sansio --ws-per-message-deflate false" in command
        assert "--ws-max-size 1048576" in command
    for name in ("web", "asgi"):  # behind exactly one proxy, which sets X-Forwarded-For
        assert services[name]["environment"]["TRUSTED_PROXY_HOPS"] == "1"
    conf = (ROOT / "docker" / "nginx.conf").read_text()
    assert re.search(r"location /ws/ \{\s+proxy_pass http://quintet_asgi;", conf)
    assert re.search(r"location /docbot/ \{\s+proxy_pass http://quintet_asgi;", conf)
    assert re.search(r"location / \{\s+proxy_pass http://quintet_wsgi;", conf)
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in conf


def test_compose_validates_without_an_env_file(tmp_path: Path) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose (Debian package) is required to validate the compose file")
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO", "DATABASE"))}
    result = subprocess.run(
        [
            binary,
            "-f",
            str(ROOT / "docker-compose.yml"),
            "--project-directory",
            str(tmp_path),
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        env=clean_env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_secrets_are_generated_once_and_the_environment_wins(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    run = [sys.executable, str(ROOT / "docker" / "generate_secrets.py"), str(folder)]
    env = {
        k: v for k, v in os.environ.items() if k not in {"DJANGO_SECRET_KEY", "POSTGRES_PASSWORD"}
    }
    subprocess.run(run, check=True, env=env, capture_output=True)
    first = {path.name: path.read_text() for path in folder.iterdir()}
    assert len(first) == 8 and all(len(value) >= 40 for value in first.values())
    subprocess.run(run, check=True, env=env, capture_output=True)
    assert {path.name: path.read_text() for path in folder.iterdir()} == first
    subprocess.run(run, check=True, env={**env, "POSTGRES_PASSWORD": "chosen"}, capture_output=True)
    assert (folder / "postgres_password").read_text() == "chosen"
    assert (folder / "redis_password").read_text() == first["redis_password"]


def test_the_entrypoint_builds_service_urls_from_the_secrets(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    subprocess.run(
        [sys.executable, str(ROOT / "docker" / "generate_secrets.py"), str(folder)],
        check=True,
        capture_output=True,
    )
    env = {"PATH": os.environ["PATH"], "QUINTET_SECRETS_DIR": str(folder), "REDIS_URL": ""}
    printed = subprocess.run(
        ["sh", str(ROOT / "docker" / "entrypoint.sh"), "env"],
        check=True,
        capture_output=True,
        text=True,
        env={**env, "CELERY_BROKER_URL": "amqp://given@broker//"},
    ).stdout
    values = dict(line.split("=", 1) for line in printed.splitlines() if "=" in line)
    password = (folder / "postgres_password").read_text()
    assert values["DATABASE_URL"] == f"postgres://quintet:{password}@postgres:5432/quintet"
    assert values["REDIS_URL"].startswith("redis://:") and values["REDIS_URL"].endswith(
        "@redis:6379/0"
    )
    assert values["CELERY_BROKER_URL"] == "amqp://given@broker//"
    assert values["DJANGO_SECRET_KEY"] == (folder / "django_secret_key").read_text()


def test_every_app_service_gets_the_shared_environment() -> None:
    rendered = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("web", "asgi", "worker", "warehouse", "vmcontrol", "beat", "docbot", "betting"):
        environment = rendered["services"][name]["environment"]
        assert {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SECRET_KEY"} <= set(
            environment
        ), name


_SETTINGS_DUMP = """
import json, os, sys
import django
django.setup()
from django.conf import settings
json.dump({k: repr(getattr(settings, k)) for k in dir(settings)
           if k.isupper() and k not in {"ENV_FILE", "AXES_USERNAME_FORM_FIELD"}}, sys.stdout)
"""


def _settings_with_env_file(env_file: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    environment = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/"),
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "QUINTET_ENV_FILE": str(env_file),
        **extra,
    }
    return subprocess.run(
        [sys.executable, "-c", _SETTINGS_DUMP],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_copying_env_example_to_env_gives_exactly_the_embedded_defaults(tmp_path: Path) -> None:
    """`cp .env.example .env`, as the file says: inline comments, aligned spacing and empty
    values must not leak into the settings (DEBUG silently off, the secret-key guard bypassed)."""
    bare = _settings_with_env_file(tmp_path / "absent.env")
    copied = _settings_with_env_file(ROOT / ".env.example")
    assert bare.returncode == 0, bare.stderr
    assert copied.returncode == 0, copied.stderr
    assert copied.stdout == bare.stdout


@pytest.mark.parametrize(
    "text",
    [
        "DJANGO_DEBUG=false   # production\nDJANGO_SECRET_KEY=   # required\n",
        "export DJANGO_DEBUG='false'\nDJANGO_SECRET_KEY=\"\"\n",
        'DJANGO_DEBUG="false"  # quoted, commented\n',
    ],
    ids=["inline-comments", "export-and-quotes", "quoted-with-comment"],
)
def test_env_file_syntax_is_parsed_before_the_secret_key_guard(tmp_path: Path, text: str) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(text)
    result = _settings_with_env_file(env_file)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is false" in result.stderr


def test_the_process_environment_wins_over_the_env_file_and_empty_means_default(
    tmp_path: Path,
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("HTTP_PORT=8123  # from the file\nGRPC_PORT=50999\n")
    result = _settings_with_env_file(env_file, HTTP_PORT="8200", GRPC_PORT="")
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["HTTP_PORT"] == "8200"
    assert values["GRPC_PORT"] == "50999"
    defaults = json.loads(_settings_with_env_file(tmp_path / "absent", VMCONTROL_PORT="").stdout)
    assert defaults["VMCONTROL_PORT"] == "9100"


def test_make_run_installs_the_runtime_dependencies_only() -> None:
    uv = shutil.which("uv") or str(ROOT / ".bootstrap" / "bin" / "uv")
    exported = subprocess.run(
        [uv, "export", "--frozen", "--no-default-groups", "--no-hashes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    runtime = {line.split("==", 1)[0].lower() for line in exported.splitlines() if "==" in line}
    tools = {"pytest", "ruff", "mypy", "matplotlib", "grpcio-tools", "honcho", "vulture"}
    assert runtime & tools == set()
    assert {"django", "channels", "celery", "uvicorn"} <= runtime
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-default-groups" in makefile
    assert re.search(r"^run: migrate$", makefile, re.M)
    assert re.search(r"^install: \$\(VENV\)/\.runtime$", makefile, re.M)


def test_compose_publishes_the_broker_ui_and_an_authenticated_flower() -> None:
    services = _compose()["services"]
    assert any(port.endswith(":15672") for port in services["rabbitmq"]["ports"])
    flower = services["flower"]
    assert any(port.endswith(":5555") for port in flower["ports"])
    command = " ".join(flower["command"])
    assert "FLOWER_BASIC_AUTH" in command
    assert "flower_password" in command
    names = (ROOT / "docker" / "generate_secrets.py").read_text()
    assert '"flower_password"' in names
