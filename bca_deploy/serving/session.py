"""``MultiAdapterSession``: many BCA adapters on one onnxruntime session, chosen per row.

The graph is an adapter-bank export (``bca-deploy export --bank``, see
:mod:`bca_deploy.exporters.bank`): one base model whose adapted layers gather each row's
frequency-domain kernels from bank inputs by ``adapter_ids``. The session keeps one bank holding
every registered adapter (slot 0 = zeros = base model) as ready-made ``OrtValue`` s and feeds it to
every run; a run only reads the slots its rows name, so the bank's size does not cost time.

Registering or unregistering an adapter builds a **new** bank and swaps it in atomically. A batch
takes a snapshot of the bank when it starts and uses it to the end (all steps of a generation), so a
load or unload during traffic never changes an answer half-way and never mixes two adapters.
Adapters are checked against the graph when registered; nothing is exported or restarted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdapterMismatchError, AdapterNameError, ServingError, UnknownAdapterError
from ..exporters.validate import PAST_INPUT, PRESENT_OUTPUT, empty_past

__all__ = ["MultiAdapterSession", "AdapterInfo", "BankSnapshot", "check_adapter_name", "BASE", "ADAPTER_NAME_PATTERN"]

#: Names that select the base model alone for a row (``None`` works too).
BASE = "__base__"
#: Adapter names: a letter or digit, then letters, digits, ``.``, ``_``, ``-``; at most 128 characters.
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_adapter_name(name: str) -> str:
    """Return ``name`` if it is a valid adapter name, else raise :class:`AdapterNameError`.

    Valid names match :data:`ADAPTER_NAME_PATTERN` and contain no ``..``: they are safe as a single
    path component, so an adapter store can never be escaped through a name.
    """
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise AdapterNameError(
            f"invalid adapter name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit, without '..'"
        )
    if name == BASE:
        raise AdapterNameError(f"{BASE!r} is reserved for the base model")
    return name


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter: its name, where it came from, its size, and when it was registered."""

    name: str
    source: str
    num_parameters: int
    block_sizes: tuple[int, ...]
    modules: int
    registered_at: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BankSnapshot:
    """The adapters of one moment: slot of each name, and the bank inputs (slot 0 = base) to feed.

    Immutable: a batch holds one from start to finish.
    """

    version: int
    slots: Mapping[str, int]
    infos: Mapping[str, AdapterInfo]
    feeds: Mapping[str, Any]  # bank input name -> OrtValue (2, 2F, S, q, o)

    def ids(self, names: Sequence[str | None]) -> np.ndarray:
        """Slot of each row's adapter (``None``/``"__base__"`` → 0) as int64 (batch,).

        Raises:
            UnknownAdapterError: a name is not registered (every unknown name is listed).
        """
        unknown = sorted({n for n in names if n is not None and n != BASE and n not in self.slots})
        if unknown:
            raise UnknownAdapterError(
                f"unknown adapter(s) {', '.join(map(repr, unknown))}; loaded: {', '.join(sorted(self.slots)) or '(none)'} "
                f"(use null or {BASE!r} for the base model)"
            )
        return np.array([0 if n is None or n == BASE else self.slots[n] for n in names], dtype=np.int64)


@dataclasses.dataclass
class _Adapter:
    info: AdapterInfo
    tensors: dict[str, np.ndarray]  # bank input name -> (2, 2F, q, o)


