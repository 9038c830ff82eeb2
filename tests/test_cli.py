"""The click layer: every command has --help; errors are one clean line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import bca_deploy as bd
from bca_deploy.cli import main
from conftest import tiny_llama


@pytest.fixture
def adapter_dir(tmp_path):
    model = bd.inject(tiny_llama(), ["q_proj", "v_proj"], block_size=8, init="normal", seed=0, scaling=1 / 32)
    return bd.save_adapter(model, tmp_path / "adapter")


def test_every_command_has_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in main.commands:
        sub = runner.invoke(main, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)
        assert "Usage:" in sub.output


def test_help_shows_no_docstring_markup():
    # `inspect --help` printed its docstring's Sphinx roles (":func:`bca_deploy.adapter_io.read_adapter_header`")
    runner = CliRunner()
    for name in main.commands:
        output = runner.invoke(main, [name, "--help"], terminal_width=200).output
        assert not [role for role in (":func:", ":data:", ":class:", ":mod:", "``") if role in output], (name, output)
    assert "over 1 GiB is described from its header" in runner.invoke(main, ["inspect", "--help"],
                                                                      terminal_width=200).output


def test_inspect(adapter_dir):
    result = CliRunner().invoke(main, ["inspect", str(adapter_dir)])
    assert result.exit_code == 0, result.output
    assert "base model:   llama" in result.output
    assert "kernel parameters: 384" in result.output
    assert "model.layers.1.self_attn.v_proj  linear      32      16     8  0.03125" in result.output


def test_commands_take_a_training_run_for_its_adapter(adapter_dir, tmp_path):
    import shutil

    shutil.copytree(adapter_dir, tmp_path / "run" / "last")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert f"adapter:      {tmp_path / 'run' / 'last'}" in result.output


def test_convert_to_peft_and_back_is_exact(adapter_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["convert", "--adapter", str(adapter_dir), "--to", "peft", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["convert", "--adapter", str(tmp_path / "p"), "--to", "bca", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    before = load_file(adapter_dir / "adapter_model.safetensors")
    after = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_convert_reports_where_a_dotted_out_put_the_adapter(adapter_dir, tmp_path):
    """helper-80: `--out x/nosuch/..` wrote the adapter into x, then failed reading it back through nosuch."""
    (tmp_path / "x").mkdir()
    out = f"{tmp_path / 'x'}/nosuch/.."
    result = CliRunner().invoke(main, ["convert", "--adapter", str(adapter_dir), "--to", "peft", "--out", out])
    assert result.exit_code == 0, result.output
    assert f"wrote peft adapter to {tmp_path / 'x'}\n" in result.output
    assert (tmp_path / "x" / "adapter_config.json").is_file()


def test_existing_output_is_a_clean_error(adapter_dir, tmp_path):
    runner = CliRunner()
    args = ["convert", "--adapter", str(adapter_dir), "--to", "peft", "--out", str(tmp_path / "p")]
    assert runner.invoke(main, args).exit_code == 0
    result = runner.invoke(main, args)
    assert result.exit_code == 2
    assert "already holds an adapter" in result.output and "Traceback" not in result.output
    assert runner.invoke(main, args + ["--overwrite"]).exit_code == 0


def test_merge_command_matches_in_memory_merge(adapter_dir, tmp_path, input_ids):
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    runner = CliRunner()
    out = tmp_path / "merged"
    args = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(adapter_dir), "--adapter", str(adapter_dir),
            "--weight", "0.5", "--weight", "0.25", "--out", str(out), "--no-progress"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    merged = LlamaForCausalLM.from_pretrained(out).eval()
    adapted = bd.load_adapter(tiny_llama(), adapter_dir)
    for _, layer in bd.bca_layers(adapted):
        layer.scalings["default"] *= 0.75  # 0.5 + 0.25 of the same adapter
    torch.testing.assert_close(merged(input_ids=input_ids).logits, adapted(input_ids=input_ids).logits,
                               rtol=1e-5, atol=1e-5)
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "exists" in again.output
    bad = runner.invoke(main, ["merge", "--model", str(tmp_path / "base"), "--adapter", str(adapter_dir),
                               "--adapter", str(adapter_dir), "--weight", "1.0", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "got 1 --weight for 2 --adapter" in bad.output
    assert not (tmp_path / "x").exists()


def test_export_and_validate_commands(tmp_path):
    from conftest import tiny_bert

    tiny_bert().save_pretrained(tmp_path / "base")
    model = bd.inject(tiny_bert(), ["query", "value"], block_size=8, init="normal", init_std=0.1, seed=0)
    bd.save_adapter(model, tmp_path / "adapter")
    runner = CliRunner()
    common = ["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    result = runner.invoke(main, ["export", *common, "--task", "feature-extraction", "--cases", "1x5,2x9",
                                  "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert "last_hidden_state" in result.output
    ok = runner.invoke(main, ["validate", "--onnx", str(tmp_path / "onnx"), *common, "--cases", "2x7"])
    assert ok.exit_code == 0, ok.output
    # a tolerance no float computation meets: the check must fail and say so
    strict = runner.invoke(main, ["validate", "--onnx", str(tmp_path / "onnx"), *common, "--atol", "1e-12", "--rtol", "0"])
    assert strict.exit_code == 2 and "Error:" in strict.output
    bad = runner.invoke(main, ["export", *common, "--cases", "2by9", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "'2by9' is not BATCHxSEQ" in bad.output


def test_train_and_evaluate_commands(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "training"))
    from training_helpers import make_data, sst2_rows, tiny_model_dir

    data = make_data(tmp_path)
    model_dir = tiny_model_dir(tmp_path / "model", "bert", [t for t, _ in sst2_rows("train", 64)])
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--model", str(model_dir), "--data", str(data["train"]),
                                  "--eval-data", str(data["dev"]), "--out", str(tmp_path / "run"),
                                  "--targets", "query,value", "--block-size", "8", "--optimizer", "adamw",
                                  "--lr", "1e-2", "--batch-size", "8", "--max-length", "32", "--max-steps", "4"])
    assert result.exit_code == 0, result.output
    assert "done: 4 steps" in result.output
    # the outputs the next commands write lie beside the run: a later train --overwrite of it would delete them
    outs = [line.split("--out ")[1].split()[0] for line in result.output.splitlines() if "--out " in line]
    assert len(outs) == 3 and all(Path(o).parent == tmp_path and Path(o).name.startswith("run-") for o in outs), outs
    ev = runner.invoke(main, ["evaluate", "--model", str(model_dir), "--adapter", str(tmp_path / "run" / "last"),
                              "--data", str(data["dev"])])
    assert ev.exit_code == 0, ev.output
    final = json.loads((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[-1])
    assert "accuracy" in ev.output, (ev.output, final)
    missing = runner.invoke(main, ["train", "--model", str(model_dir), "--data", str(tmp_path / "nope.tsv"),
                                   "--out", str(tmp_path / "run2")])
    assert missing.exit_code == 2 and "nope.tsv" in missing.output
    assert not (tmp_path / "run2").exists()


def test_export_bank_and_its_refusals(tmp_path):
    import json

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    adapters = []
    for seed, targets in enumerate((["q_proj", "v_proj"], ["gate_proj"])):
        model = bd.inject(tiny_llama(), targets, block_size=8, init="normal", seed=seed)
        adapters.append(bd.save_adapter(model, tmp_path / f"ad{seed}"))
    runner = CliRunner()
    common = ["export", "--model", str(tmp_path / "base"), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
              "--cases", "2x5"]
    refused = runner.invoke(main, common + ["--merge", "--bank", "--out", str(tmp_path / "onnx")])
    assert refused.exit_code == 2 and "merge" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "onnx").exists()
    result = runner.invoke(main, common + ["--bank", "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert "wrote adapter-bank ONNX model" in result.output
    bank = json.loads((tmp_path / "onnx" / "bca_export.json").read_text())["bank"]
    assert bank["slots"] == [None, "ad0", "ad1"]
    assert {t["module"].rsplit(".", 1)[-1] for t in bank["tensors"]} == {"q_proj", "v_proj", "gate_proj"}
    for name in ("ad0", "ad1"):
        assert (tmp_path / "onnx" / bank["adapter_files"][name]).is_file()
    # serve refuses a graph that is not a bank, as a clean error, before binding any port
    plain = runner.invoke(main, ["export", "--model", str(tmp_path / "base"), "--adapter", str(adapters[0]),
                                 "--cases", "1x4", "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    served = runner.invoke(main, ["serve", str(tmp_path / "plain"), "--port", "1"])
    assert served.exit_code == 2 and "not an adapter-bank graph" in served.output and "--bank" in served.output


# ---- error handling, parameter types, import cost -------------------------------------------------


def test_help_imports_no_heavy_module():
    """``bca-deploy --help`` and every subcommand's ``--help`` import neither torch nor transformers/onnx."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from bca_deploy.cli import main\n"
        "runner = CliRunner()\n"
        "codes = [runner.invoke(main, ['--help']).exit_code]\n"
        "codes += [runner.invoke(main, [name, '--help']).exit_code for name in main.commands]\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime', 'optimum', 'safetensors', 'numpy')"
        " if m in sys.modules)\n"
        "print(set(codes), heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{0} []", out


