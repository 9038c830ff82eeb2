"""FSDP training (``--fsdp``, or accelerate's FSDP config): two CPU processes on gloo. A sharded run must
train exactly what the same run under DDP trains (DDP is the reference), hold only its shards, and write
checkpoints that resume under either."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from bca_deploy.training import EvaluateConfig, TrainingConfigError, evaluate
from bca_deploy.training.sharding import ACCELERATE_USE_DEEPSPEED, ACCELERATE_USE_FSDP, sharding_source
from training_helpers import (  # noqa: F401 - one_thread is an autouse fixture
    REPO,
    config,
    make_data,
    one_thread,
    read_tensors,
    sst2_rows,
    subprocess_env,
    tiny_model_dir,
    write_jsonl,
    write_tsv,
)

# Runs inside each torchrun process: several train() calls in one process group (a launch costs more
# than these tiny runs). During sharded runs it records after every step how many parameter elements
# this process holds, against the model's total.
_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    import bca_deploy.training.trainer as trainer
    from bca_deploy.training import TrainConfig, train

    spec = json.loads(open(sys.argv[1]).read())
    dist.init_process_group("gloo")
    sharded, held = [], []
    shard, shard_from_first = trainer.shard, trainer.shard_from_first

    def recording_shard(model, device):
        sharded.append(model)
        return shard(model, device)

    def recording_shard_from_first(model, device):
        sharded.append(model)
        return shard_from_first(model, device)

    def count(step, logs):
        params = list(sharded[-1].parameters())
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
        held.append([local, sum(p.numel() for p in params)])

    trainer.shard, trainer.shard_from_first = recording_shard, recording_shard_from_first
    load = trainer.load_for_training
    reads = []  # per run: how many times this process read the checkpoint's weights

    def counting_load(*args, **kwargs):
        reads[-1] += 1
        return load(*args, **kwargs)

    trainer.load_for_training = counting_load
    for run in spec["runs"]:
        options = run["options"]
        reads.append(0)
        train(TrainConfig(**options), on_step=count if options.get("fsdp") else None)
    if dist.get_rank() == 0:
        open(spec["held"], "w").write(json.dumps(held))
    open(spec["reads"] + str(dist.get_rank()), "w").write(json.dumps(reads))
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of the module, in one torchrun launch of two processes."""
    root = tmp_path_factory.mktemp("sharding")
    data = make_data(root / "data")
    rows = sst2_rows("train", 200)
    texts = [s for s, _ in rows]
    pairs = [{"prompt": s[:30], "response": s[30:60]} for s, _ in rows if len(s) > 40]
    lm, lm_dev = write_jsonl(root / "lm.jsonl", pairs[:40]), write_jsonl(root / "lm_dev.jsonl", pairs[40:69])
    dev = write_tsv(root / "dev129.tsv", sst2_rows("dev", 129))  # 65 + 64 rows: the ranks' batch counts differ
    bert = tiny_model_dir(root / "bert", "bert", texts, dropout=0.0)
    llama = tiny_model_dir(root / "llama", "llama", texts)
    gpt2 = tiny_model_dir(root / "gpt2", "gpt2", texts)
    # accumulation, clipping, checkpointed activations, evaluation every 2 steps with an uneven last batch
    common = dict(device="cpu", block_size=8, batch_size=4, eval_batch_size=2, max_length=32, save_every=2,
                  eval_every=2, grad_accum_steps=2, max_grad_norm=0.5, scheduler="constant", warmup_steps=0,
                  progress=False)
    causal = dict(common, model=str(llama), task="causal-lm", data=str(lm), eval_data=str(lm_dev), recipe="paper",
                  gradient_checkpointing=True)
    seq_cls = dict(common, model=str(bert), data=str(data["small"]), eval_data=str(dev))
    # GPT-2's lm_head is its input embeddings: saved whole as transformer.wte (the tied lm_head follows it; naming
    # lm_head itself is refused, it trained nothing), sharded and gathered whole by FSDP
    tied = dict(common, model=str(gpt2), task="causal-lm", data=str(lm), eval_data=str(lm_dev), targets=["c_attn"],
                modules_to_save=["transformer.wte"])
    out = {name: root / name for name in ("lm_ddp", "lm_fsdp", "lm_fsdp_then_ddp", "lm_ddp_then_fsdp", "cls_ddp",
                                          "cls_fsdp", "tied_ddp", "tied_fsdp")}
    plan = [
        dict(causal, out=str(out["lm_ddp"]), max_steps=4),
        dict(causal, out=str(out["lm_fsdp"]), max_steps=4, fsdp=True),
        dict(causal, out=str(out["lm_fsdp_then_ddp"]), max_steps=2, fsdp=True),
        dict(causal, out=str(out["lm_fsdp_then_ddp"]), max_steps=4, resume=True),
        dict(causal, out=str(out["lm_ddp_then_fsdp"]), max_steps=2),
        dict(causal, out=str(out["lm_ddp_then_fsdp"]), max_steps=4, resume=True, fsdp=True),
        dict(seq_cls, out=str(out["cls_ddp"]), max_steps=4),
        dict(seq_cls, out=str(out["cls_fsdp"]), max_steps=4, fsdp=True),
        dict(tied, out=str(out["tied_ddp"]), max_steps=2),
        dict(tied, out=str(out["tied_fsdp"]), max_steps=2, fsdp=True),
    ]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"runs": [{"options": o} for o in plan], "held": str(root / "held.json"),
                                "reads": str(root / "reads")}))
    script = root / "runs.py"
    script.write_text(_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**out, "bert": bert, "dev": dev, "held": json.loads((root / "held.json").read_text()),
            "plan": plan, "reads": [json.loads((root / f"reads{rank}").read_text()) for rank in (0, 1)]}


