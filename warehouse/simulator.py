"""A seeded producer of spec-exact movement envelopes (pure; used by the produce command, tests
and the benchmark).

Each movement yields a departure from one warehouse and an arrival at another, sharing the
envelope `id` and `movement_id` exactly like the assignment's example pair. An optional initial
phase gives every (warehouse, product) pair stock through arrival-only movements first.
"""

import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from warehouse.schemas import envelope_build

EPOCH = datetime(2025, 2, 18, tzinfo=UTC)
POISON_BODIES = (
    b"not json at all",
    b'{"specversion": "1.0"}',
    b"[1, 2, 3]",
)


@dataclass
class Simulation:
    seed: int = 1
    warehouses: int = 5
    products: int = 20
    movements: int = 100
    initial_stock: int = 0
    """Quantity given to every (warehouse, product) pair before the movements (0: no phase)."""
    duplicate_rate: float = 0.0
    shuffle: bool = False
    poison_rate: float = 0.0
    movement_seed: int | None = None
    """Seeds movements apart from the ids: same warehouses and products, fresh movements."""
    rng: random.Random = field(init=False)
    warehouse_ids: list[uuid.UUID] = field(init=False)
    product_ids: list[uuid.UUID] = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.warehouse_ids = [self._uuid() for _ in range(self.warehouses)]
        self.product_ids = [self._uuid() for _ in range(self.products)]
        if self.movement_seed is not None:
            self.rng = random.Random(f"{self.seed}:{self.movement_seed}")

    def _uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def source(self, warehouse_index: int) -> str:
        return f"WH-{1000 + warehouse_index}"

    def initial_bodies(self) -> list[bytes]:
        """Arrival-only movements stocking every pair (sent before everything else)."""
        if self.initial_stock <= 0:
            return []
        bodies = []
        for w, warehouse_id in enumerate(self.warehouse_ids):
            for product_id in self.product_ids:
                when = EPOCH - timedelta(days=1)
                bodies.append(
                    self._body(
                        envelope_id=self._uuid(),
                        event="arrival",
                        movement_id=self._uuid(),
                        warehouse_index=w,
                        warehouse_id=warehouse_id,
                        product_id=product_id,
                        quantity=self.initial_stock,
                        when=when,
                    )
                )
        return bodies

    def movement_bodies(self) -> list[bytes]:
        """Departure + arrival per movement, then duplicates, shuffle and poison as asked."""
        bodies: list[bytes] = []
        for n in range(self.movements):
            sender = self.rng.randrange(self.warehouses)
            receiver = (sender + 1 + self.rng.randrange(max(1, self.warehouses - 1))) % max(
                1, self.warehouses
            )
            product_id = self.rng.choice(self.product_ids)
            quantity = self.rng.randint(1, 100)
            departed = EPOCH + timedelta(seconds=n * 7)
            arrived = departed + timedelta(seconds=self.rng.randint(60, 20_000))
            envelope_id, movement_id = self._uuid(), self._uuid()
            for event, index, when in (
                ("departure", sender, departed),
                ("arrival", receiver, arrived),
            ):
                bodies.append(
                    self._body(
                        envelope_id=envelope_id,
                        event=event,
                        movement_id=movement_id,
                        warehouse_index=index,
                        warehouse_id=self.warehouse_ids[index],
                        product_id=product_id,
                        quantity=quantity,
                        when=when,
                    )
                )
        if self.duplicate_rate > 0:
            bodies += [body for body in bodies if self.rng.random() < self.duplicate_rate]
        if self.poison_rate > 0:
            poison = [
                self.rng.choice(POISON_BODIES)
                for _ in bodies
                if self.rng.random() < self.poison_rate
            ]
            bodies += poison
        if self.shuffle:
            self.rng.shuffle(bodies)
        return bodies

    def _body(
        self,
        *,
        envelope_id: uuid.UUID,
        event: str,
        movement_id: uuid.UUID,
        warehouse_index: int,
        warehouse_id: uuid.UUID,
        product_id: uuid.UUID,
        quantity: int,
        when: datetime,
    ) -> bytes:
        envelope = envelope_build(
            envelope_id=envelope_id,
            source=self.source(warehouse_index),
            event=event,
            movement_id=movement_id,
            warehouse_id=warehouse_id,
            product_id=product_id,
            quantity=quantity,
            timestamp=when,
            sent_millis=int(when.timestamp() * 1000) + 250,
        )
        return json.dumps(envelope, separators=(",", ":")).encode()