def test_bca_error_is_one_clean_line_with_exit_code_2(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_bytes(b"\xff\xfe not utf-8")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "adapter")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "not UTF-8" in last and "Traceback" not in result.output


def test_os_error_exit_code_1(adapter_dir, tmp_path):
    result = CliRunner().invoke(main, ["convert", "--adapter", str(adapter_dir), "--to", "peft",
                                       "--out", "/proc/bca-deploy-test/sub"])  # procfs: nothing can be made there
    assert result.exit_code == 1 and result.output.startswith("Error: /proc/bca-deploy-test/sub: cannot write")
    assert "Traceback" not in result.output
    (tmp_path / "file").write_text("x")  # a path mistake, not the system's: the bad-input code, and why
    result = CliRunner().invoke(main, ["convert", "--adapter", str(adapter_dir), "--to", "peft",
                                       "--out", str(tmp_path / "file" / "sub")])
    assert result.exit_code == 2 and f"{tmp_path / 'file'} is a file, not a directory" in result.output


def test_reader_that_goes_away_stops_quietly(adapter_dir):
    """`bca-deploy inspect X | head -1`: the closed pipe is no error message and no traceback."""
    code = "import sys; from bca_deploy.cli import main; sys.argv[0] = 'bca-deploy'; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "inspect", str(adapter_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command has imported its modules, so its first write meets a closed pipe
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 1, stderr
    assert stderr == "", stderr


