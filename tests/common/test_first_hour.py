"""What a newcomer meets first, over a real socket: the landing page, static files served under
ASGI without warnings, and one log record per request."""

import logging
import warnings
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.factories import UserFactory, auth_header


def test_the_landing_page_lists_every_interface_with_its_address(http: httpx.Client) -> None:
    response = http.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for href in ["/admin/", "/api/docs/", "/api/schema/", "/health", "/readyz", "/metrics"]:
        assert f'href="{href}"' in page
    assert "/ws/" in page
    assert "tcp://" in page  # the VM agents' server line
    assert "betting.v1.LineProvider" in page


def test_the_admin_view_site_link_lands_on_the_landing_page(http: httpx.Client) -> None:
    assert http.get("/").status_code == 200
    assert http.get("/admin/login/").status_code == 200


def test_static_files_are_served_under_asgi_without_a_sync_iterator_warning(
    http: httpx.Client,
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = http.get("/static/admin/css/base.css")
        again = http.get("/static/admin/css/base.css")
    assert first.status_code == again.status_code == 200
    assert "body" in first.text
    assert [str(w.message) for w in caught if "StreamingHttpResponse" in str(w.message)] == []


@pytest.mark.parametrize(("path", "status"), [("/no-such-page", 404), ("/api/betting/events", 401)])
def test_a_client_error_is_logged_once(
    http: httpx.Client, caplog: pytest.LogCaptureFixture, path: str, status: int
) -> None:
    with caplog.at_level(logging.INFO):
        assert http.get(path).status_code == status
    about_it = [r for r in caplog.records if path in r.getMessage() or path in str(r.msg)]
    assert len(about_it) == 1, [(r.name, r.getMessage()) for r in about_it]


def test_the_websocket_ticket_never_reaches_a_log_line(
    asgi_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    user = UserFactory()
    http = httpx.Client(base_url=asgi_server.http_url, headers=auth_header(user))
    ticket = http.post("/api/realtime/ticket").json()["ticket"]
    with caplog.at_level(logging.INFO), connect(f"{asgi_server.ws_url}/ws/?ticket={ticket}") as ws:
        ws.send('{"type": "ping"}')
        ws.recv(timeout=5)
    lines = [record.getMessage() for record in caplog.records]
    assert any("/ws/?ticket=[redacted]" in line for line in lines), lines
    assert not any(ticket in line for line in lines)
