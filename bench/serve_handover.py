"""When a generation step's tokens go to the event loop: during the next onnxruntime run, or right after the step.

``GenerationEngine`` hands a step's tokens to the event loop right before the next run (the loop then works while
onnxruntime computes) when steps take at least ``OVERLAP_MIN_STEP_S``, and right after the step when they are
shorter. This benchmark forces each way (``OVERLAP_MIN_STEP_S`` = 0: always during the run; infinity: always after
the step) on the decoders of ``bench/serve_generation.py`` (tiny and MiniLM-sized Llama, 16 adapters, onnxruntime
CPU), with the same closed-loop clients reading streams, and reports tokens/s and the decode runs' time per
row-step, the two ways alternating in each round; the ratio is the median of the per-round (paired) ratios.

    python bench/serve_handover.py                 # both models, 32 clients, 5 rounds -> bench/results/serve_handover.*
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, bench/serve_generation.py

WAYS = {"during the next run": 0.0, "after the step": float("inf")}


def measure(kind: str, args, work: Path) -> list[dict]:
    import serve_generation as sg

    from bca_deploy.serving import engine as engine_module

    def way(threshold: float):
        return lambda session: setattr(engine_module, "OVERLAP_MIN_STEP_S", threshold)

    default = engine_module.OVERLAP_MIN_STEP_S
    try:
        rounds = sg.paired_engine_rounds(kind, args, work, {name: way(t) for name, t in WAYS.items()})
    finally:
        engine_module.OVERLAP_MIN_STEP_S = default
    samples = {name: [(sum(len(r["tokens"]) for r in s["result"]["records"]) / s["result"]["wall_s"],
                       s["runs"]["decode_s"] / max(1, s["runs"]["decode_row_steps"])) for s in runs]
               for name, runs in rounds.items()}
    return sg.paired_rows(kind, args, samples, "tokens handed to the loop", {
        "tokens_per_s": lambda v: statistics.median(x[0] for x in v),
        "decode_ms_per_row_step": lambda v: 1e3 * statistics.median(x[1] for x in v)},
        "after/during (paired tokens/s)", ("after the step", "during the next run"))


def notes(args, load_start, load_end, minutes: float) -> str:
    import serve_generation as sg

    from bca_deploy.serving.engine import OVERLAP_MIN_STEP_S

    return sg.paired_engine_notes(args, f"""`decode_ms_per_row_step`: the decode runs' onnxruntime time per row. The
engine's default picks "during the next run" for steps of at least `OVERLAP_MIN_STEP_S` = {OVERLAP_MIN_STEP_S} s and
"after the step" for shorter ones.""", load_start, load_end, minutes)


def main() -> None:
    import serve_generation as sg

    sg.paired_engine_main(__doc__, measure, "serve_handover",
                          "Generation: tokens handed to the event loop during the next run vs after the step", notes)


if __name__ == "__main__":
    main()