def test_unexpected_error_asks_for_a_report_and_debug_shows_it(adapter_dir, monkeypatch):
    import bca_deploy.adapter_io

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(bca_deploy.adapter_io, "read_adapter", broken)
    result = CliRunner().invoke(main, ["inspect", str(adapter_dir)])
    assert result.exit_code == 70 and "Traceback" not in result.output
    assert "Internal error (ZeroDivisionError: a bug)" in result.output and "please report" in result.output
    assert "--debug" in result.output
    shown = CliRunner().invoke(main, ["--debug", "inspect", str(adapter_dir)])
    assert isinstance(shown.exception, ZeroDivisionError)  # raised through: Python prints the traceback
    monkeypatch.setenv("BCA_DEPLOY_DEBUG", "1")
    assert isinstance(CliRunner().invoke(main, ["inspect", str(adapter_dir)]).exception, ZeroDivisionError)


def test_interrupt_exits_130(adapter_dir, monkeypatch):
    import bca_deploy.adapter_io

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bca_deploy.adapter_io, "read_adapter", interrupted)
    result = CliRunner().invoke(main, ["inspect", str(adapter_dir)])
    assert result.exit_code == 130 and "Interrupted" in result.output


def test_undecodable_path_in_a_message_is_printed(tmp_path):
    """A file name that is not UTF-8 (a lone surrogate in Python) is shown escaped, not a crash."""
    import os
    import subprocess
    import sys

    bad = os.fsencode(tmp_path) + b"/adapter-\xff"
    os.mkdir(bad)
    with open(bad + b"/adapter_config.json", "wb") as f:
        f.write(b"{")
    proc = subprocess.run([sys.executable.encode(), b"-m", b"bca_deploy.cli", b"inspect", bad], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 2, proc.stderr
    assert b"Traceback" not in proc.stderr and b"not valid JSON" in proc.stderr and b"\\udcff" in proc.stderr
    assert proc.stdout == b""  # inspect reads everything before it prints: no half description


@pytest.mark.parametrize("args, needle", [
    (["--weight", "nan"], "not a finite number"),
    (["--weight", "inf"], "not a finite number"),
    (["--weight", "1e999"], "not a finite number"),
    (["--weight", "half"], "is not a number"),
])
def test_merge_weight_must_be_finite(adapter_dir, tmp_path, args, needle):
    result = CliRunner().invoke(main, ["merge", "--model", str(tmp_path), "--adapter", str(adapter_dir), *args,
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and needle in result.output and "--weight" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cases, needle", [
    ("0x0", "must be in 1..4096"), ("2x0", "must be in 1..4096"), ("1x99999", "must be in 1..4096"),
    ("2by9", "is not BATCHxSEQ"), ("1x5,", "is not BATCHxSEQ"), ("-1x3", "is not BATCHxSEQ"),
    ("１x3", "is not BATCHxSEQ"), ("1.5x2", "is not BATCHxSEQ"),
])
def test_cases_are_checked_by_their_type(tmp_path, cases, needle):
    result = CliRunner().invoke(main, ["export", "--model", str(tmp_path), "--cases", cases, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and needle in result.output and "--cases" in result.output


@pytest.mark.parametrize("option, value", [
    ("--port", "0"), ("--port", "99999"), ("--port", "-1"), ("--port", "http"), ("--max-batch-rows", "0"),
    ("--max-batch-rows", "-3"), ("--threads", "0"), ("--max-wait-ms", "nan"), ("--max-wait-ms", "-1"),
])
def test_serve_numbers_are_checked_before_anything_starts(tmp_path, option, value):
    result = CliRunner().invoke(main, ["serve", str(tmp_path), option, value])
    assert result.exit_code == 2 and option in result.output and "Traceback" not in result.output


def test_shared_parameter_types():
    import click

    from bca_deploy.cli import CASES, FINITE_FLOAT, NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, PORT

    assert FINITE_FLOAT.convert("-2.5", None, None) == -2.5
    assert POSITIVE_FLOAT.convert("1e-3", None, None) == 1e-3
    assert NON_NEGATIVE_FLOAT.convert("0", None, None) == 0.0
    assert CASES.convert("1x5, 2x11", None, None) == [(1, 5), (2, 11)]
    assert PORT.convert("8080", None, None) == 8080
    for kind, value in ((POSITIVE_FLOAT, "0"), (NON_NEGATIVE_FLOAT, "-0.5"), (FINITE_FLOAT, "-inf")):
        with pytest.raises(click.BadParameter):
            kind.convert(value, None, None)


def test_serve_max_new_tokens_is_bounded_by_what_one_row_can_generate(tmp_path):
    from bca_deploy.serving.limits import MAX_NEW_TOKENS
    from bca_deploy.serving.options import ServeOptions

    assert ServeOptions(max_new_tokens=MAX_NEW_TOKENS).max_new_tokens == MAX_NEW_TOKENS
    for command in ("serve", "serve-ray"):
        result = CliRunner().invoke(main, [command, str(tmp_path), "--max-new-tokens", str(MAX_NEW_TOKENS + 1)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert f"--max-new-tokens: {MAX_NEW_TOKENS + 1} is out of range; expected in [1, {MAX_NEW_TOKENS}]" \
            in result.output, result.output


def test_serve_ray_offers_only_the_options_ray_applies(tmp_path):
    from bca_deploy.serving.options import NOT_ON_RAY

    # shutdown_timeout_s: how long serve's own uvicorn waits for requests at a signal (Ray Serve drains its own)
    assert NOT_ON_RAY == {"header_timeout_s", "max_connections", "max_header_bytes", "shutdown_timeout_s"}
    flags = ["--header-timeout-s", "--max-connections", "--max-header-bytes", "--shutdown-timeout-s"]
    serve_help = CliRunner().invoke(main, ["serve", "--help"]).output
    ray_help = CliRunner().invoke(main, ["serve-ray", "--help"]).output
    assert all(flag in serve_help for flag in flags)
    assert not any(flag in ray_help for flag in flags), ray_help
    assert "--max-text-chars" in ray_help and "--body-timeout-s" in ray_help  # what Ray applies stays
    refused = CliRunner().invoke(main, ["serve-ray", str(tmp_path), "--max-connections", "3"])
    assert refused.exit_code == 2 and "No such option" in refused.output and "--max-connections" in refused.output


def test_export_help_says_what_several_adapters_do():
    text = " ".join(CliRunner().invoke(main, ["export", "--help"]).output.split())
    assert "they sum (merged or unmerged graphs), or each gets its own slot (--bank)" in text, text


def test_inspect_shows_control_characters_from_the_files_escaped(tmp_path):
    """Names and labels come from the adapter's files: an OSC sequence in base_model.name_or_path retitled the
    terminal, a CR/LF in a label forged an output line ("saved whole:  nothing")."""
    import json

    from bca_deploy.config import task_spec_from_config
    from bca_deploy.inject import adapter_configs
    from conftest import tiny_bert

    model = bd.inject(tiny_bert(num_labels=2), ["query"], block_size=8, modules_to_save=["classifier"])
    adapter_configs(model)["default"].task = task_spec_from_config("seq-cls", model.config, ["classifier"])
    bd.save_adapter(model, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    data = json.loads(path.read_text())
    names = {"0": "neg\x1b[2J\x1b[31mFAKE", "1": "pos\r\nsaved whole:  nothing"}
    data["task"]["head"]["id2label"], data["task"]["head"]["label2id"] = names, {v: int(k) for k, v in names.items()}
    data["base_model"]["name_or_path"] = "/models/x\x1b]0;pwned\x07"
    path.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "ad")])
    assert result.exit_code == 0, result.output
    assert not any(c in result.output for c in "\x1b\x07\r"), repr(result.output)
    assert "x\\x1b]0;pwned\\x07" in result.output and "pos\\r\\nsaved whole:  nothing" in result.output
    assert [line for line in result.output.splitlines() if line.startswith("saved whole:")] == [
        "saved whole:  classifier (66 parameters)"]


def test_the_opset_range_is_the_exporters_and_each_refusal_says_why(tmp_path):
    from bca_deploy.exporters.export import MAX_OPSET, MIN_OPSET
    from conftest import tiny_bert

    text = " ".join(CliRunner().invoke(main, ["export", "--help"]).output.split())
    assert f"--opset {MIN_OPSET}..{MAX_OPSET} ONNX opset" in text and "x>=1" not in text, text
    tiny_bert().save_pretrained(tmp_path / "base")
    for opset, why in (("0", f"use opset >= {MIN_OPSET}"), (str(MIN_OPSET - 1), f"use opset >= {MIN_OPSET}"),
                       (str(MAX_OPSET + 1), f"above {MAX_OPSET}"), ("x", "'x' is not a valid integer")):
        result = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "base"), "--merge", "--opset", opset,
                                           "--out", str(tmp_path / "onnx")])
        assert result.exit_code == 2 and why in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("command, extra", [("serve", "serve"), ("serve-ray", "ray")])
