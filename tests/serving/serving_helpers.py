"""Adapter-bank exports of tiny models and their PyTorch references, shared by the serving and bank tests.

Not a ``conftest.py`` (``tests/conftest.py`` is imported elsewhere as ``conftest``; a second one would
shadow it): test modules put this folder on ``sys.path`` and import what they use. The caches are
module-level, so within one pytest session each bank is exported once, whichever test module asks first
(``tests/exporters/test_bank.py`` imports this module too).

Two banks, each exported from three adapters with different targets and block sizes:

- ``llama`` (``text-generation-with-past``): a0 q/v p8, a1 q/v/gate p8, a2 q/v/down p16;
- ``bert`` (``feature-extraction``): a0 query/value p8, a1 query/intermediate p8, a2 query/value p16;

plus adapters that were **not** exported (registered at run time): ones that fit the bank (also in
PEFT's C3A format) and misfits (a module the bank does not adapt, a block size it does not hold).
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporters"))
from exporters_helpers import build_model

from bca_deploy import inject, load_adapter, save_adapter, set_adapter
from bca_deploy.inject import adapters_disabled

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128  # build_model's vocabulary
TASKS = {"llama": "text-generation-with-past", "bert": "feature-extraction"}
TORCH_TASKS = {"llama": "text-generation", "bert": "feature-extraction"}

# name -> (targets, block size, seed); exported together into one bank graph, slots 1..3 in this order.
EXPORTED = {
    "llama": {
        "a0": (["q_proj", "v_proj"], 8, 0),
        "a1": (["q_proj", "v_proj", "gate_proj"], 8, 1),
        "a2": (["q_proj", "v_proj", "down_proj"], 16, 2),
    },
    "bert": {
        "a0": (["query", "value"], 8, 0),
        "a1": (["query", "intermediate.dense"], 8, 1),
        "a2": (["query", "value"], 16, 2),
    },
}
# Adapters saved beside the export, not in it: name -> (targets, block size, seed, format).
EXTRA = {
    "llama": {
        "extra": (["q_proj", "gate_proj"], 8, 10, "bca"),  # fits: q_proj p8 (a0/a1), gate_proj p8 (a1)
        "peftish": (["v_proj", "down_proj"], 16, 11, "peft"),  # PEFT C3A format; fits (a2's block size)
        "misfit-module": (["k_proj"], 8, 12, "bca"),  # the bank holds no k_proj kernels
        "misfit-block": (["q_proj"], 4, 13, "bca"),  # the bank holds q_proj at p=8 and p=16, not 4
    },
    "bert": {
        "bext": (["value", "intermediate.dense"], 8, 20, "bca"),  # value p8 (a0), intermediate.dense p8 (a1)
        "bpeft": (["query", "value"], 16, 21, "peft"),
        "misfit-block": (["value"], 4, 22, "bca"),
    },
}


def save_tiny_adapter(name: str, directory: Path, targets, block_size: int, seed: int, fmt: str = "bca",
                      **kwargs) -> Path:
    """Inject one adapter (non-zero kernels) into a fresh tiny ``name`` model and save it."""
    model = build_model(name)
    inject(model, targets, block_size=block_size, init="normal", init_std=0.05, seed=seed, **kwargs)
    save_adapter(model, directory, format=fmt)
    return directory


def _make(name: str, root: Path) -> dict:
    from bca_deploy.exporters import export

    model_dir = root / "model"
    build_model(name).save_pretrained(model_dir)
    adapters = {n: save_tiny_adapter(name, root / "adapters" / n, t, p, s) for n, (t, p, s) in EXPORTED[name].items()}
    extra = {n: save_tiny_adapter(name, root / "extra" / n, t, p, s, fmt)
             for n, (t, p, s, fmt) in EXTRA[name].items()}
    onnx = export(model_dir, root / "onnx", list(adapters.values()), merge=False, bank=True, task=TASKS[name],
                  verbose=False)
    return {"name": name, "root": root, "model": model_dir, "adapters": adapters, "extra": extra, "onnx": onnx}


_BANKS: dict[str, dict] = {}


@pytest.fixture(scope="session")
def banks(tmp_path_factory):
    """``banks(name) -> dict``: ``model``, ``adapters`` {name: dir}, ``extra`` {name: dir}, ``onnx`` (the bank)."""

    def get(name: str) -> dict:
        if name not in _BANKS:
            _BANKS[name] = _make(name, tmp_path_factory.mktemp(f"bank-{name}"))
        return _BANKS[name]

    return get


# ---- PyTorch references ---------------------------------------------------------------------------------


@functools.cache
def torch_model(name: str):
    """The PyTorch model of bank ``name`` with every exported and fitting extra adapter loaded (by name)."""
    art = _BANKS[name]
    model = build_model(name)  # seeded: the weights saved to art["model"]
    for n, directory in {**art["adapters"], **art["extra"]}.items():
        if not n.startswith("misfit"):
            load_adapter(model, directory, adapter_name=n)
    return model.eval()


def row_alone(model, ids: list[int], adapter: str | None) -> torch.Tensor:
    """Model output for one unpadded row through ``adapter`` alone (the layers' non-routing path)."""
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        if adapter is None or adapter == "__base__":
            with adapters_disabled(model):
                out = model(input_ids=x, attention_mask=torch.ones_like(x))
        else:
            set_adapter(model, adapter)
            out = model(input_ids=x, attention_mask=torch.ones_like(x))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state)[0]


