"""bench/common.py helpers that decide what a benchmark reports (checked against onnxruntime itself)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[2]


def _load_common():
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


common = _load_common()


def _two_node_graph(path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="first"), helper.make_node("Neg", ["h"], ["y"], name="second")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def test_the_profile_drops_the_warmup_run_and_removes_its_file(tmp_path):
    import numpy as np

    _two_node_graph(tmp_path / "g.onnx")
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "prof")
    session = ort.InferenceSession(str(tmp_path / "g.onnx"), options, providers=["CPUExecutionProvider"])
    feeds = {"x": np.ones((4, 8), np.float32)}
    for _ in range(1 + 3):  # the warm-up, then 3 counted runs
        session.run(None, feeds)

    kernels, runs = common.ort_profile_after_warmup(session)

    assert len(runs) == 3
    first_counted = min(r["ts"] for r in runs)
    assert all(k["ts"] >= first_counted for k in kernels)
    # each counted run executes both nodes once, and no warm-up event is left
    assert sorted(k["name"] for k in kernels) == sorted(["first_kernel_time", "second_kernel_time"] * 3)
    assert not list(tmp_path.glob("prof*.json"))


def test_round_robin_sets_build_each_set_anew_and_pool_paired_rounds():
    """Every set is built by its own make_fns() call and timed in full rounds (each function once per round, in
    a rotating order), so the pooled lists stay paired round by round."""
    built, calls = [], []

    def make_fns():
        built.append(len(built))
        tag = built[-1]
        return {name: (lambda name=name: calls.append((tag, name))) for name in ("a", "b", "c")}

    stats, raw = common.time_round_robin_sets(make_fns, sets=3, warmup=1, repeats=4)
    assert built == [0, 1, 2] and set(raw) == set(stats) == {"a", "b", "c"}
    assert all(len(times) == 12 for times in raw.values())
    for tag in range(3):  # a set's calls: 1 warm-up round + 4 timed rounds, all by that set's functions
        assert [name for t, name in calls if t == tag].count("a") == 5
    timed = [name for t, name in calls if t == 0][3:]  # set 0 after its warm-up round
    assert [timed[i:i + 3] for i in range(0, 12, 3)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                         ["a", "b", "c"]]