def test_serve_without_onnxruntime_names_the_whole_install(tmp_path, monkeypatch, command, extra):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    result = CliRunner().invoke(main, [command, str(tmp_path)])
    # exit code 2, as export's missing onnx (the README's table): one rule for every missing optional package
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.startswith(f"Error: bca-deploy {command} needs onnxruntime and the {extra} packages")
    assert "onnxruntime is missing" in result.output and f"pip install 'bca-deploy[onnx,{extra}]'" in result.output


def test_an_error_echoing_a_huge_value_is_cut(tmp_path):
    """A 100,000-character value came back whole in the error (every message quotes what the user gave)."""
    result = CliRunner().invoke(main, ["train", "--model", "q" * 100_000, "--data", "d.tsv", "--out",
                                       str(tmp_path / "o")])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output[:300]
    assert result.output.startswith("Error: qqq") and len(result.output) < 2_000 and "more characters)" in result.output


def test_a_run_that_did_not_finish_is_used_with_a_note(tmp_path):
    """A run stopped at step 138 of 3000 left last/ at step 100: every stage took it as the run's adapter without a
    word (helper-75). It is still used (its checkpoint is whole), and each command says the run did not finish."""
    import bca_deploy as bd
    from conftest import tiny_bert

    model = tiny_bert()
    bd.inject(model, ["query"], block_size=8)
    bd.save_adapter(model, tmp_path / "run" / "last")
    stopped = CliRunner().invoke(main, ["inspect", str(tmp_path / "run")])
    assert stopped.exit_code == 0, stopped.output
    assert f"note: {tmp_path / 'run'} has no train_result.json: its training did not finish" in stopped.output
    (tmp_path / "run" / "train_result.json").write_text("{}")
    done = CliRunner().invoke(main, ["inspect", str(tmp_path / "run")])
    assert done.exit_code == 0 and "did not finish" not in done.output, done.output
    alone = CliRunner().invoke(main, ["inspect", str(tmp_path / "run" / "last")])  # an adapter directory: as given
    assert alone.exit_code == 0 and "note:" not in alone.output, alone.output


