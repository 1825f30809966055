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


def _api_views() -> list[type]:
    from django.urls import URLPattern, URLResolver, get_resolver

    views: list[type] = []
    pending: list[object] = list(get_resolver().url_patterns)
    while pending:
        entry = pending.pop()
        if isinstance(entry, URLResolver):
            pending.extend(entry.url_patterns)
        elif isinstance(entry, URLPattern):
            view_class = getattr(entry.callback, "cls", None) or getattr(
                entry.callback, "view_class", None
            )
            if view_class is not None:
                views.append(view_class)
    return views


def _lenient_fields(serializer: object, path: str) -> list[str]:
    from rest_framework import serializers

    from common.fields import LENIENT_DRF_FIELDS

    found = []
    for name, field in serializer.fields.items():  # type: ignore[attr-defined]
        if field.read_only:
            continue
        child = getattr(field, "child", None)
        if isinstance(field, serializers.BaseSerializer):
            found += _lenient_fields(child if child is not None else field, f"{path}.{name}")
        elif type(field) in LENIENT_DRF_FIELDS or type(child) in LENIENT_DRF_FIELDS:
            found.append(f"{path}.{name}: {type(field).__name__}")
    return found


def test_rest_input_serializers_use_the_shared_parsers() -> None:
    """input-policy.md: a value from outside is parsed once, by the shared parsers. DRF's own
    Char/Integer/Decimal/DateTime fields accept what the policy refuses (Arabic-Indic digits,
    `1_0`, naive datetimes, controls), so no input serializer may use them directly."""
    from rest_framework import serializers

    lenient: list[str] = []
    for view in _api_views():
        for attribute in dir(view):
            candidate = getattr(view, attribute, None)
            if (
                isinstance(candidate, type)
                and issubclass(candidate, serializers.BaseSerializer)
                and "Output" not in attribute
            ):
                lenient += _lenient_fields(candidate(), f"{view.__qualname__}.{attribute}")
    assert sorted(set(lenient)) == []


_WRITE_HOOKS = {
    "add": ("save_model",),
    "change": ("save_model",),
    "delete": ("delete_model", "delete_queryset"),
}


def test_every_admin_write_goes_through_a_service_or_is_refused() -> None:
    """An admin may add/change/delete a row only where its ModelAdmin overrides the matching
    write hooks (which call the app's service); everything else is read-only. Inlines too."""
    from django.contrib import admin
    from django.contrib.auth.models import User
    from django.test import RequestFactory

    request = RequestFactory().get("/admin/")
    request.user = User(username="root", is_staff=True, is_superuser=True)
    apps = {"vmcontrol", "realtime", "warehouse", "docbot", "betting"}
    problems = []
    for model, model_admin in admin.site._registry.items():
        if model._meta.app_label not in apps:
            continue
        checks = {
            "add": model_admin.has_add_permission(request),
            "change": model_admin.has_change_permission(request),
            "delete": model_admin.has_delete_permission(request),
        }
        for kind, allowed in checks.items():
            overridden = any(
                getattr(type(model_admin), hook) is not getattr(admin.ModelAdmin, hook)
                for hook in _WRITE_HOOKS[kind]
            )
            if allowed and not overridden:
                problems.append(f"{model.__name__} admin: {kind} writes without a service")
        for inline in model_admin.get_inline_instances(request):
            writable = (
                inline.has_add_permission(request, None)
                or inline.has_change_permission(request, None)
                or inline.has_delete_permission(request, None)
            )
            routed = type(model_admin).save_related is not admin.ModelAdmin.save_related
            if writable and not routed:
                problems.append(f"{model.__name__} admin: inline {inline.model.__name__} writes")
    assert problems == [], "\n".join(problems)