class MultiAdapterSession:
    """One base graph in onnxruntime serving any number of BCA adapters, a different one per row.

    Args:
        export_dir: a directory written by ``bca-deploy export --bank`` (``model.onnx``,
            ``bca_export.json``, ``config.json``, tokenizer files if the model had them).
        provider: ``"cpu"`` or ``"cuda"`` (onnxruntime-gpu; the bank then lives on the GPU).
        intra_op_threads: onnxruntime's intra-op thread count (default: onnxruntime's).
        load_exported: register the adapters the graph was exported with, under their export names,
            from the ``adapters/*.onnx_adapter`` files of the export.

    Example::

        session = MultiAdapterSession("onnx-bank")
        session.register("support", "adapters/support")          # checked against the graph
        vectors = session.embed(["hi", "hello"], ["support", None])  # row 2: base model
        session.unregister("support")
    """

    def __init__(
        self,
        export_dir: str | Path,
        *,
        provider: str = "cpu",
        intra_op_threads: int | None = None,
        load_exported: bool = True,
    ) -> None:
        import onnxruntime as ort

        from bca_deploy.exporters.bank import layout_from_dict
        from bca_deploy.exporters.validate import ONNX_FILE, onnx_providers

        self.export_dir = Path(export_dir)
        metadata_path = self.export_dir / "bca_export.json"
        onnx_path = self.export_dir / ONNX_FILE
        if not onnx_path.is_file():
            raise ServingError(f"{self.export_dir}: no {ONNX_FILE}; expected a directory written by bca-deploy export --bank")
        try:
            metadata = json.loads(metadata_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ServingError(f"{metadata_path}: cannot read the export metadata ({exc})") from exc
        bank = metadata.get("bank")
        if not bank:
            raise ServingError(
                f"{self.export_dir} is not an adapter-bank graph (exported {'merged' if metadata.get('merged') else 'unmerged'} "
                "without --bank); re-export it with: bca-deploy export --no-merge --bank --adapter ... --out ..."
            )
        self.metadata = metadata
        self.task: str = metadata["task"]
        self.layout = layout_from_dict(bank["tensors"])
        self.ids_input: str = bank["ids_input"]
        self.base_model_prefix: str = bank.get("base_model_prefix") or ""
        self.model_type: str | None = bank.get("model_type")
        self.provider = provider
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the bank's overridable initializers warn once per input otherwise
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
        self.session = ort.InferenceSession(str(onnx_path), options, providers=onnx_providers(provider))
        self._device = ("cuda", 0) if provider == "cuda" else ("cpu", 0)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.ids_input not in self.inputs:
            raise ServingError(f"{onnx_path}: the graph has no {self.ids_input!r} input; re-export it with --bank")
        self.with_past = any(PAST_INPUT.fullmatch(n) for n in self.inputs)
        self._config = None
        self._tokenizer = None
        # Hugging Face fast tokenizers are not safe to call from several threads at once ("Already borrowed").
        self._tokenizer_lock = threading.Lock()
        self._lock = threading.Lock()
        self._adapters: dict[str, _Adapter] = {}
        self._versions = itertools.count(1)
        self._snapshot = self._build_snapshot({})
        if load_exported:
            self._register_exported(bank)

    # ---- adapters ----------------------------------------------------------------------------------

    def register(self, name: str, adapter_dir: str | Path, *, replace: bool = False) -> AdapterInfo:
        """Load the adapter directory ``adapter_dir`` (bca-deploy or PEFT C3A) as ``name``.

        The adapter is read and checked against the graph (modules, block sizes, shapes, model type,
        finite values) before anything changes; then a new bank is swapped in. Batches already
        running finish with the bank they started with.

        Raises:
            AdapterNameError: ``name`` is not a valid adapter name.
            ValueError: ``name`` is registered already and ``replace`` is False.
            bca_deploy.errors.AdapterFormatError: ``adapter_dir`` is not a readable adapter directory.
            AdapterMismatchError: the adapter does not fit the graph (every problem listed).
        """
        from bca_deploy.adapter_io import read_adapter
        from bca_deploy.exporters.bank import adapter_tensors

        check_adapter_name(name)
        if name in self._adapters and not replace:
            raise ValueError(f"adapter {name!r} is already loaded; unregister it first or pass replace=True")
        config, state = read_adapter(adapter_dir)
        if config.base_model_type and self.model_type and config.base_model_type != self.model_type:
            raise AdapterMismatchError(
                f"{adapter_dir} was trained on a {config.base_model_type} model; this graph is a {self.model_type}"
            )
        tensors = adapter_tensors(config, state, self.layout, self.base_model_prefix, source=str(adapter_dir))
        info = AdapterInfo(name=name, source=str(adapter_dir), num_parameters=config.num_parameters,
                           block_sizes=tuple(sorted({s.block_size for s in config.modules.values()})),
                           modules=len(config.modules), registered_at=time.time())
        self._add(_Adapter(info, tensors), replace)
        return info

    def register_tensors(self, name: str, tensors: Mapping[str, np.ndarray], source: str = "tensors",
                         *, replace: bool = False) -> AdapterInfo:
        """Register bank slots computed elsewhere (``{bank input: (2, 2F, q, o)}``, e.g. from an adapter file)."""
        check_adapter_name(name)
        if name in self._adapters and not replace:
            raise ValueError(f"adapter {name!r} is already loaded; unregister it first or pass replace=True")
        problems = []
        for key, value in tensors.items():
            if key not in self.layout:
                problems.append(f"{key}: not a bank input of this graph")
            elif tuple(np.shape(value)) != self.layout[key].slot_shape:
                problems.append(f"{key}: shape {tuple(np.shape(value))}, expected {self.layout[key].slot_shape}")
            elif not np.isfinite(value).all():
                problems.append(f"{key}: NaN/Inf values")
        if problems:
            from bca_deploy.errors import format_problems

            raise AdapterMismatchError(format_problems(f"{source} does not fit the bank graph:", problems))
        sizes = tuple(sorted({self.layout[k].block_size for k in tensors}))
        n = sum(self.layout[k].in_features * self.layout[k].out_features // self.layout[k].block_size for k in tensors)
        info = AdapterInfo(name=name, source=source, num_parameters=n, block_sizes=sizes,
                           modules=len({self.layout[k].module for k in tensors}), registered_at=time.time())
        self._add(_Adapter(info, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}), replace)
        return info

    def unregister(self, name: str) -> AdapterInfo:
        """Remove adapter ``name``; running batches that use it finish with it.

        Raises:
            UnknownAdapterError: no adapter of that name is loaded.
        """
        with self._lock:
            if name not in self._adapters:
                raise UnknownAdapterError(
                    f"adapter {name!r} is not loaded; loaded: {', '.join(sorted(self._adapters)) or '(none)'}")
            adapters = dict(self._adapters)
            removed = adapters.pop(name)
            self._snapshot = self._build_snapshot(adapters)
            self._adapters = adapters
        return removed.info

    def adapters(self) -> list[AdapterInfo]:
        """The registered adapters, by name."""
        return [self._adapters[n].info for n in sorted(self._adapters)]

    def snapshot(self) -> BankSnapshot:
        """The current bank (what a batch started now would use)."""
        return self._snapshot

    def _add(self, adapter: _Adapter, replace: bool) -> None:
        with self._lock:
            if adapter.info.name in self._adapters and not replace:
                raise ValueError(f"adapter {adapter.info.name!r} is already loaded; unregister it first or pass replace=True")
            adapters = dict(self._adapters)
            adapters[adapter.info.name] = adapter
            self._snapshot = self._build_snapshot(adapters)  # built before the swap: a failure changes nothing
            self._adapters = adapters

    def _build_snapshot(self, adapters: Mapping[str, _Adapter]) -> BankSnapshot:
        import onnxruntime as ort

        from bca_deploy.exporters.bank import stack_bank

        names = sorted(adapters)
        banks = stack_bank([None, *(adapters[n].tensors for n in names)], self.layout)
        device, device_id = self._device
        feeds = {k: ort.OrtValue.ortvalue_from_numpy(v, device, device_id) for k, v in banks.items()}
        return BankSnapshot(version=next(self._versions), slots={n: i + 1 for i, n in enumerate(names)},
                            infos={n: adapters[n].info for n in names}, feeds=feeds)

    def _register_exported(self, bank: Mapping[str, Any]) -> None:
        import onnxruntime as ort

        from bca_deploy.exporters.bank import SLOT_AXIS

        for name, relative in (bank.get("adapter_files") or {}).items():
            path = self.export_dir / relative
            if not path.is_file():
                raise ServingError(f"{path}: adapter file listed in bca_export.json is missing")
            params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
            tensors = {k: np.take(v.numpy(), 1, axis=SLOT_AXIS) for k, v in params.items()}
            tensors = {k: v for k, v in tensors.items() if np.any(v)}
            self.register_tensors(name, tensors, source=str(path))

    # ---- running -------------------------------------------------------------------------------------

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        adapters: Sequence[str | None],
        output_names: Sequence[str] | None = None,
        snapshot: BankSnapshot | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the graph on ``feeds`` with row b through adapter ``adapters[b]`` (``None``: base model).

        Args:
            feeds: the graph's inputs except ``adapter_ids`` and the bank (numpy arrays, batch first).
            adapters: one adapter name (or ``None``) per row.
            output_names: outputs to return (default: all).
            snapshot: the bank to use (default: the current one); pass one to keep several runs consistent.

        Returns:
            ``{output name: array}``.

        Raises:
            UnknownAdapterError: an adapter name is not registered.
            ServingError: ``adapters`` does not have one entry per row.
        """
        values = self.run_ortvalues(feeds, adapters, output_names, snapshot)
        return {name: value.numpy() for name, value in values.items()}

    def run_ortvalues(self, feeds, adapters, output_names=None, snapshot=None) -> dict[str, Any]:
        """:meth:`run` returning onnxruntime ``OrtValue`` s (no copy; feed them back as past key values)."""
        import onnxruntime as ort

        snapshot = snapshot or self._snapshot
        names = list(output_names or self.output_names)
        ids = snapshot.ids(adapters)
        batch = _batch_of(feeds)
        if batch is not None and batch != len(ids):
            raise ServingError(f"the batch has {batch} rows but {len(ids)} adapter names were given (one per row)")
        inputs = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                  for k, v in feeds.items()}
        inputs[self.ids_input] = ort.OrtValue.ortvalue_from_numpy(ids)
        inputs.update(snapshot.feeds)
        outputs = self.session.run_with_ort_values(names, inputs)
        return dict(zip(names, outputs, strict=True))

    # ---- text helpers ----------------------------------------------------------------------------------

    @property
    def config(self):
        """The model's transformers config (``config.json`` of the export)."""
        if self._config is None:
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(str(self.export_dir))
        return self._config

    @property
    def tokenizer(self):
        """The tokenizer saved with the export (raises :class:`ServingError` if there is none)."""
        if self._tokenizer is None:
            files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                     "spiece.model")
            if not any((self.export_dir / f).is_file() for f in files):
                raise ServingError(f"{self.export_dir} has no tokenizer files; send token ids, or export a model "
                                   "directory that includes its tokenizer")
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(str(self.export_dir))
            except Exception as exc:  # transformers raises many types for incomplete tokenizer files
                raise ServingError(f"cannot load the tokenizer saved in {self.export_dir}: "
                                   f"{exc.__class__.__name__}: {exc}") from exc
        return self._tokenizer

    def tokenize(self, texts: Sequence[str], truncate: bool | None = None) -> list[list[int]]:
        """Token ids of each text (thread-safe). ``truncate`` (default: for encoders, not for decoders)
        cuts each text at the model's maximum length."""
        if truncate is None:
            truncate = not self.with_past
        tok = self.tokenizer
        with self._tokenizer_lock:
            if truncate:
                limit = min(int(getattr(tok, "model_max_length", 512) or 512),
                            int(getattr(self.config, "max_position_embeddings", 512) or 512))
                return [list(tok(t, truncation=True, max_length=limit)["input_ids"]) for t in texts]
            return [list(tok(t)["input_ids"]) for t in texts]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens (thread-safe)."""
        tok = self.tokenizer
        with self._tokenizer_lock:
            return tok.decode(list(token_ids), skip_special_tokens=True)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenize ``texts`` into the graph's inputs (right padding; encoders truncate at the maximum length)."""
        return self.pad_ids(self.tokenize(texts))

    def pad_ids(self, input_ids: Sequence[Sequence[int]], token_type_ids=None, side: str = "right") -> dict[str, np.ndarray]:
        """Token-id lists → padded ``input_ids``/``attention_mask`` (+ ``token_type_ids``, ``position_ids`` if the graph takes them)."""
        if not input_ids or any(len(r) == 0 for r in input_ids):
            raise ServingError("every row needs at least one token")
        vocab = int(getattr(self.config, "vocab_size", 0) or 0)
        bad = [t for r in input_ids for t in r if not isinstance(t, (int, np.integer)) or t < 0 or (vocab and t >= vocab)]
        if bad:
            raise ServingError(f"token ids must be integers in [0, {vocab}); got {bad[:5]}")
        length = max(len(r) for r in input_ids)
        pad = _pad_id(self.config, self._tokenizer)
        ids = np.full((len(input_ids), length), pad, dtype=np.int64)
        mask = np.zeros((len(input_ids), length), dtype=np.int64)
        for b, row in enumerate(input_ids):
            if side == "left":
                ids[b, length - len(row):] = row
                mask[b, length - len(row):] = 1
            else:
                ids[b, :len(row)] = row
                mask[b, :len(row)] = 1
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = mask
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = _position_ids(mask)
        return feeds

    def embed(self, inputs: Sequence[str] | Sequence[Sequence[int]], adapters: Sequence[str | None],
              pooling: str = "mean", normalize: bool = False, snapshot: BankSnapshot | None = None) -> np.ndarray:
        """Sentence embeddings (B, hidden) of texts or token-id lists, each row through its adapter.

        ``pooling``: ``"mean"`` over non-padding tokens (sentence-transformers' default), ``"cls"`` (first
        token) or ``"last"`` (last non-padding token); ``normalize``: L2-normalize each vector.
        """
        if pooling not in ("mean", "cls", "last"):
            raise ServingError(f"pooling must be 'mean', 'cls' or 'last'; got {pooling!r}")
        feeds = self._feeds(inputs)
        name = "last_hidden_state" if "last_hidden_state" in self.output_names else self.output_names[0]
        hidden = self.run(feeds, adapters, [name], snapshot)[name].astype(np.float32)  # (B, T, H)
        mask = feeds.get("attention_mask", np.ones(feeds["input_ids"].shape, dtype=np.int64)).astype(np.float32)
        if pooling == "mean":
            vectors = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1.0)
        elif pooling == "cls":
            vectors = hidden[:, 0]
        else:
            vectors = hidden[np.arange(len(hidden)), mask.sum(1).astype(np.int64) - 1]
        if normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def classify(self, inputs: Sequence[str] | Sequence[Sequence[int]], adapters: Sequence[str | None],
                 snapshot: BankSnapshot | None = None) -> list[dict[str, Any]]:
        """Sequence classification: per row ``{"label", "score", "scores"}`` (softmax over the labels)."""
        if "logits" not in self.output_names or self.with_past:
            raise ServingError(f"this graph was exported for {self.task!r}; classification needs a text-classification export")
        logits = self.run(self._feeds(inputs), adapters, ["logits"], snapshot)["logits"].astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        labels = getattr(self.config, "id2label", None) or {}
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append({"label": labels.get(best, str(best)), "score": float(row[best]),
                            "scores": {labels.get(i, str(i)): float(p) for i, p in enumerate(row)}})
        return results

    def prepare(self, inputs: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 0) -> list[list[int]]:
        """Check a request's rows before it joins a batch and return them as token-id lists.

        Texts are tokenized here, once (encoders truncate them at the model's maximum length), so a
        batch never waits on the tokenizer.

        Raises:
            ServingError: no rows, a mix of texts and token ids, an empty row, texts without a
                tokenizer, token ids outside the vocabulary, or rows (plus ``max_new_tokens``) longer
                than the model's ``max_position_embeddings``.
        """
        if not inputs:
            raise ServingError("no inputs given")
        texts = [isinstance(x, str) for x in inputs]
        if any(texts) and not all(texts):
            raise ServingError("inputs must be all texts or all token-id lists, not a mix")
        rows = self.tokenize(inputs) if all(texts) else [list(x) for x in inputs]
        self.pad_ids(rows)  # raises on empty rows and out-of-vocabulary ids
        longest = max(len(r) for r in rows)
        limit = getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)
        if limit and longest + max_new_tokens > int(limit):
            raise ServingError(f"{longest} prompt tokens + {max_new_tokens} new tokens exceed the model's "
                               f"{int(limit)} positions")
        return rows

    def check_inputs(self, inputs: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 0) -> int:
        """:meth:`prepare`, returning the longest row's token count."""
        return max(len(r) for r in self.prepare(inputs, max_new_tokens))

    def _feeds(self, inputs) -> dict[str, np.ndarray]:
        if self.with_past:
            raise ServingError(f"this graph was exported for {self.task!r} (a decoder with past); use generate()")
        if not inputs:
            raise ServingError("no inputs given")
        if all(isinstance(x, str) for x in inputs):
            return self.encode(inputs)
        return self.pad_ids([list(x) for x in inputs])

    # ---- generation -------------------------------------------------------------------------------------

    def generate(
        self,
        inputs: Sequence[str] | Sequence[Sequence[int]],
        adapters: Sequence[str | None],
        *,
        max_new_tokens: int | Sequence[int] = 32,
        do_sample: bool | Sequence[bool] = False,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        seed: int | None | Sequence[int | None] = None,
        eos_token_id: int | Sequence[int] | None = None,
        snapshot: BankSnapshot | None = None,
    ) -> list[list[int]]:
        """Generate up to ``max_new_tokens`` per row, row b through adapter ``adapters[b]``, with past key values.

        Prompts are left-padded into one batch; every step runs all unfinished rows together. Every
        sampling parameter is a scalar or one value per row, so requests with different settings
        share a batch: greedy rows take the argmax (PyTorch's ``generate(do_sample=False)`` token for
        token); sampled rows draw from softmax(logits / temperature) after top-k and top-p filtering,
        from their own generator seeded by ``seed`` (so a row's tokens do not depend on its batch).

        Returns:
            The new token ids of each row (without the prompt), ending at its first end-of-sequence
            token (included) or after its ``max_new_tokens``.
        """
        if not self.with_past:
            raise ServingError(f"this graph was exported for {self.task!r}; generation needs a text-generation-with-past export")
        if not inputs:
            raise ServingError("no prompts given")
        prompts = [self.tokenize([x], truncate=False)[0] if isinstance(x, str) else list(x) for x in inputs]
        rows = len(prompts)
        if len(adapters) != rows:
            raise ServingError(f"{rows} prompts but {len(adapters)} adapter names (one per prompt)")
        params = _RowParams.of(rows, max_new_tokens, do_sample, temperature, top_k, top_p, seed)
        eos = _eos_ids(self.config, eos_token_id)
        snapshot = snapshot or self._snapshot
        snapshot.ids(adapters)  # unknown names fail before any work
        feeds = self.pad_ids(prompts, side="left")
        mask = feeds["attention_mask"]
        feeds.update(empty_past(self.session, rows))
        generated: list[list[int]] = [[] for _ in range(rows)]
        done = np.zeros(rows, dtype=bool)
        pad = _pad_id(self.config, self._tokenizer)
        logits_name = "logits"
        present = [n for n in self.output_names if PRESENT_OUTPUT.fullmatch(n)]
        for _ in range(int(params.max_new_tokens.max())):
            out = self.run_ortvalues(feeds, adapters, [logits_name, *present], snapshot)
            logits = out[logits_name].numpy()[:, -1, :].astype(np.float32)
            tokens = params.choose(logits)
            for b in range(rows):
                if done[b]:
                    continue
                generated[b].append(int(tokens[b]))
                if int(tokens[b]) in eos or len(generated[b]) >= params.max_new_tokens[b]:
                    done[b] = True
            if done.all():
                break
            tokens = np.where(done, pad, tokens).astype(np.int64)
            mask = np.concatenate([mask, np.ones((rows, 1), dtype=mask.dtype)], axis=1)
            feeds = {"input_ids": tokens[:, None]}
            if "attention_mask" in self.inputs:
                feeds["attention_mask"] = mask
            if "position_ids" in self.inputs:
                feeds["position_ids"] = _position_ids(mask)[:, -1:]
            for name in present:
                feeds[name.replace("present", "past_key_values", 1)] = out[name]
        return generated

    def warm_up(self) -> float:
        """Load the tokenizer (if the export has one) and run one 1-token row on the base model, so the
        first request does not pay for them. Returns the seconds it took."""
        start = time.perf_counter()
        with contextlib.suppress(ServingError):
            self.tokenizer  # noqa: B018
        token = [min(1, int(getattr(self.config, "vocab_size", 2) or 2) - 1)]
        if self.with_past:
            self.generate([token], [None], max_new_tokens=1)
        else:
            self.run(self.pad_ids([token]), [None])
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        """What this session serves: task, model type, graph inputs/outputs, bank size, adapters."""
        return {
            "export_dir": str(self.export_dir),
            "task": self.task,
            "model_type": self.model_type,
            "provider": self.provider,
            "bank_inputs": len(self.layout),
            "block_sizes": sorted({t.block_size for t in self.layout.values()}),
            "adapters": [a.name for a in self.adapters()],
        }


