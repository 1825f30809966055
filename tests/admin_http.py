"""An operator's browser session against a live server: log into /admin/ over HTTP with the
CSRF cookie and token, then GET pages and POST forms as the admin's own pages do."""

import re
from collections.abc import Mapping

import httpx

from tests.factories import TEST_PASSWORD

_CSRF_INPUT = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


class AdminSession:
    def __init__(self, base_url: str, username: str, password: str = TEST_PASSWORD) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=15, follow_redirects=False)
        page = self.http.get("/admin/login/")
        response = self.http.post(
            "/admin/login/?next=/admin/",
            data={
                "username": username,
                "password": password,
                "csrfmiddlewaretoken": self._token(page.text),
                "next": "/admin/",
            },
            headers={"Referer": f"{base_url}/admin/login/"},
        )
        assert response.status_code == 302, response.text[:500]

    @staticmethod
    def _token(html: str) -> str:
        found = _CSRF_INPUT.search(html)
        assert found, "no CSRF token on the page"
        return found.group(1)

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def post_form(
        self, path: str, data: Mapping[str, object], *, page: str | None = None
    ) -> httpx.Response:
        """POST as the form on `page` (default: `path` itself) would, with its CSRF token."""
        html = self.http.get(page or path).text
        token = (
            self._token(html) if "csrfmiddlewaretoken" in html else self.http.cookies["csrftoken"]
        )
        return self.http.post(
            path,
            data={**data, "csrfmiddlewaretoken": token},
            headers={"Referer": str(self.http.base_url) + (page or path)},
        )

    def messages(self, response: httpx.Response) -> list[str]:
        """The admin's message list on the page a redirect leads to."""
        target = response.headers.get("location") if response.status_code == 302 else None
        html = self.http.get(target).text if target else response.text
        return [
            re.sub(r"<[^>]+>", "", m).strip()
            for m in re.findall(r"<li class=\"[a-z]+\">(.*?)</li>", html, re.S)
        ]