def _tiny_mixtral():
    """A 2-layer random Mixtral (mixture of experts): a model type bca-deploy adapts but does not export to ONNX."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, num_local_experts=2)
    return MixtralForCausalLM(cfg).eval()


def _peft_adapter(base_dir: Path, out: Path) -> Path:
    """A PEFT C3A CAUSAL_LM adapter saved by PEFT on the model in ``base_dir`` (it records that directory)."""
    from peft import C3AConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(base, C3AConfig(block_size=8, target_modules=["q_proj", "v_proj"],
                                   task_type="CAUSAL_LM")).save_pretrained(out)
    return out


def _line(output: str, label: str) -> str:
    found = [line for line in output.splitlines() if line.startswith(f"{label}:")]
    assert len(found) == 1, (label, output)
    return found[0]


def test_inspect_says_what_export_would_do_with_the_adapter(tmp_path):
    """helper-91: inspect said "exports as text-generation-with-past" for an adapter of a Mixtral (MoE) base, which
    export refuses; it now applies export's own rule (the recorded local base checkpoint when there is one)."""
    import json

    from bca_deploy.exporters import UnsupportedExportError, resolve_export_task

    runner = CliRunner()
    tiny_llama().save_pretrained(tmp_path / "llama")
    _tiny_mixtral().save_pretrained(tmp_path / "mixtral")
    for name in ("llama", "mixtral"):
        _peft_adapter(tmp_path / name, tmp_path / f"peft-{name}")
    # the reference: what export itself decides for each
    assert resolve_export_task(tmp_path / "llama", [tmp_path / "peft-llama"]).export_task == "text-generation-with-past"
    with pytest.raises(UnsupportedExportError, match="cannot export model_type 'mixtral'"):
        resolve_export_task(tmp_path / "mixtral", [tmp_path / "peft-mixtral"])
    result = runner.invoke(main, ["inspect", str(tmp_path / "peft-llama")])
    assert result.exit_code == 0, result.output
    assert _line(result.output, "export") == (f"export:       text-generation-with-past (checked against its base model "
                                              f"{tmp_path / 'llama'})")
    result = runner.invoke(main, ["inspect", str(tmp_path / "peft-mixtral")])
    assert result.exit_code == 0, result.output
    assert "exports as" not in result.output and "text-generation-with-past" not in result.output, result.output
    assert _line(result.output, "export").startswith(
        f"export:       NOT exportable to ONNX: {tmp_path / 'mixtral'}: bca-deploy cannot export model_type 'mixtral'")
    # a bca-deploy adapter records its base model type: the same rule without a local base directory
    model = bd.inject(_tiny_mixtral(), ["q_proj", "v_proj"], block_size=8, init="normal", seed=0)
    bd.save_adapter(model, tmp_path / "bca-mixtral")
    result = runner.invoke(main, ["inspect", str(tmp_path / "bca-mixtral")])
    assert result.exit_code == 0 and "NOT exportable to ONNX: bca-deploy cannot export model_type 'mixtral'" in \
        _line(result.output, "export"), result.output
    # an exportable type whose recorded task its architecture does not export (a bert adapter recording causal-lm)
    from conftest import tiny_bert

    model = bd.inject(tiny_bert(), ["query"], block_size=8)
    path = bd.save_adapter(model, tmp_path / "bca-bert")
    data = json.loads((path / "adapter_config.json").read_text())
    data["task"] = {"type": "causal-lm"}
    (path / "adapter_config.json").write_text(json.dumps(data))
    result = runner.invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0 and "NOT exportable to ONNX: bca-deploy cannot export a bert model for task " \
        "'text-generation-with-past'" in _line(result.output, "export"), result.output