@dataclasses.dataclass
class _RowParams:
    max_new_tokens: np.ndarray
    do_sample: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    generators: list[np.random.Generator | None]

    @classmethod
    def of(cls, rows: int, max_new_tokens, do_sample, temperature, top_k, top_p, seed) -> _RowParams:
        def per_row(value, name):
            values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * rows
            if len(values) != rows:
                raise ServingError(f"{name}: {len(values)} values for {rows} rows")
            return values

        params = cls(
            max_new_tokens=np.array(per_row(max_new_tokens, "max_new_tokens"), dtype=np.int64),
            do_sample=np.array(per_row(do_sample, "do_sample"), dtype=bool),
            temperature=np.array(per_row(temperature, "temperature"), dtype=np.float64),
            top_k=np.array(per_row(top_k, "top_k"), dtype=np.int64),
            top_p=np.array(per_row(top_p, "top_p"), dtype=np.float64),
            generators=[],
        )
        problems = []
        if (params.max_new_tokens < 1).any():
            problems.append("max_new_tokens must be >= 1")
        if (params.do_sample & (params.temperature <= 0)).any():
            problems.append("temperature must be > 0 when sampling")
        if (params.top_k < 0).any():
            problems.append("top_k must be >= 0 (0: no top-k filtering)")
        if ((params.top_p <= 0) | (params.top_p > 1)).any():
            problems.append("top_p must be in (0, 1]")
        if problems:
            raise ServingError("; ".join(problems))
        seeds = per_row(seed, "seed")
        params.generators = [np.random.default_rng(s) if sample else None
                             for s, sample in zip(seeds, params.do_sample, strict=True)]
        return params

    def choose(self, logits: np.ndarray) -> np.ndarray:
        """Next token per row from logits (B, V): argmax, or a draw after temperature/top-k/top-p."""
        tokens = logits.argmax(-1)
        for b in np.flatnonzero(self.do_sample):
            scores = logits[b].astype(np.float64) / self.temperature[b]
            k = int(self.top_k[b])
            if 0 < k < scores.size:
                cutoff = np.partition(scores, -k)[-k]
                scores = np.where(scores < cutoff, -np.inf, scores)
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            if self.top_p[b] < 1.0:
                order = np.argsort(-probs, kind="stable")
                cumulative = np.cumsum(probs[order])
                keep = cumulative - probs[order] < self.top_p[b]  # smallest prefix reaching top_p (first always kept)
                filtered = np.zeros_like(probs)
                filtered[order[keep]] = probs[order[keep]]
                probs = filtered / filtered.sum()
            tokens[b] = self.generators[b].choice(probs.size, p=probs)
        return tokens


def _batch_of(feeds: Mapping[str, Any]) -> int | None:
    value = feeds.get("input_ids")
    if value is None:
        return None
    shape = value.shape() if callable(getattr(value, "shape", None)) else value.shape
    return int(shape[0])


def _position_ids(mask: np.ndarray) -> np.ndarray:
    # As transformers' generate: positions count real tokens; padding positions get 1.
    positions = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


def _pad_id(config, tokenizer) -> int:
    for source in (tokenizer, config):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


def _eos_ids(config, eos_token_id) -> set[int]:
    value = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])}
