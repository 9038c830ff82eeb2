"""The example scripts run and print what they promise (they use only the public API)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quickstart():
    out = run_example("quickstart.py")
    assert "reloaded adapter reproduces the logits exactly: True" in out
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_peft_interop():
    out = run_example("peft_interop.py")
    diffs = [float(x) for x in re.findall(r"max \|logit diff\| = (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-5
