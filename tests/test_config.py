"""AdapterConfig: JSON round trip, block-size rules, validation messages."""

from __future__ import annotations

import pytest

from bca_deploy.config import AdapterConfig, ModuleSpec, block_size_for, run_adapter_dir, valid_block_sizes
from bca_deploy.errors import AdapterFormatError


def test_valid_block_sizes_are_common_divisors():
    assert valid_block_sizes(384, 1536) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 384]
    assert valid_block_sizes(30, 45) == [1, 3, 5, 15]


def test_block_size_pattern_follows_peft_semantics():
    pattern = {"layers.0.self_attn.q_proj": 4, "down_proj": 16, r"layers\.[12]\.mlp\.up_proj": 2}
    assert block_size_for("model.layers.0.self_attn.q_proj", 8, pattern) == 4
    assert block_size_for("model.layers.10.self_attn.q_proj", 8, pattern) == 8
    assert block_size_for("model.layers.3.mlp.down_proj", 8, pattern) == 16
    assert block_size_for("model.layers.2.mlp.up_proj", 8, pattern) == 2
    assert block_size_for("model.layers.3.mlp.up_proj", 8, pattern) == 8
    assert block_size_for("down_proj", 8, pattern) == 16  # an exact path matches too


def test_json_round_trip(tmp_path):
    config = AdapterConfig(
        target_modules=["q_proj"], block_size=8, block_size_pattern={"q_proj": 4}, scaling=0.5, init="normal",
        modules={"a.q_proj": ModuleSpec(4, 0.5, 32, 64), "b.c_attn": ModuleSpec(8, 1 / 3, 32, 96, "conv1d")},
        modules_to_save=["classifier"], base_model_type="llama", base_model_name_or_path="/m",
    )
    config.save(tmp_path / "c.json")
    assert AdapterConfig.load(tmp_path / "c.json") == config
    assert config.modules["b.c_attn"].weight_shape == (32, 96)
    assert config.modules["a.q_proj"].weight_shape == (64, 32)
    assert config.modules["a.q_proj"].kernel_shape == (16, 8, 4)
    assert config.num_parameters == 32 * 64 // 4 + 32 * 96 // 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"init": "ones"}, "init must be one of"),
        ({"scaling": float("nan")}, "scaling must be finite"),
        ({"block_size_pattern": {"q": -1}}, r"block_size_pattern\['q'\] must be a positive integer"),
        ({"modules": {"m": ModuleSpec(3, 1.0, 32, 32)}}, "module m: block size 3 does not divide"),
        ({"modules": {"m": ModuleSpec(4, 1.0, 32, 32, "conv2d")}}, "module m: layer_type must be one of"),
    ],
)
def test_invalid_values_refused(kwargs, message):
    base = {"target_modules": ["q"], "block_size": 8}
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**{**base, **kwargs})


def test_wrong_format_names_the_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"format": "something-else"}')
    with pytest.raises(AdapterFormatError, match=f"{path}: 'format' is 'something-else'"):
        AdapterConfig.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(AdapterFormatError, match="expected a JSON object, got a list"):
        AdapterConfig.load(path)


def _head(**overrides):
    from bca_deploy.config import HeadSpec

    fields = {"modules": ["classifier"], "num_labels": 2, "id2label": {0: "neg", 1: "pos"},
              "label2id": {"neg": 0, "pos": 1}, "problem_type": "single_label_classification"}
    return HeadSpec(**{**fields, **overrides})


def test_task_spec_round_trip(tmp_path):
    from bca_deploy.config import TaskSpec

    config = AdapterConfig(
        target_modules=["query"], block_size=8, modules={"bert.q": ModuleSpec(8, 1.0, 32, 32)},
        modules_to_save=["classifier"],
        task=TaskSpec("seq-cls", "BertForSequenceClassification", _head()),
    )
    config.save(tmp_path / "c.json")
    loaded = AdapterConfig.load(tmp_path / "c.json")
    assert loaded == config
    assert loaded.task.export_task == "text-classification"
    assert loaded.task.head.id2label == {0: "neg", 1: "pos"}


