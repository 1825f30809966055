"""The operator-facing files agree with the code: every env var is documented, every Procfile
process has a compose service."""

import re
from pathlib import Path

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
