"""WSGI entry point: plain HTTP on a threaded server (granian or gunicorn gthread; see
docs/benchmarks.md for the measurement that chose it). WebSocket and the bot webhook stay on the
ASGI server (config/asgi.py); the reverse proxy routes them (docker/nginx.conf)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_wsgi_app = get_wsgi_application()

from common.heartbeat import process_heartbeat_start  # noqa: E402
from common.static import wsgi_with_static  # noqa: E402

application = wsgi_with_static(django_wsgi_app)
process_heartbeat_start("web")
