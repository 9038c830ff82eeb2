"""A fork server for the kill tests: forks children that rewrite one output directory in a loop, to be SIGKILLed.

Run as ``python kill_worker.py KIND SPEC_JSON``; KIND is ``merge``, ``export``, ``save_adapter`` or ``checkpoint``,
SPEC_JSON names the inputs (``{"model": dir, "adapters": [dir_a, dir_b]}``). The heavy imports happen once,
here, with torch limited to one thread (so no OpenMP pool exists when children are forked). Commands on
stdin, one per line; answers on stdout:

* ``start OUT EXCHANGE`` -> ``pid PID``: a child writes OUT over and over (``overwrite=True``), alternating
  the two sources (tree A, tree B), with the atomic exchange on (``EXCHANGE`` 1) or the two-rename fallback;
* ``reap PID`` -> ``reaped``: collect a child the test has killed;
* ``quit``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import bca_deploy.atomic as atomic  # noqa: E402


def writer(kind: str, spec: dict):
    """``write(out, i)``: one complete write of source ``i`` (0 or 1) to ``out``."""
    if kind == "merge":
        from bca_deploy.merge import merge_checkpoint

        return lambda out, i: merge_checkpoint(spec["model"], [(spec["adapters"][i], 1.0)], out, overwrite=True,
                                               progress=False)
    if kind == "export":
        from bca_deploy.exporters import export

        return lambda out, i: export(spec["model"], out, [spec["adapters"][i]], merge=True, task="feature-extraction",
                                     validate=False, overwrite=True, verbose=False)
    if kind == "save_adapter":
        from bca_deploy.adapter_io import load_adapter, save_adapter
        from exporters_helpers import build_model

        models = []
        for directory in spec["adapters"]:
            models.append(load_adapter(build_model("bert"), directory))
        return lambda out, i: save_adapter(models[i], out, overwrite=True)
    if kind == "checkpoint":
        from bca_deploy.adapter_io import load_adapter
        from bca_deploy.training.checkpoint import save_state, write_dir_atomically
        from exporters_helpers import build_model

        states = []
        for directory in spec["adapters"]:
            model = load_adapter(build_model("bert"), directory)
            states.append({n: p.detach().clone() for n, p in model.named_parameters()})

        def write(out, i):
            def build(tmp: Path) -> None:
                for name in ("adapter_config.json", "adapter_model.safetensors"):
                    (tmp / name).write_bytes((Path(spec["adapters"][i]) / name).read_bytes())
                save_state(tmp, {"step": i, "trainable": states[i]})

            write_dir_atomically(out, build)

        return write
    raise SystemExit(f"unknown kind {kind!r}")


def main() -> None:
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporters"))
    write = writer(kind, spec)
    # One write here first: every lazy import (transformers' model classes, optimum) happens before forking,
    # and its duration tells the test how long one write takes.
    scratch = Path(spec["scratch"])
    write(scratch, 0)
    start = time.perf_counter()
    write(scratch, 1)
    print(f"ready {time.perf_counter() - start:.3f}", flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "start":
            out, exchange = Path(command[1]), command[2] == "1"
            pid = os.fork()
            if pid == 0:  # the child: write until killed
                try:
                    atomic.USE_EXCHANGE = exchange
                    i = 1
                    while True:
                        write(out, i % 2)
                        i += 1
                finally:
                    os._exit(1)
            print(f"pid {pid}", flush=True)
        elif command[0] == "reap":
            os.waitpid(int(command[1]), 0)
            print("reaped", flush=True)
        elif command[0] == "quit":
            break


if __name__ == "__main__":
    main()
