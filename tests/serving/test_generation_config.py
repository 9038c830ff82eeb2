"""The checkpoint's ``generation_config.json`` (export copies it) is read as vLLM and PyTorch ``generate`` read it:
its end-of-sequence ids end a row, and its sampling values are the defaults of an OpenAI request that gives none.

Chat checkpoints often name their end-of-turn token only there (Llama-3's ``eos_token_id: [128001, 128008,
128009]``); a server that stops at ``config.json``'s id alone runs on into the next turn.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import ServeProcess, bank, openai_client  # noqa: E402

from bca_deploy.serving import MultiAdapterSession  # noqa: E402
from bca_deploy.serving.session import GenerationDefaults  # noqa: E402

PROMPT = "the water is hot and"
STEPS = 10


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return bank("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def stop_token(llama):
    """(prompt ids, greedy tokens of the base model without any generation config, an id it makes at step 3 that
    is no end-of-sequence id and not made before)."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    prompt = session.tokenize([PROMPT])[0]
    tokens = session.generate([prompt], [None], max_new_tokens=STEPS, eos_token_id=[])[0]
    step = next(i for i in range(2, STEPS) if tokens[i] not in tokens[:i] and tokens[i] != 2)
    return prompt, tokens, step


@pytest.fixture(scope="module")
def with_generation_config(llama, stop_token, tmp_path_factory):
    """The llama export with a generation_config.json naming a second end-of-sequence id and top_k 1 (greedy)."""
    _, tokens, step = stop_token
    directory = tmp_path_factory.mktemp("generation-config") / "onnx"
    shutil.copytree(llama["onnx"], directory)
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, tokens[step]], "do_sample": True, "top_k": 1}))
    return directory


def test_generation_stops_at_every_end_of_sequence_id_as_pytorch_generate(llama, stop_token, with_generation_config):
    from transformers import AutoModelForCausalLM, GenerationConfig

    prompt, tokens, step = stop_token
    session = MultiAdapterSession(with_generation_config, intra_op_threads=1)
    assert session.eos_token_ids == {2, tokens[step]}
    served = session.generate([prompt], [None], max_new_tokens=STEPS)[0]
    assert served == tokens[:step + 1]

    model = AutoModelForCausalLM.from_pretrained(str(llama["model"])).eval()
    config = GenerationConfig(eos_token_id=[2, tokens[step]], do_sample=False, max_new_tokens=STEPS, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   generation_config=config)[0, len(prompt):].tolist()
    assert served == reference


def test_openai_requests_take_its_sampling_defaults_and_stop_ids(llama, stop_token, with_generation_config, tmp_path):
    _, tokens, step = stop_token
    with ServeProcess(with_generation_config, "--served-model-name", "tiny-llama", "--max-wait-ms", "2",
                      log=tmp_path / "serve.log") as server:
        client = openai_client(server.url, timeout=60)
        # no temperature / top_k: the file's top_k 1 makes the sampled answer the greedy one, whatever the seed
        for seed in (3, 4):
            sampled = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=STEPS, seed=seed)
            greedy = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=STEPS, temperature=0)
            assert sampled.choices[0].text == greedy.choices[0].text
            assert greedy.choices[0].finish_reason == "stop"
            assert greedy.usage.completion_tokens == step + 1  # the end-of-sequence token counts, as vLLM counts it
        # a request's own value wins over the file's: sampling at temperature 1 with every token allowed
        texts = {client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=STEPS, seed=s,
                                           temperature=1, extra_body={"top_k": -1}).choices[0].text for s in range(4)}
        assert len(texts) > 1


def test_values_transformers_would_not_mean_are_ignored_and_named(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"eos_token_id": [2, "x"], "temperature": -1, "top_p": 0, "top_k": 1.5}))
    defaults = GenerationDefaults.read(path)
    assert (defaults.eos_token_ids, defaults.temperature, defaults.top_p, defaults.top_k) == ((), None, None, None)
    assert len(defaults.problems) == 4
    assert all(str(path) in p and "ignored" in p for p in defaults.problems)
    assert "temperature -1" in " ".join(defaults.problems)
    path.write_text(json.dumps({"eos_token_id": 7, "temperature": 2.5, "top_p": 0.9, "top_k": 40}))  # transformers'
    assert GenerationDefaults.read(path) == GenerationDefaults((7,), 2.5, 0.9, 40)

    # settings transformers' generate() applies and the server does not: named, never silently dropped (helper-78:
    # a checkpoint's repetition_penalty 1.3 changed generate's greedy text; the server's answers did not say so). The
    # repetition penalty is applied now (test_penalties.py), so it is no longer named.
    path.write_text(json.dumps({"eos_token_id": 7, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3,
                                "num_beams": 1, "min_length": 0, "bad_words_ids": [], "suppress_tokens": None}))
    defaults = GenerationDefaults.read(path)
    assert defaults.eos_token_ids == (7,) and len(defaults.problems) == 1, defaults.problems  # the neutral ones: not
    assert defaults.repetition_penalty == 1.3
    assert "no_repeat_ngram_size 3: this server does not apply it" in defaults.problems[0]

    path.write_text("{not json")
    (problem,) = GenerationDefaults.read(path).problems
    assert str(path) in problem and "not used" in problem
    assert GenerationDefaults.read(tmp_path / "absent.json") == GenerationDefaults()


def test_end_of_sequence_ids_outside_the_vocabulary_are_said_at_start(llama, tmp_path):
    directory = tmp_path / "onnx"
    shutil.copytree(llama["onnx"], directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 10**30, 128], "top_p": 0}))
    session = MultiAdapterSession(directory, intra_op_threads=1)
    assert session.eos_token_ids == {2}
    notes = session.generation_notes
    assert len(notes) == 2 and "top_p 0 is not a number" in notes[0]
    assert f"eos_token_id {10**30}, 128 outside the model's 128 token ids (ignored)" in notes[1]
