"""Test settings: the same module, faster hashing, no throttling surprises, quiet logs.

Real services are used exactly when their URLs are in the environment (see tests/conftest.py).
"""

from pathlib import Path

from config.settings import *  # noqa: F403
from config.settings import BASE_DIR, DATABASES, REST_FRAMEWORK

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
if not DATABASES["default"]["ENGINE"].endswith("postgresql"):
    # A file, not :memory:, so live servers in other threads and processes see the same data.
    # Named after the main database file so parallel checkouts/runs do not share one test DB.
    _stem = Path(str(DATABASES["default"]["NAME"])).stem
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / "var" / f"test-{_stem}.sqlite3")}
REST_FRAMEWORK = {
    **REST_FRAMEWORK,
    "DEFAULT_THROTTLE_RATES": {
        **REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"],
        "register": "1000/min",
        "login": "1000/min",
    },
}
MEDIA_ROOT = BASE_DIR / "var" / "test-media"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Live-server threads must not keep connections open, or the test database cannot be dropped;
# a pool would keep them open, so tests use plain per-thread connections.
DATABASES["default"]["CONN_MAX_AGE"] = 0
DATABASES["default"].get("OPTIONS", {}).pop("pool", None)