def test_inspect_reports_a_peft_adapters_local_base_model(tmp_path):
    """helper-91: a PEFT adapter recording a local base directory read "base model: unknown (/local/dir)"; it is
    described as the commands resolve it (bca_deploy.adapter_io.local_base_dir), with its type and architecture."""
    import json

    tiny_llama().save_pretrained(tmp_path / "llama")
    adapter = _peft_adapter(tmp_path / "llama", tmp_path / "peft")
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(adapter)])
    assert result.exit_code == 0, result.output
    assert _line(result.output, "base model") == \
        f"base model:   llama ({tmp_path / 'llama'}: local directory, LlamaForCausalLM)"
    data = json.loads((adapter / "adapter_config.json").read_text())
    for recorded, why in ((str(tmp_path / "gone"), "not found on this machine"),
                          (str(tmp_path), "a directory without config.json, not a model directory"),
                          ("someone/some-model", "no such local directory: a hub model id? nothing is downloaded")):
        (adapter / "adapter_config.json").write_text(json.dumps({**data, "base_model_name_or_path": recorded}))
        result = runner.invoke(main, ["inspect", str(adapter)])
        assert result.exit_code == 0, result.output
        assert _line(result.output, "base model") == (f"base model:   unknown ({recorded}: {why}; the commands take "
                                                      "the base model with --model)")
        # without a base to check against, the task it records, if the base given to export is one it exports
        assert _line(result.output, "export") == ("export:       text-generation-with-past (if the base model passed "
                                                  "with --model is one bca-deploy exports)")


