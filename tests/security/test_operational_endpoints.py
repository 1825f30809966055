"""Operational endpoints are not public by default (input-policy.md, "Identity and abuse")."""

import httpx
import pytest
from django.test import override_settings

from tests.factories import StaffFactory, UserFactory, auth_header

SCRAPER_TOKEN = "scrape-" + "x" * 40


@pytest.mark.parametrize(
    "who", ["anonymous", "user", "wrong bearer", "bearer without a configured token"]
)
def test_metrics_refuse_everyone_but_staff_and_the_scraper(http: httpx.Client, who: str) -> None:
    headers = {
        "anonymous": {},
        "user": auth_header(UserFactory.create()),
        "wrong bearer": {"Authorization": "Bearer nope"},
        "bearer without a configured token": {"Authorization": "Bearer anything"},
    }[who]
    with override_settings(METRICS_BEARER_TOKEN=SCRAPER_TOKEN if who == "wrong bearer" else ""):
        response = http.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
    assert "django_http" not in response.text


def test_metrics_serve_staff_and_the_scraper_token(http: httpx.Client) -> None:
    with override_settings(METRICS_BEARER_TOKEN=SCRAPER_TOKEN):
        scraper = http.get("/metrics", headers={"Authorization": f"Bearer {SCRAPER_TOKEN}"})
        staff = http.get("/metrics", headers=auth_header(StaffFactory.create()))
    assert scraper.status_code == staff.status_code == 200
    assert "django_http_requests" in scraper.text


@pytest.mark.parametrize("who", ["anonymous", "user"])
def test_readyz_tells_others_only_the_verdict(http: httpx.Client, who: str) -> None:
    headers = auth_header(UserFactory.create()) if who == "user" else {}
    response = http.get("/readyz", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def test_readyz_detail_for_staff_and_the_scraper(http: httpx.Client) -> None:
    with override_settings(METRICS_BEARER_TOKEN=SCRAPER_TOKEN):
        scraper = http.get("/readyz", headers={"Authorization": f"Bearer {SCRAPER_TOKEN}"})
    staff = http.get("/readyz", headers=auth_header(StaffFactory.create()))
    assert "database" in scraper.json()["checks"]
    assert "database" in staff.json()["checks"]


def test_a_lab_can_open_the_operational_endpoints(http: httpx.Client) -> None:
    with override_settings(OPS_ENDPOINTS_PUBLIC=True):
        assert http.get("/metrics").status_code == 200
        assert "checks" in http.get("/readyz").json()