def _result(run_dir):
    return json.loads((run_dir / "train_result.json").read_text())


def _assert_same_tensors(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-9, msg=name)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_a_sharded_run_trains_what_ddp_trains_and_holds_half_the_weights(runs):
    """FSDP and DDP write the same tensors (the non-first process's shards came from the first: a new head's
    random values, rotary buffers and the adapter's initial kernels included), each process holds half."""
    for kind, steps in (("lm", [2, 4]), ("cls", [2, 4]), ("tied", [2])):
        ddp, fsdp = runs[f"{kind}_ddp"], runs[f"{kind}_fsdp"]
        _assert_same_tensors(read_tensors(fsdp / "last"), read_tensors(ddp / "last"))
        _assert_same_tensors(read_tensors(fsdp / "best"), read_tensors(ddp / "best"))
        want, got = _result(ddp), _result(fsdp)
        assert (got["config"]["fsdp"], want["config"]["fsdp"]) == (True, False)
        assert [h["step"] for h in got["history"]] == steps
        for mine, theirs in zip(got["history"], want["history"]):
            assert mine == pytest.approx(theirs, rel=1e-5)
    assert "transformer.wte.weight" in read_tensors(runs["tied_fsdp"] / "last")  # the tied weight, gathered
    # each of the two processes held half of every parameter (FSDP pads a shard by at most a row)
    assert len(runs["held"]) == 4 + 2 + 2 + 4 + 2  # the steps of the sharded runs (one resumed at step 2)
    for local, total in runs["held"]:
        assert total / 2 <= local < total * 0.55
    # only the first process read the checkpoint's weights in a sharded run (the other built the model on the meta
    # device and received its shards); in a DDP run each read them
    sharded = [bool(options.get("fsdp")) for options in runs["plan"]]
    assert runs["reads"][0] == [1] * len(sharded)
    assert runs["reads"][1] == [0 if fsdp else 1 for fsdp in sharded]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_checkpoints_resume_across_fsdp_and_ddp_exactly(runs):
    for resumed in ("lm_fsdp_then_ddp", "lm_ddp_then_fsdp"):
        _assert_same_tensors(read_tensors(runs[resumed] / "last"), read_tensors(runs["lm_ddp"] / "last"))
        assert _result(runs[resumed])["resumed_from"] == 2


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_a_sharded_runs_evaluation_counts_each_row_once(runs):
    """The ranks run as many forwards as the rank with the most batches, but count only their own rows:
    one process evaluating everything gives the same numbers."""
    final = _result(runs["cls_fsdp"])["final_metrics"]
    metrics = evaluate(EvaluateConfig(model=runs["bert"], adapter=runs["cls_fsdp"] / "last", data=runs["dev"],
                                      batch_size=2))
    assert metrics["n"] == final["n"] == 129
    assert metrics["accuracy"] == final["accuracy"]
    assert metrics["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_one_process_with_fsdp_trains_whole_and_says_so(tmp_path, capsys):
    from bca_deploy.training import train

    data = make_data(tmp_path / "data")
    bert = tiny_model_dir(tmp_path / "bert", "bert", [s for s, _ in sst2_rows("train", 64)])
    result = train(config(bert, data["small"], tmp_path / "out", max_steps=1, fsdp=True))
    assert result.step == 1 and result.config["fsdp"] is False
    assert "this is one process, so the model trains whole" in capsys.readouterr().err


def test_the_sharding_is_asked_by_the_option_or_accelerates_config_and_deepspeed_is_refused():
    assert sharding_source(False, {}) is None
    assert sharding_source(True, {}) == "--fsdp"
    assert "ACCELERATE_USE_FSDP=true" in sharding_source(False, {ACCELERATE_USE_FSDP: "true"})
    assert sharding_source(False, {ACCELERATE_USE_FSDP: "false"}) is None
    with pytest.raises(TrainingConfigError, match="DeepSpeed.*DDP, or with FSDP"):
        sharding_source(True, {ACCELERATE_USE_DEEPSPEED: "1"})


def test_accelerate_settings_the_trainer_does_not_apply_are_named():
    from bca_deploy.training.sharding import ignored_accelerate_settings

    # what `accelerate launch --use_fsdp` sets with its defaults: nothing to say
    defaults = {ACCELERATE_USE_FSDP: "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD", "FSDP_OFFLOAD_PARAMS": "false",
                "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_ACTIVATION_CHECKPOINTING": "false",
                "ACCELERATE_MIXED_PRECISION": "no"}
    assert ignored_accelerate_settings(defaults) == []
    odd = {**defaults, "FSDP_SHARDING_STRATEGY": "NO_SHARD", "FSDP_OFFLOAD_PARAMS": "true",
           "FSDP_ACTIVATION_CHECKPOINTING": "true", "ACCELERATE_MIXED_PRECISION": "bf16"}
    said = "; ".join(ignored_accelerate_settings(odd))
    for part in ("sharding strategy NO_SHARD", "offload", "--gradient-checkpointing", "--precision bf16"):
        assert part in said, (part, said)
    assert ignored_accelerate_settings({"ACCELERATE_MIXED_PRECISION": "fp16"})  # a DDP launch too


# Each process of a two-process group builds its own model (the first as from the checkpoint, in bf16 with a
# buffer; the second as from the config, in fp32) and calls align_with_first once per case; what it got is
# written per rank. Every case is one broadcast on both ranks, so a refusal on the second does not hang the first.
_ALIGN_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from bca_deploy.training import TrainingConfigError
    from bca_deploy.training.sharding import align_with_first

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def model(out_features, extra_buffer):
        m = nn.Sequential(nn.Linear(4, out_features), nn.LayerNorm(out_features))
        if extra_buffer:
            m.register_buffer("positions", torch.arange(3))
        return m.to(torch.bfloat16) if rank == 0 else m

    cases = {"same": (4, False), "wider": (6, False), "extra buffer": (4, True)}
    got = {}
    for case, (width, extra) in cases.items():
        m = model(4, False) if rank == 0 else model(width, extra)
        try:
            missing = align_with_first(m, ["0.bias"] if rank == 0 else [], source="ckpt-dir")
            got[case] = {"missing": missing, "dtypes": sorted({str(t.dtype) for t in m.parameters()})}
        except TrainingConfigError as exc:
            got[case] = {"error": str(exc)}
    open(sys.argv[1] + str(rank), "w").write(json.dumps(got))
    dist.destroy_process_group()
""")


def test_processes_building_another_model_than_the_first_read_are_refused_by_name(tmp_path):
    script = tmp_path / "align.py"
    script.write_text(_ALIGN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "got")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = (json.loads((tmp_path / f"got{rank}").read_text()) for rank in (0, 1))
    # the first process reads nothing but its own model; the others take its list and its dtypes
    assert all(first[case] == {"missing": ["0.bias"], "dtypes": ["torch.bfloat16"]} for case in first)
    assert second["same"] == {"missing": ["0.bias"], "dtypes": ["torch.bfloat16"]}
    wider = second["wider"]["error"]
    assert wider.startswith("--model ckpt-dir: the model built from its config differs") and "train without --fsdp" in wider
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):  # shapes differ: each is named
        assert name in wider, wider
    assert "positions" in second["extra buffer"]["error"]  # a tensor one side lacks
