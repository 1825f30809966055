"""ASGI entry point: Django for HTTP, the realtime hub for WebSocket. (VM agents' TCP has its own
server and router: vmcontrol/server.py, vmcontrol.consumers.application.)"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from common.heartbeat import process_heartbeat_start  # noqa: E402
from common.static import asgi_with_static  # noqa: E402
from realtime.routing import websocket_application  # noqa: E402

# Static files on the HTTP side only: wrapping the router would keep one more frame per socket.
application = ProtocolTypeRouter(
    {"http": asgi_with_static(django_asgi_app), "websocket": websocket_application}
)
# The console's platform panel: this process's heartbeat (a no-op under runall, which names it).
process_heartbeat_start("asgi")
