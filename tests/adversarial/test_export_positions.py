"""An export whose ``config.json`` (or ``tokenizer_config.json``) claims more positions than its graph's position table.

``serve`` held requests to the config's ``max_position_embeddings`` / ``n_positions`` and the tokenizer's
``model_max_length``. Edited to claim more than the exported table holds (a careless or hostile edit: a BERT whose
config says 4× its 64 rows), every row longer than the real table reached onnxruntime, which failed in the position
lookup (Gather index out of range; BERT: the sliced position ids no longer broadcast), and the server answered 500;
texts were truncated at the claimed length, so long texts failed the same way. Now the session reads the graph's own
table at load (:func:`bca_deploy.exporters.validate.graph_position_tables`) and holds requests to the lower of the
two: a longer row gets the usual context-length error (HTTP 400), texts are cut at the table, the answers within it
are those of the untouched export, and ``serve`` says once at start-up that the file claims more than the graph has.

Covered: BERT (position ids sliced from a constant inside the graph), RoBERTa (positions counted past the padding
index: offset pad + 1, taken from the graph, not from the config's ``pad_token_id``), GPT-2 (``n_positions``; position
ids fed as an input; generation), Llama (rotary positions: no table, its config limit kept).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporters"))
from exporters_helpers import build_model  # noqa: E402
from http_helpers import WORDS, assert_error, call, write_wordpiece_tokenizer  # noqa: E402
from serving_helpers import save_tiny_adapter  # noqa: E402

from bca_deploy.errors import ContextLengthError  # noqa: E402
from bca_deploy.serving import MultiAdapterSession  # noqa: E402

TABLE = 64  # build_model's position table (RoBERTa: 66 rows, positions 2..65)
#: model -> (task, adapter targets, whether the export carries the tiny WordPiece tokenizer)
MODELS = {"bert": ("feature-extraction", ["query", "value"], True),
          "roberta": ("text-classification", ["query", "value"], False),
          "gpt2": ("text-generation-with-past", ["c_attn"], False),
          "llama": ("text-generation-with-past", ["q_proj", "v_proj"], False)}
LONG_TEXT = " ".join(WORDS[:100])  # 100 words: 102 tokens with [CLS] and [SEP]
SHORT_TEXT = "the water is hot and you can see the day"
_EXPORTS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``exports(name) -> Path``: a bank export of the tiny ``name`` model with one adapter ``a0`` (once per module)."""
    from bca_deploy.exporters import export

    def get(name: str) -> Path:
        if name not in _EXPORTS:
            task, targets, tokenizer = MODELS[name]
            root = tmp_path_factory.mktemp(f"positions-{name}")
            build_model(name).save_pretrained(root / "model")
            if tokenizer:
                write_wordpiece_tokenizer(root / "model")
            adapter = save_tiny_adapter(name, root / "a0", targets, 8, seed=0)
            _EXPORTS[name] = Path(export(root / "model", root / "onnx", [adapter], merge=False, bank=True, task=task,
                                         verbose=False))
        return _EXPORTS[name]

    return get


def claiming(export_dir: Path, dest: Path, config: dict | None = None, tokenizer: dict | None = None) -> Path:
    """A copy of ``export_dir`` at ``dest`` with fields of its ``config.json`` / ``tokenizer_config.json`` replaced."""
    shutil.copytree(export_dir, dest)
    for file, fields in (("config.json", config), ("tokenizer_config.json", tokenizer)):
        if fields:
            data = json.loads((dest / file).read_text())
            data.update(fields)
            (dest / file).write_text(json.dumps(data))
    return dest


# ---- the graph's own table ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, table, rows, offset", [
    ("bert", "embeddings.position_embeddings.weight", 64, 0),
    ("roberta", "roberta.embeddings.position_embeddings.weight", 66, 2),
    ("gpt2", "transformer.wpe.weight", 64, 0),
])
def test_the_position_table_is_found_in_the_graph(exports, name, table, rows, offset):
    from bca_deploy.exporters.validate import ONNX_FILE, PositionTable, check_graph_file, graph_position_tables

    found = graph_position_tables(check_graph_file(exports(name) / ONNX_FILE))
    assert found == [PositionTable(table, rows, offset, TABLE)]


