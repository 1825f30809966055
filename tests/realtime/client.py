"""A small messenger client over a real WebSocket for the tests."""

import asyncio
import json
from typing import Any

from asgiref.sync import sync_to_async
from websockets.asyncio.client import ClientConnection, connect

from realtime import services


class Client:
    """Keeps every frame received; `expect(type)` waits for the next frame of a type."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._cursor: dict[str, int] = {}

    @classmethod
    async def open(cls, ws_url: str, user: Any) -> "Client":
        ticket, _ = await sync_to_async(services.ticket_issue)(user=user)
        return cls(await connect(f"{ws_url}/ws/?ticket={ticket}", open_timeout=10))

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, wait: float = 5) -> dict[str, Any]:
        frame = json.loads(await asyncio.wait_for(self.ws.recv(), wait))
        self.frames.append(frame)
        return frame

    async def expect(self, kind: str, wait: float = 5, **match: Any) -> dict[str, Any]:
        """The next frame of `kind` (and matching `match`) not returned before."""
        start = self._cursor.get(kind, 0)
        deadline = asyncio.get_running_loop().time() + wait
        index = start
        while True:
            while index < len(self.frames):
                frame = self.frames[index]
                index += 1
                if frame.get("type") == kind and all(frame.get(k) == v for k, v in match.items()):
                    self._cursor[kind] = index
                    return frame
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"no {kind} frame; got {self.frames[start:]}")
            await self.recv(remaining)

    async def request(self, frame: dict[str, Any], kind: str, wait: float = 5) -> dict[str, Any]:
        """Send a frame with a fresh ref and wait for the reply (`kind`) or an error with it."""
        ref = f"r{len(self.frames)}-{id(frame)}"
        await self.send({**frame, "ref": ref})
        deadline = asyncio.get_running_loop().time() + wait
        seen = len(self.frames)
        while True:
            for frame_in in self.frames[seen:]:
                if frame_in.get("ref") == ref and frame_in.get("type") in (kind, "error"):
                    return frame_in
            seen = len(self.frames)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"no reply to {frame}")
            await self.recv(remaining)

    async def fence(self) -> None:
        """Wait until everything sent before now has been answered (ordering is per socket)."""
        await self.request({"type": "ping"}, "pong")

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]

    async def close(self) -> None:
        await self.ws.close()
