"""bench/export_stages.py: every BCA node of an exported unmerged ``matmul`` graph is put in its stage (none left
over but shape bookkeeping), and the stages are the ones the graph's plan has."""

from __future__ import annotations

import onnx
import pytest
import torch
from bench_helpers import load_bench_script
from torch import nn

stages_bench = load_bench_script("export_stages.py", "bench_export_stages")


class _Projection(nn.Module):
    """A bias-free projection and one with a bias, in the scopes the bench reads (q_proj, o_proj)."""

    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d)

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


@pytest.mark.parametrize(("p", "want"), [
    (64, {"forward (one MatMul)", "mix", "inverse stage 1", "inverse stage 2", "transpose", "residual add"}),
    (256, {"forward stage 1", "forward stage 2", "mix", "inverse stage 1", "inverse stage 2", "transpose",
           "residual add"}),
    (32, {"forward (one MatMul)", "transpose", "mix", "inverse (one Gemm)"}),
])
def test_every_bca_node_gets_its_stage(tmp_path, p, want):
    from bca_deploy import inject
    from bca_deploy.exporters import exportable_adapters

    model = _Projection(2 * p)
    inject(model, ["q_proj", "o_proj"], block_size=p, init="normal", seed=0)
    with exportable_adapters(model.eval(), "matmul"):
        torch.onnx.export(model, (torch.randn(1, 3, 2 * p),), str(tmp_path / "m.onnx"), input_names=["hidden_states"],
                          dynamic_axes={"hidden_states": {1: "seq"}}, opset_version=18, dynamo=False)
    nodes = [n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node
             if stages_bench._SCOPE.search(n.name) and n.op_type != "Constant"]
    got = {stages_bench.stage_of(list(n.input), n.op_type) for n in nodes}
    bookkeeping = {f"other ({op})" for op in ("Reshape", "Shape", "Concat", "Gather", "Unsqueeze", "Slice")}
    assert got - bookkeeping == want
    # each projection ends in one residual Add (base + Δ), with or without a bias; where the inverse is one Gemm
    # (p=32 here) that Gemm takes the base output as its addend and there is none
    adds = [n.name for n in nodes if stages_bench.stage_of(list(n.input), n.op_type) == "residual add"]
    assert sorted(name.split("/")[1] for name in adds) == (["o_proj", "q_proj"] if "residual add" in want else [])