@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2", "llama"])
def test_the_word_embedding_rows_are_found_in_the_graph(exports, name):
    """The ids a graph can embed, read from the table its input_ids index (build_model's vocabulary: 128)."""
    from bca_deploy.exporters.validate import ONNX_FILE, check_graph_file, graph_embedding_rows

    assert graph_embedding_rows(check_graph_file(exports(name) / ONNX_FILE)) == 128


def test_a_rotary_model_has_no_table_and_keeps_its_config_limit(exports, tmp_path):
    """Llama's positions are rotary (computed from the position ids, no table): nothing in the graph bounds them, so
    the config's limit stands, whatever it says (no limit is invented), and there is nothing to note."""
    from bca_deploy.exporters.validate import ONNX_FILE, check_graph_file, graph_position_tables

    assert graph_position_tables(check_graph_file(exports("llama") / ONNX_FILE)) == []
    assert MultiAdapterSession(exports("llama")).max_positions == TABLE
    session = MultiAdapterSession(claiming(exports("llama"), tmp_path / "llama", {"max_position_embeddings": 256}))
    assert session.position_table is None and session.max_positions == 256 and session.positions_note is None
    assert session.prepare([[5] * 200], max_new_tokens=8) == [[5] * 200]


def test_position_ids_sliced_from_a_constant_shorter_than_the_table_set_the_limit(exports):
    """BERT slices its position ids from a constant (the ``position_ids`` buffer) as long as its table; where that
    constant is shorter, a longer row fails in the graph all the same: the limit is where the positions stop."""
    import onnx
    from onnx import numpy_helper

    from bca_deploy.exporters.validate import ONNX_FILE, PositionTable, graph_position_tables

    model = onnx.load(str(exports("bert") / ONNX_FILE))
    producers = {out: node for node in model.graph.node for out in node.output}
    node = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0].endswith("position_embeddings.weight"))
    sliced = producers[node.input[1]]
    assert sliced.op_type == "Slice"
    constant = producers[sliced.input[0]]
    value = numpy_helper.to_array(constant.attribute[0].t)
    assert value.shape == (1, TABLE)
    constant.attribute[0].t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value[:, :40])))
    assert graph_position_tables(model) == [PositionTable("embeddings.position_embeddings.weight", TABLE, 0, 40)]



def untouched_and_claiming(exports, tmp_path_factory, model: str, config: dict):
    """Sessions of ``model``'s export and of a copy whose config.json is edited by ``config``."""
    hostile = claiming(exports(model), tmp_path_factory.mktemp("claims") / model, config)
    return MultiAdapterSession(exports(model)), MultiAdapterSession(hostile)

# ---- BERT: config.json claims 4× the table ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_claims(exports, tmp_path_factory):
    """``(untouched session, session of the copy whose config.json claims 256 positions)``."""
    return untouched_and_claiming(exports, tmp_path_factory, "bert", {"max_position_embeddings": 256})


def test_bert_rows_longer_than_the_table_are_refused_not_run(bert_claims):
    good, hostile = bert_claims
    assert good.max_positions == hostile.max_positions == TABLE
    for session in (good, hostile):
        with pytest.raises(ContextLengthError, match=r"^input: 65 tokens; the model's maximum context length is 64 positions$"):
            session.embed([[5] * 65], ["a0"])
        with pytest.raises(ContextLengthError, match=r"^input: 100 tokens; the model's maximum context length is 64 positions$"):
            session.prepare([[5] * 10, [6] * 100])
    note = hostile.positions_note
    assert note is not None and good.positions_note is None
    for words in ("config.json claims rows of up to 256 tokens (max_position_embeddings: 256)",
                  "'embeddings.position_embeddings.weight' (64 rows)", "requests are held to 64 tokens"):
        assert words in note, note


