"""A chat client of the realtime hub over WebSocket.

    python examples/ws_chat.py --url http://127.0.0.1:8000 --token <API token> --room general "hi"

Trades the API token for a single-use ticket (`POST /api/realtime/ticket`; a browser cannot send
an Authorization header on a WebSocket), connects to `/ws/?ticket=...`, joins the room, sends
the message and prints every frame until the server acknowledges it (`ack` with its `seq`).
Frames are JSON objects with a `type`; errors come as `{"type": "error", "code", "message"}`.
"""

import argparse
import asyncio
import json
import os
import sys
import uuid

import httpx
from websockets.asyncio.client import connect


async def chat(url: str, token: str, room: str, text: str) -> int:
    url = url.rstrip("/")
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.post(
            "/api/realtime/ticket", headers={"Authorization": f"Bearer {token}"}
        )
        if response.status_code not in (200, 201):
            print(f"ticket refused: {response.status_code} {response.text}", file=sys.stderr)
            return 1
        ticket = response.json()["ticket"]
    ws_url = url.replace("http", "ws", 1) + f"/ws/?ticket={ticket}"
    async with connect(ws_url) as ws:
        await ws.send(json.dumps({"type": "join", "room": room, "ref": "join"}))
        client_id = uuid.uuid4().hex  # a retry with the same id gets the same message back
        await ws.send(
            json.dumps(
                {
                    "type": "sendMessage",
                    "room": room,
                    "text": text,
                    "client_id": client_id,
                    "ref": "send",
                }
            )
        )
        async for raw in ws:
            frame = json.loads(raw)
            print(json.dumps(frame, ensure_ascii=False))
            if frame.get("type") == "error":
                return 1
            if frame.get("type") == "ack" and frame.get("ref") == "send":
                return 0
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_url = f"http://127.0.0.1:{os.environ.get('HTTP_PORT', '8000')}"
    parser.add_argument(
        "--url", default=default_url, help=f"the HTTP base address (default {default_url})"
    )
    parser.add_argument("--token", required=True)
    parser.add_argument("--room", default="general")
    parser.add_argument("text")
    args = parser.parse_args()
    try:
        return asyncio.run(chat(args.url, args.token, args.room, args.text))
    except (httpx.HTTPError, OSError) as error:
        print(f"cannot reach {args.url}: {error or type(error).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
