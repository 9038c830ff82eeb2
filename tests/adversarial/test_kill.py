"""Kill tests: a real SIGKILL at a random moment of a write, for merge, export, save_adapter and the checkpoint writer.

A fork server (``kill_worker.py``, imports done once) forks a child that rewrites ``out`` in a loop with
``overwrite=True``, alternating two sources (trees A and B); the test sleeps a random time (up to about
three writes), kills the child with SIGKILL and looks at ``out``. It must be tree A or tree B, complete.
With the two-rename fallback (no atomic exchange) a kill between the renames may leave ``out`` missing
for the moment, with the old tree set aside: then the next writer's :func:`bca_deploy.atomic.recover`
must restore it. After every kill, recovery must leave no temporary or set-aside tree behind.

``BCA_KILL_TESTS`` (default 4) sets the kills per writer; half use the exchange, half the fallback.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adversarial_helpers import leftovers, record, tree_digest  # noqa: E402
from serving_helpers import banks  # noqa: E402,F401

from bca_deploy.atomic import OLD_TAG, recover  # noqa: E402

KILLS = int(os.environ.get("BCA_KILL_TESTS", "4"))
WORKER = Path(__file__).resolve().parent / "kill_worker.py"


@pytest.fixture(scope="module")
def spec(banks):  # noqa: F811
    art = banks("bert")
    return {"model": str(art["model"]), "adapters": [str(art["adapters"]["a0"]), str(art["adapters"]["a2"])]}


class Worker:
    def __init__(self, kind: str, spec: dict, scratch: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), kind, json.dumps({**spec, "scratch": str(scratch)})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
        line = self._read()
        assert line.startswith("ready"), line
        self.write_seconds = float(line.split()[1])

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"kill worker exited with {self.proc.wait()}")
        return line.strip()

    def _ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def start(self, out: Path, exchange: bool) -> int:
        return int(self._ask(f"start {out} {int(exchange)}").split()[1])

    def reap(self, pid: int) -> None:
        assert self._ask(f"reap {pid}") == "reaped"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def run_kills(kind: str, spec: dict, tmp_path: Path, identify: Callable[[Path], str | None],
              write_a: Callable[[Path], None]) -> None:
    out = tmp_path / "out"
    write_a(out)  # the earlier output every kill must leave intact (or replaced whole by the other tree)
    assert identify(out) == "A"
    worker = Worker(kind, spec, tmp_path / "scratch")
    rng = random.Random(f"{kind}-kills")
    seen = {"A": 0, "B": 0, "missing, restored": 0}
    try:
        for k in range(KILLS):
            exchange = k % 2 == 0
            pid = worker.start(out, exchange)
            time.sleep(rng.uniform(0.0, 3 * worker.write_seconds + 0.1))
            os.kill(pid, signal.SIGKILL)
            worker.reap(pid)
            state = identify(out)
            if state is None:
                # only possible between the two renames of the fallback, with the old tree set aside
                assert not exchange and not out.exists(), f"kill {k}: {out} is damaged"
                assert any(OLD_TAG in name for name in leftovers(tmp_path, "out")), f"kill {k}: nothing to restore"
                seen["missing, restored"] += 1
            else:
                seen[state] += 1
            recover(out)  # what the next writer does first
            assert identify(out) in ("A", "B"), f"kill {k}: {out} is not a complete tree after recovery"
            assert leftovers(tmp_path, "out") == [], f"kill {k}: leftovers {leftovers(tmp_path, 'out')}"
    finally:
        worker.close()
    write_a(out)  # and the next write works
    assert identify(out) == "A" and leftovers(tmp_path, "out") == []
    record("kills survived", {"writer": kind, "kills": KILLS, "outcomes": seen,
                              "write_seconds": worker.write_seconds})


def _digests(write: Callable[[Path, int], None], root: Path) -> dict[str, dict]:
    refs = {}
    for label, i in (("A", 0), ("B", 1)):
        write(root / f"ref-{label}", i)
        refs[label] = tree_digest(root / f"ref-{label}")
    return refs


def _by_digest(refs: dict[str, dict]) -> Callable[[Path], str | None]:
    def identify(out: Path) -> str | None:
        digest = tree_digest(out)
        return next((label for label, ref in refs.items() if ref == digest), None)

    return identify


def test_merge_survives_kills(spec, tmp_path):
    from bca_deploy.merge import merge_checkpoint

    def write(out, i):
        merge_checkpoint(spec["model"], [(spec["adapters"][i], 1.0)], out, overwrite=True, progress=False)

    refs = _digests(write, tmp_path / "refs")
    assert refs["A"] != refs["B"]
    run_kills("merge", spec, tmp_path, _by_digest(refs), lambda out: write(out, 0))


def test_save_adapter_survives_kills(spec, tmp_path):
    from exporters_helpers import build_model

    from bca_deploy.adapter_io import load_adapter, save_adapter

    models = [load_adapter(build_model("bert"), d) for d in spec["adapters"]]

    def write(out, i):
        save_adapter(models[i], out, overwrite=True)

    refs = _digests(write, tmp_path / "refs")
    run_kills("save_adapter", spec, tmp_path, _by_digest(refs), lambda out: write(out, 0))


def test_checkpoint_writer_survives_kills(spec, tmp_path):
    import torch

    adapters = {label: tree_digest(Path(d)) for label, d in zip("AB", spec["adapters"])}

    def identify(out: Path) -> str | None:
        if not out.is_dir():
            return None
        files = {k: v for k, v in tree_digest(out).items() if k != "trainer_state.pt"}
        label = next((lab for lab, ref in adapters.items() if ref == files), None)
        if label is None:
            return None
        # the raw state (load_state also insists on a trainer's full state, which this writer test omits)
        state = torch.load(out / "trainer_state.pt", map_location="cpu", weights_only=True)
        return label if state["step"] == "AB".index(label) else None

    def write_a(out: Path) -> None:
        from exporters_helpers import build_model

        from bca_deploy.adapter_io import load_adapter
        from bca_deploy.training.checkpoint import save_state, write_dir_atomically

        model = load_adapter(build_model("bert"), spec["adapters"][0])

        def build(tmp: Path) -> None:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                (tmp / name).write_bytes((Path(spec["adapters"][0]) / name).read_bytes())
            save_state(tmp, {"step": 0, "trainable": {n: p.detach().clone() for n, p in model.named_parameters()}})

        write_dir_atomically(out, build)

    run_kills("checkpoint", spec, tmp_path, identify, write_a)


def test_export_survives_kills(spec, tmp_path):
    import onnx

    from bca_deploy.exporters import export

    def write(out, i):
        export(spec["model"], out, [spec["adapters"][i]], merge=True, task="feature-extraction", validate=False,
               overwrite=True, verbose=False)

    write(tmp_path / "ref", 0)
    files = set(tree_digest(tmp_path / "ref"))

    def identify(out: Path) -> str | None:
        if not out.is_dir() or set(tree_digest(out)) != files:
            return None
        adapters = json.loads((out / "bca_export.json").read_text())["adapters"]
        onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
        return {spec["adapters"][0]: "A", spec["adapters"][1]: "B"}.get(adapters[0])

    run_kills("export", spec, tmp_path, identify, lambda out: write(out, 0))