def test_bert_texts_are_cut_at_the_table_and_answers_are_the_untouched_exports(bert_claims):
    good, hostile = bert_claims
    rows = hostile.prepare([LONG_TEXT, SHORT_TEXT])
    assert [len(r) for r in rows] == [TABLE, len(good.tokenize([SHORT_TEXT])[0])]
    assert rows == good.prepare([LONG_TEXT, SHORT_TEXT])
    texts = [LONG_TEXT, SHORT_TEXT]
    np.testing.assert_allclose(hostile.embed(texts, ["a0", None]), good.embed(texts, ["a0", None]), rtol=0, atol=1e-6)
    ids = [[5 + i % 100 for i in range(TABLE)], [7, 8, 9]]  # the longest row the table holds, and a short one
    np.testing.assert_allclose(hostile.embed(ids, ["a0", "a0"]), good.embed(ids, ["a0", "a0"]), rtol=0, atol=1e-6)


def test_a_tokenizer_claiming_more_than_the_table_cannot_lengthen_texts(exports, tmp_path):
    """tokenizer_config.json's ``model_max_length`` (and config.json) both past the table: texts are still cut at the
    table, and the note names both files' claims."""
    session = MultiAdapterSession(claiming(exports("bert"), tmp_path / "bert", {"max_position_embeddings": 256},
                                           {"model_max_length": 4096}))
    session.tokenizer  # noqa: B018  (serve loads it at start)
    assert session.tokenizer.model_max_length == 4096
    assert [len(r) for r in session.prepare([LONG_TEXT])] == [TABLE]
    good = MultiAdapterSession(exports("bert"))
    np.testing.assert_allclose(session.embed([LONG_TEXT], ["a0"]), good.embed([LONG_TEXT], ["a0"]), rtol=0, atol=1e-6)
    assert session.text_limit(session.tokenizer) == TABLE
    assert "tokenizer claims rows of up to 4096 tokens (tokenizer_config.json model_max_length: 4096)" \
        in session.positions_note


def test_bert_over_http_too_long_is_400_and_long_texts_are_cut(bert_claims, tmp_path):
    from bca_deploy.serving.http import ServerThread, build, startup_notes

    good, hostile = bert_claims
    app = build(hostile.export_dir, threads=1)
    with ServerThread(app) as server:
        for body in ({"input": [[5] * 65], "adapter": "a0"}, {"model": "a0", "input": [[5] * 65]}):
            status, got = call(server.url + "/v1/embeddings", "POST", body)
            assert_error(status, got, 400, "context_length_exceeded", ["65 tokens", "64 positions"])
        texts = [LONG_TEXT, SHORT_TEXT]
        status, got = call(server.url + "/v1/embeddings", "POST", {"input": texts, "adapter": "a0"})
        assert status == 200, got
        vectors = [item["embedding"] for item in sorted(got["data"], key=lambda d: d["index"])]
        np.testing.assert_allclose(vectors, good.embed(texts, ["a0", "a0"]), rtol=0, atol=1e-5)
    assert hostile.positions_note in startup_notes(app.state.server)  # serve prints it once, at start


# ---- RoBERTa: positions start after the padding index ---------------------------------------------------------


@pytest.mark.parametrize("fields, claimed", [
    pytest.param({"max_position_embeddings": 264}, 262, id="max_position_embeddings"),
    pytest.param({"pad_token_id": 0}, 65, id="pad_token_id"),  # the offset the config implies is 1, the graph's 2
])
def test_roberta_the_offset_comes_from_the_graph(exports, tmp_path, fields, claimed):
    from bca_deploy.models import position_limit

    good = MultiAdapterSession(exports("roberta"))
    hostile = MultiAdapterSession(claiming(exports("roberta"), tmp_path / "roberta", fields))
    assert position_limit(hostile.config) == claimed
    assert good.max_positions == hostile.max_positions == TABLE
    with pytest.raises(ContextLengthError, match=r"^input: 65 tokens; the model's maximum context length is 64 positions$"):
        hostile.classify([[5] * 65], ["a0"])
    ids = [[5 + i % 100 for i in range(TABLE)]]
    assert hostile.classify(ids, ["a0"]) == good.classify(ids, ["a0"])
    assert "'roberta.embeddings.position_embeddings.weight' (66 rows, positions start at 2)" in hostile.positions_note
    assert f"claims rows of up to {claimed} tokens" in hostile.positions_note


