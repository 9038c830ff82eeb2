"""The README's reliability figures in one command: hostile inputs per entry point, SIGKILLs survived.

Runs the adversarial tests (``tests/adversarial/``: malformed adapter directories, model directories, data
files and CLI arguments through every entry point; hostile HTTP requests mixed into normal traffic; kills at random moments of merge, export, save_adapter and the
checkpoint writer) with larger counts than the test suite's defaults, collects what they record, and
writes ``bench/results/reliability.json`` and ``.md`` with the machine, its load and the command.

    python bench/reliability.py                       # 40 kills per writer, 400 random examples per property
    python bench/reliability.py --kills 100 --fuzz 1000

Nothing here is timed: run it at any priority (``nice -n 15`` on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/adversarial/test_adapter_inputs.py", "tests/adversarial/test_checkpoint_inputs.py",
         "tests/adversarial/test_data_inputs.py", "tests/adversarial/test_http_hostile.py",
         "tests/adversarial/test_kill.py", "tests/test_atomic.py"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=40, help="SIGKILLs per writer (half with the atomic exchange)")
    parser.add_argument("--fuzz", type=int, default=400, help="random examples per property (scaled per test)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reliability")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "reliability.jsonl"
        env = {**os.environ, "BCA_RELIABILITY_LOG": str(log), "BCA_KILL_TESTS": str(args.kills),
               "BCA_FUZZ_EXAMPLES": str(args.fuzz)}
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT,
                              env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
        raise SystemExit(f"the adversarial tests failed: {summary}")

    tried: dict[str, int] = {}
    for r in records:
        if r["topic"] == "inputs tried":
            for name, n in r["per_entry_point"].items():
                tried[name] = tried.get(name, 0) + n
    kills = [r for r in records if r["topic"] == "kills survived"]
    mixes = [r for r in records if r["topic"] == "hostile mix"]
    result = {
        "command": f"python bench/reliability.py --kills {args.kills} --fuzz {args.fuzz}",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()]},
        "pytest": summary,
        "seconds": round(seconds, 1),
        "inputs_tried": dict(sorted(tried.items())),
        "kills": kills,
        "hostile_mix": mixes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Reliability: hostile inputs and kills",
        "",
        f"Command: `{result['command']}` ({result['pytest']}, {result['seconds']} s). Machine: "
        f"{result['machine']['platform']}, {result['machine']['cpus']} CPUs, load {result['machine']['load_before']} "
        f"before, {result['machine']['load_after']} after.",
        "",
        "Every input below was refused with a BCAError naming the problem (CLI: exit code 2, no traceback), "
        "with inputs and earlier outputs unchanged; random inputs that happened to be valid were accepted.",
        "",
        "| entry point | inputs tried |",
        "|---|---:|",
        *[f"| {name} | {n:,} |" for name, n in result["inputs_tried"].items()],
        "",
        "| writer | SIGKILLs | out was tree A | out was tree B | missing, restored by the next writer | one write (s) |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {k['writer']} | {k['kills']} | {k['outcomes']['A']} | {k['outcomes']['B']} | "
          f"{k['outcomes']['missing, restored']} | {k['write_seconds']} |" for k in kills],
        "",
        "Hostile HTTP requests mixed into normal traffic on live servers (`tests/adversarial/test_http_hostile.py`: "
        "bad parameters, malformed and oversized bodies and heads, unknown routes and adapters, store entries "
        "linking out, stalled and vanishing clients, connections beyond the limit, random JSON): every normal "
        "request's answer is compared with the in-process session's.",
        "",
        "| normal requests | normal answered wrong | hostile requests | hostile, by kind |",
        "|---:|---:|---:|---|",
        *[f"| {m['normal']:,} | {m['normal_wrong']} | {sum(m['hostile'].values()):,} | "
          + ", ".join(f"{kind} {n}" for kind, n in sorted(m["hostile"].items())) + " |" for m in mixes],
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
