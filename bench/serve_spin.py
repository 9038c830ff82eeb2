"""onnxruntime's intra-op threads spinning between runs (its default, ``serve --spin``) or sleeping (``--no-spin``).

The continuous-batching engine on the decoders of ``bench/serve_generation.py`` (tiny and MiniLM-sized Llama, 16
adapters, onnxruntime CPU, 2 intra-op threads), with the same closed-loop clients reading streams, one
``MultiAdapterSession`` per way (``spin=True`` / ``spin=False``), the two ways alternating in each round; reports
tokens/s and the process's CPU seconds per level, and the ratio as the median of the per-round (paired) ratios.
Spinning threads busy-wait for the next run: on a machine the server has to itself the next run starts sooner; on
a shared one (or under a CPU quota) they take CPU from the server's own threads and from other processes.

    python bench/serve_spin.py                         # both models, 32 clients, 5 rounds -> bench/results/serve_spin.*
    python bench/serve_spin.py --clients 1 --no-write  # one client
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, bench/serve_generation.py

WAYS = {"spin (default)": True, "no spin": False}


def measure(kind: str, args, work: Path) -> list[dict]:
    import serve_generation as sg

    rounds = sg.paired_engine_rounds(kind, args, work, {name: (lambda session: None) for name in WAYS},
                                     session_options={name: {"spin": spin} for name, spin in WAYS.items()})
    samples = {name: [(sum(len(r["tokens"]) for r in s["result"]["records"]) / s["result"]["wall_s"],
                       s["result"]["cpu_s"], s["result"]["load_1min"]) for s in runs]
               for name, runs in rounds.items()}
    return sg.paired_rows(kind, args, samples, "threads between runs", {
        "tokens_per_s": lambda v: statistics.median(x[0] for x in v),
        "tokens_per_s_min": lambda v: min(x[0] for x in v), "tokens_per_s_max": lambda v: max(x[0] for x in v),
        "cpu_s_per_level": lambda v: statistics.median(x[1] for x in v),
        "load_1min": lambda v: statistics.median(x[2] for x in v)},
        "no_spin/spin (paired tokens/s)", ("no spin", "spin (default)"))


def notes(args, load_start, load_end, minutes: float) -> str:
    import serve_generation as sg

    return sg.paired_engine_notes(args, """`cpu_s_per_level`: the benchmark process's CPU seconds (every thread) for
one level. "no spin" is onnxruntime's `session.intra_op.allow_spinning` 0 (`bca-deploy serve --no-spin`).""",
                                  load_start, load_end, minutes)


def main() -> None:
    import serve_generation as sg

    sg.paired_engine_main(__doc__, measure, "serve_spin",
                          "Generation: onnxruntime's intra-op threads spinning vs sleeping between runs", notes)


if __name__ == "__main__":
    main()