# ---- GPT-2: n_positions -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_claims(exports, tmp_path_factory):
    return untouched_and_claiming(exports, tmp_path_factory, "gpt2", {"n_positions": 256})


def test_gpt2_generation_is_held_to_the_table(gpt2_claims):
    good, hostile = gpt2_claims
    assert hostile.config.n_positions == 256 and hostile.max_positions == TABLE
    assert "(n_positions: 256)" in hostile.positions_note
    with pytest.raises(ContextLengthError, match=r"^input: 65 tokens; the model's maximum context length is 64 positions$"):
        hostile.prepare([[5] * 65])
    with pytest.raises(ContextLengthError, match="60 prompt tokens [+] 10 new tokens exceed the model's maximum context length of 64 positions; "
                                                 "ask for at most 4 new tokens"):
        hostile.prepare([[5] * 60], max_new_tokens=10)
    with pytest.raises(ContextLengthError, match="the model's maximum context length is 64 positions"):
        hostile.generate([[5] * 65], ["a0"], max_new_tokens=1)
    prompt = [5 + i for i in range(20)]
    assert hostile.generate([prompt], ["a0"], max_new_tokens=6) == good.generate([prompt], ["a0"], max_new_tokens=6)


def test_gpt2_over_http_too_long_is_400(gpt2_claims):
    from bca_deploy.serving.http import ServerThread, build

    good, hostile = gpt2_claims
    with ServerThread(build(hostile.export_dir, threads=1, max_wait_ms=5)) as server:
        status, got = call(server.url + "/v1/generate", "POST", {"input": [[5] * 65], "max_new_tokens": 1})
        assert_error(status, got, 400, "context_length_exceeded", ["65 tokens", "64 positions"])
        status, got = call(server.url + "/v1/completions", "POST", {"model": "a0", "prompt": [5] * 60, "max_tokens": 10})
        assert_error(status, got, 400, "context_length_exceeded", ["64 positions", "at most 4 new tokens"])
        prompt = [5 + i for i in range(20)]
        status, got = call(server.url + "/v1/generate", "POST", {"input": [prompt], "adapter": "a0",
                                                                  "max_new_tokens": 6})
        assert status == 200, got
        assert got["data"][0]["token_ids"] == good.generate([prompt], ["a0"], max_new_tokens=6)[0]


def test_a_graph_declaring_a_giant_fixed_input_is_not_probed():
    """A hand-made graph whose position lookup also reads an input of fixed, giant declared dimensions (10^12
    elements): the probe would have to feed it, so the lookup is left unprobed (no table, the config's limit stands)
    instead of a MemoryError at start-up; the same graph with a small input is probed and its table found."""
    from onnx import TensorProto, helper

    from bca_deploy.exporters.validate import graph_position_tables

    def graph(fixed: list[int]):
        table = helper.make_tensor("pos.weight", TensorProto.FLOAT, [8, 4], [0.0] * 32)
        nodes = [helper.make_node("ReduceMin", ["extra"], ["low"], keepdims=0),
                 helper.make_node("Mul", ["low", "zero"], ["nothing"]),
                 helper.make_node("Add", ["position_ids", "nothing"], ["ids"]),
                 helper.make_node("Gather", ["pos.weight", "ids"], ["out"], axis=0)]
        inputs = [helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "L"]),
                  helper.make_tensor_value_info("extra", TensorProto.INT64, fixed)]
        zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
        return helper.make_model(helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, None)], [table, zero]), opset_imports=[helper.make_opsetid("", 17)])

    found = graph_position_tables(graph([2, 3]))
    assert [(t.name, t.rows, t.offset, t.limit) for t in found] == [("pos.weight", 8, 0, 8)]
    assert graph_position_tables(graph([10**4, 10**4, 10**4])) == []