def run_shapes(session, refuse: int | None = None) -> list[tuple[int, int]]:
    """From now on, the ``input_ids`` shape ``(rows, columns)`` of every run of ``session``, as they come; a prompt
    run (more than one column) holding token ``refuse`` raises instead (simulated: the graph refuses it)."""
    shapes: list[tuple[int, int]] = []
    real_run = session.run_ortvalues

    def recording_run(feeds, adapters, output_names=None, snapshot=None, **kwargs):
        ids = feeds["input_ids"]
        shapes.append(ids.shape)
        if refuse is not None and ids.shape[1] > 1 and (ids == refuse).any():
            raise RuntimeError(f"simulated: the graph refuses token {refuse}")
        return real_run(feeds, adapters, output_names, snapshot, **kwargs)

    session.run_ortvalues = recording_run
    return shapes


def token_rows(n: int, seed: int, low: int = 2, high: int = 9) -> list[list[int]]:
    """``n`` random token-id rows of lengths in [low, high), ids in [3, VOCAB) (no bos/eos/pad ids)."""
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, VOCAB, size=int(rng.integers(low, high)))] for _ in range(n)]


#: How long a StepGate waits for the engine to pause, or paused for the test to let it on (seconds).
GATE_TIMEOUT = 60.0


class StepGate:
    """An engine observer that records events and pauses the engine's thread after chosen decode steps.

    ``await gate.paused()`` returns once the engine waits after one of ``steps``; ``gate.go()`` lets it on.
    """

    def __init__(self, steps=()) -> None:
        self.steps = set(steps)
        self.count = 0
        self.events: list[tuple[str, dict]] = []
        self._paused = threading.Event()
        self._release = threading.Event()

    def __call__(self, event: str, values) -> None:
        self.events.append((event, dict(values)))
        if event == "step":
            self.count += 1
            if self.count in self.steps:
                self._release.clear()
                self._paused.set()
                self._release.wait(GATE_TIMEOUT)

    async def paused(self) -> None:
        assert await asyncio.to_thread(self._paused.wait, GATE_TIMEOUT), "the engine never paused"
        self._paused.clear()

    def go(self) -> None:
        self._release.set()

    def of(self, kind: str) -> list[dict]:
        return [v for e, v in self.events if e == kind]

    def steps_before(self, event: str, adapter: str) -> int:
        """Decode steps run before ``adapter``'s first ``event`` (``first_token``, ``finished``)."""
        steps = 0
        for kind, values in self.events:
            if kind == event and values.get("adapter") == adapter:
                return steps
            steps += kind == "step"
        raise AssertionError(f"no {event} event for {adapter}")


def run_in_waves(session, waves, submit, *, max_batch_rows: int = 8, before_wave=None, timeout: float = 120.0):
    """``waves[k]``'s jobs joined to a running :class:`~bca_deploy.serving.engine.GenerationEngine` over ``session``
    after its decode step k (0: at the start), each by ``submit(engine, job)`` (its stream), the engine held by a
    :class:`StepGate` while a later wave joins, which must find rows still decoding; ``before_wave(k)``: an async
    hook run just before wave k joins (e.g. a load). Returns ``(streams, results)`` in submission order (waves by k,
    each wave's jobs in order), every stream collected."""
    from bca_deploy.serving.engine import GenerationEngine

    gate = StepGate(steps=[k for k in waves if k])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=max_batch_rows, observer=gate)
        await engine.start()
        streams = []
        try:
            for k in sorted(waves):
                if k:
                    await gate.paused()
                    assert any(not s.done for s in streams), f"nothing was decoding at step {k}"
                if before_wave is not None:
                    await before_wave(k)
                streams += [submit(engine, job) for job in waves[k]]
                if k:
                    gate.go()
            return streams, [await s.collect() for s in streams]
        finally:
            gate.go()
            await engine.stop()

    return asyncio.run(asyncio.wait_for(main(), timeout))


@pytest.fixture(scope="module")
def llama(banks):
    """The tiny Llama bank (``banks("llama")``), for engine tests."""
    return banks("llama")


@pytest.fixture(scope="module")
def session(llama):
    """A :class:`MultiAdapterSession` of the tiny Llama bank."""
    from bca_deploy.serving import MultiAdapterSession

    return MultiAdapterSession(llama["onnx"])
