"""The console's doors over HTTP: the page, the snapshot API and the actions API; staff only,
CSRF-checked for sessions, errors in the one JSON envelope."""

import json
import re
from typing import Any

import pytest
from django.test import Client
from structlog.testing import capture_logs

from common.console import console_panels
from common.console_publisher import console_tick
from tests.console.conftest import Dial, RecordingHub
from tests.factories import StaffFactory, UserFactory, auth_header

pytestmark = pytest.mark.django_db

ACTIONS = "/api/console/actions"
SNAPSHOT = "/api/console/snapshot"


def _csrf_client(user: Any) -> tuple[Client, str]:
    """A browser-like session client that must send the CSRF token, and the token (from the
    console page's cookie, as the page's script reads it)."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    page = client.get("/console/")
    assert page.status_code == 200
    return client, page.cookies["csrftoken"].value


def _post(client: Client, body: Any, token: str | None = None) -> Any:
    headers = {"X-CSRFToken": token} if token else {}
    return client.post(ACTIONS, body, content_type="application/json", headers=headers)


def test_the_page_sends_anonymous_visitors_to_the_admin_login(client: Client) -> None:
    response = client.get("/console/")
    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/console/"


def test_the_page_sends_a_non_staff_user_to_the_admin_login(client: Client) -> None:
    client.force_login(UserFactory.create())
    response = client.get("/console/")
    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/console/"


def test_the_page_has_a_card_per_panel_and_loads_nothing_from_other_sites(client: Client) -> None:
    client.force_login(StaffFactory.create())
    html = client.get("/console/").content.decode()
    cards = re.findall(r'<section class="panel" id="panel-([a-z0-9_.-]+)"', html)
    assert cards == [panel.name for panel in console_panels()]
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "/static/console/vendor/uplot/uPlot-1.6.32.iife.min.js" in sources
    assert not [s for s in sources if s.startswith(("http:", "https:", "//"))]
    found = re.search(r'id="console-config"[^>]*>(.*?)</script>', html, re.S)
    assert found is not None
    config = json.loads(found[1])
    assert config["ws"]["hello"] == [{"type": "leave", "room": "general"}]
    assert config["ws"]["subscribe"] == [
        {"type": "subscribe", "topic": panel.topic} for panel in console_panels()
    ]


def test_the_admin_index_links_to_the_console(client: Client) -> None:
    client.force_login(StaffFactory.create(is_superuser=True))
    assert 'href="/console/"' in client.get("/admin/").content.decode()


def test_the_snapshot_refuses_anonymous_callers_with_401(client: Client) -> None:
    response = client.get(SNAPSHOT)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


def test_the_snapshot_refuses_a_non_staff_user_with_403(client: Client) -> None:
    response = client.get(SNAPSHOT, headers=auth_header(UserFactory.create()))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


def test_the_snapshot_serves_staff_by_token_and_by_session(
    client: Client, recording_hub: RecordingHub
) -> None:
    console_tick()
    staff = StaffFactory.create()
    by_token = client.get(SNAPSHOT, headers=auth_header(staff)).json()
    client.force_login(staff)
    by_session = client.get(SNAPSHOT).json()
    assert by_token["panels"] == by_session["panels"]
    platform = by_token["panels"][0]
    assert platform["name"] == "platform" and platform["topic"] == "console.platform"
    assert platform["status"] == "ok"
    assert set(platform["sample"]) == {"counters", "numbers", "attention", "tables"}
    assert by_token["ws"]["path"] == "/ws/"


def test_an_action_is_refused_to_anonymous_callers_with_401(client: Client, dial: Dial) -> None:
    response = _post(client, {"panel": "dial", "action": "turn", "params": {"by": 1}})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
    assert dial.position == 0


def test_an_action_is_refused_to_a_non_staff_user_with_403(dial: Dial) -> None:
    client, token = _csrf_client(StaffFactory.create())
    client.force_login(UserFactory.create())
    response = _post(client, {"panel": "dial", "action": "turn", "params": {"by": 1}}, token)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
    assert dial.position == 0


def test_an_action_without_the_csrf_token_is_refused(dial: Dial) -> None:
    client, _ = _csrf_client(StaffFactory.create())
    response = _post(client, {"panel": "dial", "action": "turn", "params": {"by": 1}})
    assert response.status_code == 403
    assert "CSRF" in response.json()["error"]["message"]
    assert dial.position == 0


def test_an_action_runs_answers_its_line_publishes_the_panel_and_is_logged(
    dial: Dial, recording_hub: RecordingHub
) -> None:
    staff = StaffFactory.create()
    client, token = _csrf_client(staff)
    with capture_logs() as logs:
        response = _post(client, {"panel": "dial", "action": "turn", "params": {"by": 2}}, token)
    assert response.status_code == 200
    assert response.json() == {"detail": "Turned the dial to 2."}
    published = recording_hub.last("console.dial")
    assert published["sample"]["numbers"] == [{"key": "position", "label": "position", "value": 2}]
    assert published["rates"] == {}  # rates advance on ticks only
    entry = next(log for log in logs if log["event"] == "console_action")
    assert entry["user"] == staff.username and entry["action"] == "turn"
    assert entry["panel"] == "dial" and entry["detail"] == "Turned the dial to 2."
    snapshot = {p["name"]: p for p in client.get(SNAPSHOT).json()["panels"]}
    assert snapshot["dial"]["sample"] == published["sample"]


def test_an_action_works_with_a_staff_token_without_csrf(client: Client, dial: Dial) -> None:
    response = client.post(
        ACTIONS,
        {"panel": "dial", "action": "turn", "params": {"by": 1}},
        content_type="application/json",
        headers=auth_header(StaffFactory.create()),
    )
    assert response.status_code == 200
    assert dial.position == 1


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"panel": "dial", "action": "turn", "params": {"by": "lots"}}, 400, "invalid", "by"),
        ({"panel": "dial", "action": "turn", "params": {"by": 0}}, 400, "invalid", "by"),
        ({"panel": "dial", "action": "turn", "params": [1]}, 400, "invalid", "params"),
        ({"panel": "dial", "action": "turn\u0000", "params": {}}, 400, "invalid", "action"),
        ({"action": "turn"}, 400, "invalid", "panel"),
        ({"panel": "nope", "action": "turn"}, 404, "unknown_panel", None),
        ({"panel": "dial", "action": "spin"}, 404, "unknown_action", None),
        ({"panel": "dial", "action": "turn", "params": {"by": 9}}, 400, "dial_stop", None),
    ],
)
def test_a_bad_action_request_is_answered_in_the_error_envelope(
    dial: Dial, body: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    client, token = _csrf_client(StaffFactory.create())
    response = _post(client, body, token)
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code
    if field is not None:
        assert field in error["details"]
    assert dial.position == 0
