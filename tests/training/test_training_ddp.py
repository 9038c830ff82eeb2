"""The same trainer under torchrun: two CPU processes on gloo, rank 0 writes, the adapter loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import bca_deploy as bd
from bca_deploy.training import EvaluateConfig, evaluate
from training_helpers import (  # noqa: F401 - one_thread is an autouse fixture
    REPO,
    make_data,
    one_thread,
    sst2_rows,
    subprocess_env,
    tiny_model_dir,
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_torchrun_two_cpu_processes(tmp_path):
    data = make_data(tmp_path / "data")
    model_dir = tiny_model_dir(tmp_path / "bert", "bert", [s for s, _ in sst2_rows("train", 256)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bca_deploy.training", "train", "--model", str(model_dir), "--data", str(data["small"]),
           "--eval-data", str(data["dev"]), "--out", str(out), "--device", "cpu", "--block-size", "8",
           "--batch-size", "8", "--max-length", "32", "--max-steps", "4", "--save-every", "2", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("done: 4 steps") == 1  # the summary is printed once, by rank 0
    result = json.loads((out / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["step"] == 4
    assert result["config"]["world_size"] == 2
    # 2 processes x batch 8 = 16 examples a step
    assert result["samples_per_second"] * result["train_seconds"] == pytest.approx(4 * 16)

    from transformers import AutoModelForSequenceClassification

    model = bd.load_adapter(AutoModelForSequenceClassification.from_pretrained(model_dir), out / "last")
    assert len(list(bd.bca_layers(model))) == 2 * 6  # the default targets: every linear layer of 2
    assert any(layer.bca_kernels["default"].abs().sum() > 0 for _, layer in bd.bca_layers(model))
    # the metric both ranks computed together equals one process evaluating everything
    metrics = evaluate(EvaluateConfig(model=model_dir, adapter=out / "last", data=data["dev"]))
    assert metrics["accuracy"] == result["final_metrics"]["accuracy"]
    assert metrics["n"] == result["final_metrics"]["n"] == 128
    assert metrics["loss"] == pytest.approx(result["final_metrics"]["loss"], rel=1e-5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_a_data_error_under_torchrun_is_printed_once_by_rank_0(tmp_path):
    """Every process read the data and printed the same refusal, and the launcher's summary named whichever exited
    first; now rank 0 prints it, once, and is the root cause the launcher names, with exit code 2."""
    data = make_data(tmp_path / "data")
    model_dir = tiny_model_dir(tmp_path / "bert", "bert", [s for s, _ in sst2_rows("train", 64)])
    bad = tmp_path / "heldout.tsv"
    bad.write_text("sentence\tlabel\na fine film\t1\na dull film\t0\nsomething\t\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bca_deploy.training", "train", "--model", str(model_dir), "--data", str(data["small"]),
           "--eval-data", str(bad), "--out", str(out), "--device", "cpu", "--block-size", "8", "--max-steps", "2",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count(f"Error: {bad}: bad examples:") == 1, proc.stderr[-4000:]
    assert "line 4: label in column 'label': empty label" in proc.stderr
    root_cause = proc.stderr[proc.stderr.index("Root Cause"):]
    assert "rank      : 0 (local_rank: 0)" in root_cause and "exitcode  : 2 " in root_cause, root_cause
    assert not out.exists()


_ABORT_AT_TEARDOWN = """\
import atexit, os
if "LOCAL_RANK" in os.environ:  # the launched workers, not torchrun itself
    atexit.register(os.abort)
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("ending", ["finished", "refused"])
def test_a_worker_ends_with_its_own_exit_code_whatever_the_interpreter_teardown_does(tmp_path, ending):
    """On torch 2.13 CPU, gloo aborted about one finished worker in a hundred while the interpreter tore down
    (SIGABRT after the summary was printed: CI of 2026-12-07), and torchrun reported the finished run as failed.
    A library aborting in that teardown is simulated here (an atexit handler in every worker): the run's own exit
    code must still be what torchrun sees, 0 for a finished run and 2 for a refused one."""
    import os

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_ABORT_AT_TEARDOWN)
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH")]))
    data = make_data(tmp_path / "data")
    model_dir = tiny_model_dir(tmp_path / "bert", "bert", [s for s, _ in sst2_rows("train", 64)])
    eval_data = data["dev"]
    if ending == "refused":
        eval_data = tmp_path / "heldout.tsv"
        eval_data.write_text("sentence\tlabel\na fine film\t1\nsomething\t\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bca_deploy.training", "train", "--model", str(model_dir), "--data", str(data["small"]),
           "--eval-data", str(eval_data), "--out", str(tmp_path / "out"), "--device", "cpu", "--block-size", "8",
           "--batch-size", "8", "--max-length", "32", "--max-steps", "2", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    assert "SIGABRT" not in proc.stderr, proc.stderr[-4000:]
    if ending == "finished":
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.count("done: 2 steps") == 1
    else:
        assert proc.returncode != 0
        root_cause = proc.stderr[proc.stderr.index("Root Cause"):]
        assert "exitcode  : 2 " in root_cause, root_cause
        assert proc.stderr.count("empty label") == 1


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the launched process with ``RANK=rank`` among ``launcher_pid``'s children (Linux /proc)."""
    import os
    from pathlib import Path

    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{launcher_pid}\n" not in status.read_text():
                continue
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(status.parent.name)
    return None if os.path.exists(f"/proc/{launcher_pid}") else -1


@pytest.mark.skipif(not torch.distributed.is_available() or not sys.platform.startswith("linux"),
                    reason="torch.distributed and Linux's /proc are needed")
def test_a_process_killed_mid_run_stops_the_other_with_what_is_left(tmp_path):
    """kill -9 of rank 1 made rank 0 die on gloo's "Connection closed by peer" as "Internal error ... This is a bug in
    bca-deploy" (exit 70), saying nothing of the checkpoint left. Now it says another process stopped, what --out
    holds and how to continue."""
    import os
    import signal
    import time

    data = make_data(tmp_path / "data")
    model_dir = tiny_model_dir(tmp_path / "bert", "bert", [s for s, _ in sst2_rows("train", 256)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bca_deploy.training", "train", "--model", str(model_dir), "--data", str(data["small"]),
           "--out", str(out), "--device", "cpu", "--block-size", "8", "--batch-size", "8", "--max-length", "32",
           "--max-steps", "100000", "--save-every", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=subprocess_env())
    try:
        deadline = time.monotonic() + 180
        while not (out / "last").is_dir() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        victim = _rank_pid(proc.pid, 1)
        assert victim and victim > 0, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "This is a bug" not in stderr and "Internal error" not in stderr, stderr[-3000:]
    # rank 0 either finds its peer gone in a collective, or (on a loaded machine, first) the launcher, seeing rank 1
    # dead, terminates it: both say what --out/last holds and how to resume
    assert ("rank 0: another process of this distributed run stopped (its own error, and the launcher's summary, "
            "say why); training stopped at step " in stderr or "training terminated (SIGTERM) at step " in stderr), \
        stderr[-3000:]
    assert f"{out / 'last'} holds the checkpoint of step " in stderr and "--resume" in stderr, stderr[-3000:]
    assert (out / "last" / "adapter_model.safetensors").is_file()


def _agree_worker(rank: int, port: int, flags: list[bool], results) -> None:
    import os

    import torch.distributed as dist

    from bca_deploy.training.runtime import Dist, any_rank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results[rank] = any_rank(Dist(rank, 2), flags[rank], torch.device("cpu"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("flags", [[False, True], [True, False], [False, False]])
def test_every_process_sees_a_non_finite_loss_any_of_them_saw(flags):
    """The trainer's divergence check is agreed: a loss that is NaN or inf on one process stops every process at that
    step with the same error (one that stopped alone left the others to die on the broken connection)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_agree_worker, args=(port, flags, results), nprocs=2, join=True)
    assert dict(results) == {0: any(flags), 1: any(flags)}
