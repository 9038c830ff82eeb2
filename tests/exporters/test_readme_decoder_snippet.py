"""The README's plain-onnxruntime decoding snippet (ONNX export, "Loading") runs as written on a merged
text-generation-with-past export and picks PyTorch ``generate(do_sample=False)``'s tokens."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from exporters_helpers import exported, tiny  # noqa: F401  (fixtures)

from bca_deploy.exporters.loading import load_model

README = Path(__file__).resolve().parents[2] / "README.md"


def _decoder_snippet() -> str:
    """The README's python block that feeds ``past_key_values``: the one a decoder export needs."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    found = [b for b in blocks if "InferenceSession" in b and "past_key_values." in b]
    assert len(found) == 1, "README.md should show one plain-onnxruntime decoding loop for a decoder export"
    return found[0]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_readme_decoder_snippet_matches_generate(exported, tiny, name):  # noqa: F811
    pytest.importorskip("onnxruntime")
    snippet = _decoder_snippet()
    out = exported(name, "merged")
    assert '"onnx-merged/model.onnx"' in snippet
    code = snippet.replace('"onnx-merged/model.onnx"', repr(str(out / "model.onnx")))
    new = int(re.search(r"for _ in range\((\d+)\)", code).group(1))
    prompt = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    scope: dict = {"prompt_ids": prompt[0].tolist()}
    exec(compile(code, "README.md", "exec"), scope)  # the snippet as written, only its path replaced
    model_dir, adapter_dirs = tiny(name)
    reference = load_model(model_dir, "text-generation-with-past", adapter_dirs)
    want = reference.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert scope["tokens"] == want[0].tolist()
