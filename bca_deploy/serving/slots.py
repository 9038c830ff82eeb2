"""Slot storage of an adapter bank: registering writes one slot, never the whole bank, and snapshots stay exact.

A bank input is an array with a **slot axis** (kernels: (S, 1, R, q, o), slot axis 0; head layers:
(S, in, out), slot axis 0); slot 0 is the base model and is never written. :class:`SlotBank` keeps
one array per input with room for ``capacity`` slots and hands out slots under one rule:

    a slot is written only while no live snapshot can read it.

A snapshot reads exactly the slots its adapter names map to (``Gather`` by ``adapter_ids``), so

- a slot never used since these arrays were allocated can be written at once;
- a slot freed by ``unregister`` at version ``v`` (the first snapshot that no longer maps it) can be
  written once every live snapshot has a version ``>= v``;
- if no slot qualifies, the arrays are **reallocated** (copied into new arrays, with twice the room when
  more than half is in use): snapshots taken before keep the old arrays, so they are never written
  either.

Registering is then one slot write (amortized: a reallocation copies ``capacity`` slots after at least
``capacity / 2`` registrations), unregistering writes nothing, and a batch that holds a snapshot gets
bit-identical answers whatever is registered or unregistered meanwhile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["SlotSpec", "SlotBank", "BASE_SLOT", "MIN_CAPACITY"]

#: Slot 0: the base model (zeros for kernels); never handed out.
BASE_SLOT = 0
#: Slots of a fresh bank (base slot included): room for 8 adapters.
MIN_CAPACITY = 9


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """One bank input: where its slot axis is, the shape of one slot, and what an unwritten slot holds."""

    slot_axis: int
    slot_shape: tuple[int, ...]
    fill: float = 0.0

    def shape(self, slots: int) -> tuple[int, ...]:
        return self.slot_shape[:self.slot_axis] + (slots,) + self.slot_shape[self.slot_axis:]

    @property
    def slot_nbytes(self) -> int:
        return int(np.prod(self.slot_shape, dtype=np.int64)) * 4


class SlotBank:
    """Float32 arrays with a slot axis, slot 0 the base, that grow by reallocation (see the module docstring).

    Args:
        specs: ``{input name: SlotSpec}``.
        base: the base slot's values (``{name: slot array}``; missing names hold ``spec.fill``).
        capacity: initial number of slots, base included.

    Not thread-safe: the session calls it under its lock.
    """

    def __init__(self, specs: Mapping[str, SlotSpec], base: Mapping[str, np.ndarray] | None = None,
                 capacity: int = MIN_CAPACITY) -> None:
        self.specs = dict(specs)
        self.capacity = max(int(capacity), 2)
        self.arrays = {name: np.full(spec.shape(self.capacity), spec.fill, dtype=np.float32)
                       for name, spec in self.specs.items()}
        #: bumped whenever :attr:`arrays` are replaced (reallocation, resize)
        self.generation = 0
        self._used = {BASE_SLOT}
        # free slot -> version from which no snapshot maps it (None: never mapped in these arrays)
        self._free: dict[int, int | None] = {s: None for s in range(1, self.capacity)}
        self.write(BASE_SLOT, base or {})

    # ---- slots ------------------------------------------------------------------------------------

    @property
    def used(self) -> int:
        """Slots in use, base included."""
        return len(self._used)

    def view(self, name: str, slot: int) -> np.ndarray:
        """Slot ``slot`` of input ``name`` (a view into the bank)."""
        return np.moveaxis(self.arrays[name], self.specs[name].slot_axis, 0)[slot]

    def write(self, slot: int, values: Mapping[str, np.ndarray]) -> None:
        """Write every input's slot ``slot``: ``values[name]`` where given, ``spec.fill`` elsewhere."""
        unknown = sorted(set(values) - set(self.specs))
        if unknown:
            raise KeyError(f"not inputs of this bank: {unknown}")
        for name, spec in self.specs.items():
            target = self.view(name, slot)
            if name in values:
                target[...] = values[name]
            else:
                target.fill(spec.fill)

    def allocate(self, oldest_live: int | None) -> int:
        """A slot no live snapshot can read (``oldest_live``: the smallest version of a live snapshot, None if
        none), reallocating the arrays when there is none. The slot stays free until :meth:`commit`."""
        slot = self._writable(oldest_live)
        if slot is None:
            self._reallocate(self.capacity if self.used + 1 <= self.capacity // 2 else 1 + 2 * (self.capacity - 1))
            slot = self._writable(oldest_live)
        assert slot is not None  # a reallocation leaves every free slot writable
        return slot

    def commit(self, slot: int) -> None:
        """Mark ``slot`` (from :meth:`allocate`, written) as in use."""
        del self._free[slot]
        self._used.add(slot)

    def release(self, slot: int, version: int) -> None:
        """Free ``slot``: snapshots from ``version`` on no longer map it (older ones may, until they are gone)."""
        if slot == BASE_SLOT or slot not in self._used:
            raise ValueError(f"slot {slot} is not in use")
        self._used.discard(slot)
        self._free[slot] = version

    def _writable(self, oldest_live: int | None) -> int | None:
        for slot, freed in sorted(self._free.items()):
            if freed is None or oldest_live is None or oldest_live >= freed:
                return slot
        return None

    def _reallocate(self, capacity: int) -> None:
        """New arrays of ``capacity`` slots holding the current ones; every free slot becomes writable
        (no snapshot reads the new arrays yet)."""
        old = self.capacity
        arrays = {}
        for name, spec in self.specs.items():
            array = np.full(spec.shape(capacity), spec.fill, dtype=np.float32)
            np.moveaxis(array, spec.slot_axis, 0)[:old] = np.moveaxis(self.arrays[name], spec.slot_axis, 0)
            arrays[name] = array
        self.arrays, self.capacity = arrays, capacity
        self._free = {s: None for s in range(1, capacity) if s not in self._used}
        self.generation += 1

    def resize(self, name: str, slot_shape: tuple[int, ...], pad: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]) -> None:
        """Give input ``name`` a new slot shape (e.g. a wider label axis) in a **new** array; ``pad(old, shape)``
        maps the old array to the new shape. The other inputs keep their arrays (and their free slots their
        versions: snapshots may still read them there)."""
        spec = dataclasses.replace(self.specs[name], slot_shape=tuple(slot_shape))
        array = np.ascontiguousarray(pad(self.arrays[name], spec.shape(self.capacity)), dtype=np.float32)
        if array.shape != spec.shape(self.capacity):
            raise ValueError(f"{name}: resized to {array.shape}, expected {spec.shape(self.capacity)}")
        self.specs[name] = spec
        self.arrays = {**self.arrays, name: array}
        self.generation += 1

    # ---- memory -------------------------------------------------------------------------------------

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot over every input."""
        return sum(spec.slot_nbytes for spec in self.specs.values())

    def memory(self) -> dict[str, int]:
        """``capacity``/``used`` slots, ``allocated_bytes`` (the arrays), ``used_bytes`` (slots in use) and
        ``bytes_per_slot``."""
        return {"capacity": self.capacity, "used": self.used, "bytes_per_slot": self.slot_nbytes,
                "allocated_bytes": sum(a.nbytes for a in self.arrays.values()),
                "used_bytes": self.used * self.slot_nbytes}