def test_adapters_without_task_still_load(tmp_path):
    config = AdapterConfig(target_modules=["q"], block_size=8, modules={"q": ModuleSpec(8, 1.0, 32, 32)})
    data = config.to_dict()
    del data["task"]  # files written before the task entry existed
    assert AdapterConfig.from_dict(data).task is None


@pytest.mark.parametrize(
    "head, message",
    [
        ({"num_labels": 0}, "num_labels must be an integer in 1..100000"),
        ({"num_labels": 10**9}, "num_labels must be an integer"),
        ({"id2label": {0: "neg"}, "label2id": {"neg": 0}}, r"id2label must name every class 0..1"),
        ({"label2id": {"neg": 1, "pos": 0}}, "label2id must be the inverse of id2label"),
        # label2id built from id2label (as transformers builds it) keeps one class of a name given twice
        ({"id2label": {0: "dup", 1: "dup"}, "label2id": {"dup": 1}}, "id2label names must be distinct .*'dup' names "
                                                                     "classes 0 and 1"),
        ({"modules": ["score"]}, r"task.head.modules \['score'\] are not in modules_to_save"),
        ({"problem_type": "ranking"}, "problem_type 'ranking'"),
    ],
)
def test_invalid_task_head_refused(head, message):
    from bca_deploy.config import TaskSpec

    with pytest.raises(ValueError, match=message):
        AdapterConfig(target_modules=["q"], block_size=8, modules_to_save=["classifier"],
                      task=TaskSpec("seq-cls", None, _head(**head)))


def test_malformed_task_entry_names_the_file(tmp_path):
    config = AdapterConfig(target_modules=["q"], block_size=8, modules={"q": ModuleSpec(8, 1.0, 32, 32)})
    data = config.to_dict()
    path = tmp_path / "adapter_config.json"
    import json

    for task, message in (("seq-cls", "'task' must be an object"),
                          ({"type": "seq-cls", "head": [1]}, "'task.head' must be an object"),
                          ({"type": "translation"}, "task.type 'translation'"),
                          ({"type": "seq-cls", "head": {"modules": ["classifier"], "num_labels": 2,
                                                         "id2label": {"a": "x", "1": "y"}}}, "key 'a' is not an integer")):
        path.write_text(json.dumps({**data, "task": task}))
        with pytest.raises(AdapterFormatError, match=message) as info:
            AdapterConfig.load(path)
        assert str(path) in str(info.value)


def test_task_spec_from_transformers_config():
    from transformers import BertConfig

    from bca_deploy.config import task_spec_from_config

    cfg = BertConfig(num_labels=3, architectures=["BertForSequenceClassification"])
    spec = task_spec_from_config("seq-cls", cfg, ["classifier"])
    assert spec.architecture == "BertForSequenceClassification"
    assert spec.head.num_labels == 3 and spec.head.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    cfg.id2label = {0: "neg", 1: "neu", 2: "pos"}
    assert task_spec_from_config("seq-cls", cfg, ["classifier"]).head.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert task_spec_from_config("seq-cls", cfg, None).head is None  # the base model's head, shared
    assert task_spec_from_config("causal-lm", cfg, None).type == "causal-lm"


def test_a_training_run_stands_for_its_best_else_its_last_adapter(tmp_path):
    def adapter(path):
        path.mkdir(parents=True)
        (path / "adapter_config.json").write_text("{}")
        return path

    run = tmp_path / "run"
    assert run_adapter_dir(run) == run  # nothing there: returned as given, for the reader's error
    last = adapter(run / "last")
    assert run_adapter_dir(run) == last  # no --eval-data: no best/
    best = adapter(run / "best")
    assert run_adapter_dir(run) == best
    assert run_adapter_dir(best) == best and run_adapter_dir(last) == last
    plain = adapter(tmp_path / "plain")
    adapter(plain / "best")  # an adapter directory stands for itself, whatever it holds
    assert run_adapter_dir(plain) == plain


