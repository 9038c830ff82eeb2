"""Tensor names are the file's: an error or warning that names one must not let it drive the terminal.

A safetensors header may name a tensor anything: an ESC sequence that retitles or recolours the terminal, a NUL,
U+202E (which shows what follows reversed), a line break that forges a line of the message ("Error: ..."), 20,000
characters. Every such name was printed raw by ``inspect``, ``merge`` and ``convert``. Now the CLI escapes what is not
printable in every line it prints as an error or warning, and the fit rule shows a name from the file escaped and cut.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bca_deploy as bd  # noqa: E402
from adversarial_helpers import assert_clean_cli_error, run_cli  # noqa: E402
from bca_deploy.errors import AdapterFormatError  # noqa: E402
from conftest import tiny_bert  # noqa: E402

_HOSTILE = "\x1b]0;owned\x07\x1b[31mred\x00\u202e" + "\nError: a forged line" + "y" * 20_000


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("names")
    model = tiny_bert()
    model.save_pretrained(root / "model")
    bd.inject(model, ["query"], block_size=8)
    bd.save_adapter(model, root / "good")
    adapter = root / "adapter"
    bd.save_adapter(model, adapter)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    state[_HOSTILE] = torch.zeros(1)
    save_file(state, str(adapter / "adapter_model.safetensors"))
    return {"model": root / "model", "adapter": adapter}


def test_the_library_message_names_it_escaped_and_cut(made):
    with pytest.raises(AdapterFormatError) as caught:
        bd.read_adapter(made["adapter"])
    message = str(caught.value)
    assert "\x1b" not in message and "\x00" not in message and "\u202e" not in message, message[:300]
    assert "\nError: a forged line" not in message
    assert r"tensor \x1b]0;owned\x07\x1b[31mred\x00\u202e\nError: a forged line" in message, message[:300]
    assert "(20,041 characters): unexpected" in message and len(message) < 2_000, message[:300]


@pytest.mark.parametrize("command", ["inspect", "merge", "convert"])
def test_the_cli_never_prints_it_raw(made, command, tmp_path):
    args = {"inspect": ["inspect", made["adapter"]],
            "merge": ["merge", "--model", made["model"], "--adapter", made["adapter"], "--out", tmp_path / "m",
                      "--no-progress"],
            "convert": ["convert", "--adapter", made["adapter"], "--to", "peft", "--out", tmp_path / "c"]}[command]
    result = run_cli(args)
    assert_clean_cli_error(result, args)
    output = result.output
    assert not any(c in output for c in "\x1b\x00\x07\u202e"), repr(output[:400])
    assert not any(line.startswith("Error: a forged line") for line in output.splitlines()), output[:400]
    assert "owned" in output  # named all the same, escaped
