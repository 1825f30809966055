"""Operators finish and cancel events from the admin; the actions call the services."""

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from betting.models import AuditEntry, Bet, Event, EventState
from tests.betting.factories import bet_place, event_create
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def operator() -> Client:
    admin = User.objects.create_superuser("operator", "op@example.com", "pw-operator-1")
    client = Client()
    client.force_login(admin)
    return client


@pytest.mark.parametrize(
    ("action", "state", "status"),
    [
        ("finish_win", EventState.FINISHED_WIN, "won"),
        ("finish_lose", EventState.FINISHED_LOSE, "lost"),
        ("cancel", EventState.CANCELLED, "void"),
    ],
)
def test_admin_action_finishes_or_cancels_and_settles(
    operator: Client, action: str, state: str, status: str
) -> None:
    event = event_create()
    bet_place(user=UserFactory.create(), event=event)
    response = operator.post(
        reverse("admin:betting_event_changelist"),
        {"action": action, "_selected_action": [event.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert Event.objects.get(pk=event.pk).state == state
    assert list(Bet.objects.values_list("status", flat=True)) == [status]
    assert AuditEntry.objects.filter(subject_id=event.pk, via="admin").exists()


def test_admin_action_on_a_final_event_reports_the_error(operator: Client) -> None:
    event = event_create()
    operator.post(
        reverse("admin:betting_event_changelist"),
        {"action": "cancel", "_selected_action": [event.pk]},
    )
    response = operator.post(
        reverse("admin:betting_event_changelist"),
        {"action": "finish_win", "_selected_action": [event.pk]},
        follow=True,
    )
    assert "already cancelled" in response.content.decode()
    assert Event.objects.get(pk=event.pk).state == EventState.CANCELLED


@pytest.mark.parametrize("model", ["event", "bet", "eventchange", "auditentry"])
def test_admin_pages_render(operator: Client, model: str) -> None:
    event = event_create()
    bet_place(user=UserFactory.create(), event=event)
    assert operator.get(reverse(f"admin:betting_{model}_changelist")).status_code == 200