def test_tokenizer_files_are_those_present_by_name_whatever_they_are(tmp_path):
    """The one walk of a saved tokenizer's files (load_saved_tokenizer and inspect's export check use it): each name
    present in TOKENIZER_READS order, a dangling link and a pipe included; a tokenizer is there only when one of
    TOKENIZER_FILES is."""
    import os

    from bca_deploy.config import TOKENIZER_READS, has_tokenizer_files, tokenizer_files

    assert list(tokenizer_files(tmp_path)) == [] and not has_tokenizer_files(tmp_path)
    (tmp_path / "special_tokens_map.json").symlink_to(tmp_path / "nowhere")  # dangling: present
    (tmp_path / "unrelated.txt").write_text("x")
    assert list(tokenizer_files(tmp_path)) == [tmp_path / "special_tokens_map.json"]
    assert not has_tokenizer_files(tmp_path)  # no tokenizer: nothing loads one here
    os.mkfifo(tmp_path / "vocab.txt")
    (tmp_path / "chat_template.jinja").mkdir()
    (tmp_path / "tokenizer.json").write_text("{}")
    expected = [n for n in TOKENIZER_READS if n in {"special_tokens_map.json", "vocab.txt", "chat_template.jinja",
                                                    "tokenizer.json"}]
    assert [p.name for p in tokenizer_files(tmp_path)] == expected and has_tokenizer_files(tmp_path)


def test_modules_to_save_owners_are_looked_up_as_the_rule_tests_them():
    """helper-105: which modules_to_save entry holds a module was found by testing every entry against every module
    (4,000 of each: 4.4 s; 50,000: minutes), and each saved tensor's owner so too (fit.split_saved_key). PathOwners
    looks up prefixes instead: the same owners as the rule ``name == m or name.startswith(m + ".")`` tested entry by
    entry, the first listed one named, the longest one owning a tensor."""
    from bca_deploy.config import PathOwners
    from bca_deploy.fit import split_saved_key

    entries = ["a.b", "a", "a.bc", "x.y.z", "a.b", "q"]
    owners = PathOwners(entries)
    for name in ("a", "a.b", "a.b.c", "a.bc.d", "a.bcd", "ab.c", "x.y.z.w", "x.y", "q.r", "r", "a..b", ".a",
                 "a.b.c.weight"):
        reference = [m for m in dict.fromkeys(entries) if name == m or name.startswith(m + ".")]
        assert sorted(owners.of(name)) == sorted(reference), name
        assert sorted(owners.of(name, itself=False)) == sorted(m for m in reference if m != name), name
        assert owners.first_of(name) == (reference[0] if reference else None), name
        # the saved module a tensor belongs to (the longest owner), looked up as the list is searched
        assert split_saved_key(name, owners) == split_saved_key(name, entries), name
    with pytest.raises(AdapterFormatError, match=r"module a\.b\.c: adapted, but also inside a\.b, which"):
        AdapterConfig.from_dict({**AdapterConfig(target_modules=["c"], block_size=1).to_dict(),
                                 "modules": {"a.b.c": {"block_size": 1, "scaling": 1.0, "in_features": 2,
                                                       "out_features": 2}}, "modules_to_save": ["a.b", "a"]})


def test_a_config_read_is_validated_once(monkeypatch, tmp_path):
    """helper-105: from_dict checked the whole config, then built it with cls(**kwargs), whose __post_init__ checked it
    all again: twice the time for a 14 MB config of 100,000 modules."""
    config = AdapterConfig(target_modules=["q"], block_size=4, modules={"a.q": ModuleSpec(4, 1.0, 8, 8)})
    config.save(tmp_path / "c.json")
    calls = []
    checked = AdapterConfig.problems
    monkeypatch.setattr(AdapterConfig, "problems", lambda self: calls.append(1) or checked(self))
    assert AdapterConfig.load(tmp_path / "c.json") == config
    assert len(calls) == 1
