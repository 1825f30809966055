"""Admin building blocks shared by the apps (imports no app).

Every admin write goes through the owning app's service, so the admin can break no invariant
the other doors keep: an admin either cannot write a table at all (`ReadOnlyAdmin`: append-only
ledgers and audit trails, rows derived from them, rows owned by a live process) or routes its
writes through services by overriding the write hooks (`save_model`, `delete_model`,
`delete_queryset`, `save_related`). `tests/test_architecture.py` checks every registered admin.
"""

from typing import Any

from django.contrib import admin
from django.http import HttpRequest


class ReadOnlyAdmin(admin.ModelAdmin):
    """View-only: no add, change or delete (actions that call services still work)."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyInline(admin.TabularInline):
    """An inline that shows rows only."""

    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
