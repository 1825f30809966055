from typing import Any

from realtime.auth import websocket_auth_stack
from realtime.consumers import HubConsumer

WEBSOCKET_PATH = "/ws/"


async def _hub_route(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """`/ws/` to a fresh `HubConsumer`; any other path is refused before accept (HTTP 403).
    Calls the consumer directly: URLRouter and `as_asgi` would each copy the scope or keep one
    more frame suspended for the socket's life."""
    where = scope["path"]
    root = scope.get("root_path", "")
    if root and where.startswith(root):
        where = where[len(root) :]
    if where != WEBSOCKET_PATH:
        await send({"type": "websocket.close"})
        return
    await HubConsumer()(scope, receive, send)


#: The whole `websocket` side of the ASGI application: admission (Origin, ticket or session),
#: then the hub consumer.
websocket_application = websocket_auth_stack(_hub_route)
