"""The recent message frames of each room, kept encoded so that a reconnect storm's `sync` is
served from this process's memory instead of the database."""

from collections import OrderedDict

from django.conf import settings


class RecentFrames(OrderedDict[int, dict[int, str]]):
    """Room id -> {seq: encoded `message` frame}: at most REALTIME_RECENT_PER_ROOM frames per
    room (oldest inserted dropped first) for the REALTIME_RECENT_ROOMS rooms most recently
    written (least recent dropped first). Loop-bound: used from the hub's loop only."""

    def remember(self, room_id: int, seq: int, frame: str) -> None:
        """Keep the encoded frame of message `seq`, dropping the oldest beyond the limits."""
        frames = self.get(room_id)
        if frames is None:
            frames = self[room_id] = {}
            if len(self) > settings.REALTIME_RECENT_ROOMS:
                self.popitem(last=False)
        else:
            self.move_to_end(room_id)
        frames[seq] = frame
        if len(frames) > settings.REALTIME_RECENT_PER_ROOM:
            # Oldest inserted first; a rare out-of-order arrival only sends a sync to the DB.
            del frames[next(iter(frames))]

    def evict(self, room_id: int, seq: int) -> None:
        """Forget one frame (a message deleted by moderation)."""
        self.get(room_id, {}).pop(seq, None)

    def range(self, room_id: int, first: int, last: int) -> list[str] | None:
        """The encoded frames `first..last` if every one of them is held (this process may
        have missed some, e.g. while its Redis subscription was down); else None."""
        frames = self.get(room_id)
        if last < first:
            return []
        if frames is None:
            return None
        out = []
        for seq in range(first, last + 1):
            frame = frames.get(seq)
            if frame is None:
                return None
            out.append(frame)
        return out
