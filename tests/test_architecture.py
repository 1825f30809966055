"""App boundaries: no cross-app relations, imports only through services/selectors."""

import shutil
import subprocess
from pathlib import Path

from django.apps import apps

PROJECT_APPS = {"common", "realtime", "vmcontrol", "warehouse", "docbot", "betting"}
SHARED_APPS = {"auth", "contenttypes"}
ROOT = Path(__file__).resolve().parent.parent


def test_models_relate_only_within_their_app_or_to_users() -> None:
    crossing = []
    for model in apps.get_models():
        app = model._meta.app_label
        if app not in PROJECT_APPS:
            continue
        for field in model._meta.get_fields():
            related = getattr(field, "related_model", None)
            if related is None or not field.is_relation:
                continue
            target = related._meta.app_label
            if target != app and target not in SHARED_APPS:
                crossing.append(f"{model.__name__}.{field.name} -> {target}.{related.__name__}")
    assert crossing == []


def test_import_contracts_hold() -> None:
    lint_imports = shutil.which("lint-imports") or str(ROOT / ".venv" / "bin" / "lint-imports")
    result = subprocess.run(
        [lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
