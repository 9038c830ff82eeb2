"""The bank's slot storage (``bca_deploy.serving.slots``) and the session's use of it.

The rule under test: a slot is written only while no live snapshot can read it. Checked against a plain
reference model (a dict of what each adapter's slot must hold, and the contents every held snapshot saw
when it was taken), over random sequences of registrations, unregistrations, held and dropped snapshots.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import banks, token_rows  # noqa: F401  (fixture)

from bca_deploy.serving.slots import MIN_CAPACITY, SlotBank, SlotSpec

SPECS = {"k": SlotSpec(2, (2, 3, 4, 5)), "h": SlotSpec(0, (6, 3)), "b": SlotSpec(0, (3,), fill=-1.0)}


def _values(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {name: rng.standard_normal(spec.slot_shape).astype(np.float32) for name, spec in SPECS.items()}


def _slot(arrays, name: str, slot: int) -> np.ndarray:
    return np.moveaxis(arrays[name], SPECS[name].slot_axis, 0)[slot]


def test_shapes_fill_and_base_slot():
    base = {"h": np.ones((6, 3), dtype=np.float32)}
    bank = SlotBank(SPECS, base)
    assert bank.capacity == MIN_CAPACITY and bank.used == 1
    assert bank.arrays["k"].shape == (2, 3, MIN_CAPACITY, 4, 5) and bank.arrays["h"].shape == (MIN_CAPACITY, 6, 3)
    assert (_slot(bank.arrays, "h", 0) == 1).all() and (_slot(bank.arrays, "k", 0) == 0).all()
    assert (bank.arrays["b"] == -1).all()  # unwritten slots hold the fill
    memory = bank.memory()
    assert memory["bytes_per_slot"] == 4 * (2 * 3 * 4 * 5 + 6 * 3 + 3)
    assert memory["allocated_bytes"] == MIN_CAPACITY * memory["bytes_per_slot"]
    assert memory["used_bytes"] == memory["bytes_per_slot"]
    with pytest.raises(KeyError):
        bank.write(1, {"nope": np.zeros(1)})


def test_capacity_doubles_in_adapters_and_keeps_every_slot():
    rng = np.random.default_rng(0)
    bank = SlotBank(SPECS)
    written = {}
    capacities = []
    for _ in range(40):
        slot = bank.allocate(oldest_live=None)
        written[slot] = _values(rng)
        bank.write(slot, written[slot])
        bank.commit(slot)
        capacities.append(bank.capacity)
    # room for 8, 16, 32, 64 adapters (+ the base slot): the k-th reallocation copies 8·2^(k-1) slots
    assert sorted(set(capacities)) == [9, 17, 33, 65] and bank.generation == 3
    assert sorted(written) == list(range(1, 41))
    for slot, values in written.items():
        for name, value in values.items():
            np.testing.assert_array_equal(_slot(bank.arrays, name, slot), value)


def test_a_freed_slot_waits_for_older_snapshots():
    bank = SlotBank(SPECS)
    for _ in range(MIN_CAPACITY - 1):
        bank.commit(bank.allocate(None))
    bank.release(3, version=10)  # from version 10 on, no snapshot maps slot 3
    held = dict(bank.arrays)
    bank.allocate(oldest_live=9)  # a snapshot of version 9 may still read it: new arrays (with room doubled)
    assert bank.capacity == 17 and bank.generation == 1
    assert all(bank.arrays[k] is not held[k] for k in SPECS)
    bank2 = SlotBank(SPECS)
    for _ in range(MIN_CAPACITY - 1):
        bank2.commit(bank2.allocate(None))
    bank2.release(3, version=10)
    assert bank2.allocate(oldest_live=10) == 3 and bank2.capacity == MIN_CAPACITY  # nothing older alive
    assert bank2.allocate(oldest_live=None) == 3
    with pytest.raises(ValueError):
        bank2.release(0, version=11)  # the base slot is never freed


def test_reallocation_compacts_in_place_when_half_is_free():
    bank = SlotBank(SPECS)
    for _ in range(MIN_CAPACITY - 1):
        bank.commit(bank.allocate(None))
    for slot in range(1, 7):
        bank.release(slot, version=5)
    slot = bank.allocate(oldest_live=1)  # every free slot may still be read: reallocate, same size (3 used of 9)
    assert bank.capacity == MIN_CAPACITY and bank.generation == 1 and slot == 1


def test_resize_widens_one_input_in_new_arrays():
    rng = np.random.default_rng(1)
    bank = SlotBank(SPECS)
    slot = bank.allocate(None)
    values = _values(rng)
    bank.write(slot, values)
    bank.commit(slot)
    held = dict(bank.arrays)

    def pad(old, shape):
        new = np.full(shape, 7.0, dtype=np.float32)
        new[:, :, :3] = old
        return new

    bank.resize("h", (6, 5), pad)
    assert bank.arrays["h"].shape == (MIN_CAPACITY, 6, 5) and bank.arrays["h"] is not held["h"]
    assert bank.arrays["k"] is held["k"]  # the other inputs keep their arrays
    np.testing.assert_array_equal(_slot(bank.arrays, "h", slot)[:, :3], values["h"])
    assert (_slot(bank.arrays, "h", slot)[:, 3:] == 7).all()
    np.testing.assert_array_equal(_slot(held, "h", slot), values["h"])  # the old array is untouched


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_traffic_never_writes_what_a_live_snapshot_reads(seed):
    """Simulate the session: versions, held snapshots (arrays + slot map), register/unregister/replace."""
    rng = np.random.default_rng(seed)
    bank = SlotBank(SPECS)
    live: dict[str, tuple[int, dict]] = {}  # name -> (slot, values)
    held: list[tuple[int, dict, dict]] = []  # (version, arrays, {slot: values}) of snapshots still alive
    version = peak = 0
    for step in range(400):
        version += 1
        action = rng.random()
        if action < 0.55 or not live:
            name = f"a{rng.integers(0, 60)}"
            slot = bank.allocate(min((h[0] for h in held), default=None))
            values = _values(rng)
            bank.write(slot, values)
            bank.commit(slot)
            old = live.get(name)
            live[name] = (slot, values)
            if old is not None:
                bank.release(old[0], version)
        else:
            name = sorted(live)[rng.integers(0, len(live))]
            slot, _ = live.pop(name)
            bank.release(slot, version)
        if rng.random() < 0.3:
            held.append((version, dict(bank.arrays), {s: v for s, v in live.values()}))
        if held and rng.random() < 0.25:
            held.pop(int(rng.integers(0, len(held))))
        for _, arrays, mapped in held:  # every held snapshot still reads what it saw
            for slot, values in mapped.items():
                for key, value in values.items():
                    np.testing.assert_array_equal(_slot(arrays, key, slot), value, err_msg=f"step {step}")
        for slot, values in live.values():
            for key, value in values.items():
                np.testing.assert_array_equal(_slot(bank.arrays, key, slot), value)
        peak = max(peak, bank.used)
    # room doubles only when at least half is in use: never more than 4x the most slots ever used
    assert bank.capacity <= max(MIN_CAPACITY, 4 * peak + 1)


def test_session_reuses_slots_once_snapshots_are_gone(banks):
    """Through MultiAdapterSession: a dropped snapshot frees its slots for reuse (no growth); a held one
    keeps its adapters' slots intact through reuse and growth, and its embeddings stay bit-identical."""
    from bca_deploy.serving import MultiAdapterSession

    art = banks("bert")
    session = MultiAdapterSession(art["onnx"])
    layout = session.layout
    rng = np.random.default_rng(3)

    def tensors():
        key = sorted(layout)[0]
        return {key: (rng.standard_normal(layout[key].slot_shape) * 0.05).astype(np.float32)}

    for i in range(5):
        session.register_tensors(f"t{i}", tensors())
    memory = session.bank_memory()
    assert memory["used"] == 9 and memory["capacity"] == MIN_CAPACITY  # base + 3 exported + 5
    for _ in range(20):  # churn with no snapshot held: freed slots come back, the bank does not grow
        session.unregister("t0")
        gc.collect()
        session.register_tensors("t0", tensors())
    assert session.bank_memory()["capacity"] == MIN_CAPACITY
    rows = token_rows(4, seed=7)
    choices = ["t1", "a0", "t2", None]
    held = session.snapshot()
    before = session.embed(rows, choices, snapshot=held)
    slots = {n: held.slots[n] for n in ("t1", "t2")}
    contents = {n: {k: v.numpy()[s].copy() for k, v in held.feeds.items()} for n, s in slots.items()}
    session.unregister("t1")
    session.unregister("t2")
    # the only free slots are t1's and t2's, which the held snapshot maps: the first registration reallocates
    # (new arrays; the held snapshot keeps the old ones), later ones fill the new room and grow it again
    for i in range(30):
        session.register_tensors(f"u{i}", tensors())
    assert session.bank_memory()["capacity"] > MIN_CAPACITY
    for name, slot in slots.items():
        for key, value in contents[name].items():
            np.testing.assert_array_equal(held.feeds[key].numpy()[slot], value)
    np.testing.assert_array_equal(session.embed(rows, choices, snapshot=held), before)