def test_inspect_names_the_other_peft_adapters_saved_beside_default(tmp_path):
    """helper-95: a PeftModel with two adapters saves 'default' in DIR and 'other' in DIR/other; inspect DIR described
    'default' alone, so the user exported DIR expecting both. It now names DIR/other, which is inspected on its own."""
    from peft import C3AConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "llama")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "llama"),
                           C3AConfig(block_size=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.add_adapter("other", C3AConfig(block_size=8, target_modules=["v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "other" / "adapter_config.json").is_file()  # PEFT's layout
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    assert _line(result.output, "targets") == "targets:      ['q_proj']"
    also = _line(result.output, "also holds")
    assert "the adapter directory other/" in also and f"pass {tmp_path / 'peft' / 'other'} to inspect" in also
    result = runner.invoke(main, ["inspect", str(tmp_path / "peft" / "other")])
    assert result.exit_code == 0, result.output
    assert _line(result.output, "targets") == "targets:      ['v_proj']" and "also holds" not in result.output

def test_inspect_names_a_model_directory_and_a_head_only_checkpoint(tmp_path):
    """helper-91: a merged model (or any base checkpoint) and a --method head-only run's checkpoint both read
    "neither an adapter directory nor an ONNX export"; each is now named for what it is."""
    from bca_deploy.config import TRAINABLE_FILE

    tiny_llama().save_pretrained(tmp_path / "merged")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "merged")])
    assert result.exit_code == 2 and "it is a transformers model directory (llama, LlamaForCausalLM: a base model, " \
        "or one merge wrote): merge, export and train take it as --model" in result.output, result.output
    (tmp_path / "run" / "last").mkdir(parents=True)
    (tmp_path / "run" / "last" / TRAINABLE_FILE).write_bytes(b"")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "run")])
    assert result.exit_code == 2 and "a checkpoint of a --method head-only/custom run" in result.output, result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "empty")])
    assert result.exit_code == 2 and result.output.rstrip().endswith("nor an ONNX export (no model.onnx)"), \
        result.output


@pytest.mark.parametrize("command", [["inspect"], ["merge", "--model", "{model}", "--out", "{out}", "--adapter"]])
def test_a_file_given_for_an_adapter_directory_is_refused_naming_its_folder(command, tmp_path):
    """``inspect runs/x/best/adapter_config.json`` (or ``model.onnx``): exit 2, the folder to give instead named,
    before anything is read or written (click said only "Directory ... is a file.")."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (tmp_path / "model").mkdir()
    args = [a.format(model=tmp_path / "model", out=tmp_path / "out") for a in command]
    result = CliRunner().invoke(main, [*args, str(folder / "adapter_config.json")])
    assert result.exit_code == 2, result.output
    assert "is a file; give the directory that holds it" in result.output and str(folder) in result.output, \
        result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_inspect_names_a_regression_head_as_such(tmp_path):
    """A regression adapter (float labels: one output, MSE) read "head classifier with 1 labels (LABEL_0)", as if it
    classified into one class; it now reads as train's summary says it: regression (1 output)."""
    from conftest import tiny_bert

    from bca_deploy.config import task_spec_from_config
    from bca_deploy.inject import adapter_configs

    model = tiny_bert(num_labels=1)
    model.config.problem_type = "regression"
    bd.inject(model, ["query"], block_size=8, modules_to_save=["classifier"])
    adapter_configs(model)["default"].task = task_spec_from_config("seq-cls", model.config, ["classifier"])
    path = bd.save_adapter(model, tmp_path / "sts")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert _line(result.output, "task") == ("task:         seq-cls (BertForSequenceClassification, head classifier: "
                                            "regression (1 output))")
