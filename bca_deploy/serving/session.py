"""``MultiAdapterSession``: many BCA adapters on one onnxruntime session, chosen per row.

The graph is an adapter-bank export (``bca-deploy export --bank``, see
:mod:`bca_deploy.exporters.bank`): one base model whose adapted layers gather each row's
frequency-domain kernels from bank inputs by ``adapter_ids``; a text-classification bank gathers
each row's classifier head the same way. The session keeps one bank holding every registered
adapter (slot 0 = base model) as ready-made ``OrtValue`` s and feeds it to every run; a run only reads
the slots its rows name, so the bank's size does not cost time.

Registering writes the adapter into one free slot of the bank (:mod:`bca_deploy.serving.slots`: a slot
is written only while no live snapshot can read it; the bank is reallocated, with room doubling, when
none is free) and publishes a new snapshot; unregistering only publishes a snapshot without it. A
batch takes a snapshot when it starts and uses it to the end (all steps of a generation), so a load or
unload during traffic never changes an answer half-way and never mixes two adapters. Adapters are
checked against the graph when registered; nothing is exported or restarted.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import threading
import time
import weakref
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import text_pair_mismatch
from ..errors import (
    AdapterExistsError,
    AdapterMismatchError,
    AdapterNameError,
    ContextLengthError,
    ExportFileError,
    ServingError,
    UnknownAdapterError,
    first_line,
    format_problems,
    onnxruntime_reason,
    open_regular,
    why_not_readable,
)
from ..exporters.bank import LABEL_PAD, BankRecord, HeadLabels, HeadWeights
from ..exporters.metadata import ExportMetadata
from ..exporters.validate import PAST_INPUT, PositionTable
from ..models import (
    POSITIONS_AFTER_PADDING,
    attention_window,
    describe_ids_past_vocabulary,
    has_tokenizer_files,
    ids_past_vocabulary,
    load_saved_tokenizer,
    position_limit,
    token_names,
    tokenizer_limit,
    vocabulary_size,
)
from .prefix import TextPastLimit, bounded_ids, bounded_text
from .slots import SlotBank, SlotSpec

__all__ = ["MultiAdapterSession", "AdapterInfo", "BankSnapshot", "bank_metadata", "check_adapter_name", "not_loaded",
           "BASE", "ADAPTER_NAME_PATTERN", "PairRow", "is_text_pair"]

#: Names that select the base model alone for a row (``None`` works too).
BASE = "__base__"
#: Adapter names: a letter or digit, then letters, digits, ``.``, ``_``, ``-``; at most 128 characters.
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: What each kind of request needs of the graph, as a refusal says it (:meth:`MultiAdapterSession.require`).
#: What each kind of request needs of the graph: said by every refusal of a route the graph cannot answer.
KIND_NEEDS = {"embed": "embeddings need a feature-extraction export (bca-deploy export --bank --task "
                       "feature-extraction, of adapters trained without a classification head)",
              "classify": "classification needs a text-classification export (of seq-cls adapters)",
              "generate": "generation needs a text-generation-with-past export (of causal-lm adapters)"}


#: The most labels of a head registered at run time (beyond the exported heads'): see ``max_labels``.
DEFAULT_MAX_LABELS = 1024
#: Most copies of the tokenizer texts are tokenized and detokenized with (one thread per copy at a time; made as
#: concurrent texts need them): a request's long text holds one of them, not every other request's tokenization.
TOKENIZER_COPIES = 4


def is_text_pair(row: Any) -> bool:
    """Whether an input row is a text pair: a list (or tuple) of exactly two texts, as a classifier trained on two
    text columns (``sentence1``/``sentence2``, ``question``/``sentence``...) reads each example."""
    return isinstance(row, (list, tuple)) and len(row) == 2 and all(isinstance(t, str) for t in row)


class PairRow(list):
    """A text pair's token ids (a row as every other: a list of ids) and the token type of each
    (``token_types``: 0 for the first text's tokens, 1 for the second's, as the tokenizer gives them), which the
    graph's ``token_type_ids`` input gets where it has one."""

    __slots__ = ("token_types",)

    def __init__(self, ids: Sequence[int], token_types: Sequence[int] | None) -> None:
        super().__init__(ids)
        self.token_types = list(token_types) if token_types is not None else None


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


def not_loaded(names: str | Sequence[str], param: str | None = None) -> UnknownAdapterError:
    """The refusal of a request that names adapters not loaded now (HTTP 404 ``unknown_adapter``).

    The one definition of that refusal: the session, the generation engine, the micro-batcher, the native
    and OpenAI routes and the Ray replicas all raise it. It names the adapters the request asked for and
    nothing else: never the other loaded adapters (other tenants' names), paths or internal text (the
    promise of :mod:`bca_deploy.serving.wire`). ``param`` is the request field that named them
    (``"adapter"``, ``"model"``...): the message's first word and the error JSON's ``param``.
    """
    names = [names] if isinstance(names, str) else list(names)
    shown = ", ".join(repr(n if len(n) <= 128 else n[:128] + "...") for n in names)
    noun, verb = ("adapter", "is") if len(names) == 1 else ("adapters", "are")
    error = UnknownAdapterError(f"{param or noun} {shown} {verb} not loaded on this server")
    error.param = param  # type: ignore[attr-defined]  # the field to fix, in the error's JSON
    return error


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter: its name, where it came from, its size, and when it was registered.

    ``head`` says which classifier head its rows use in a text-classification bank: ``"own"`` (saved with
    the adapter), ``"base"`` (the checkpoint's) or None (none: its rows cannot be classified, or the graph
    does not classify); ``labels`` are that head's label names by index.
    """

    name: str
    source: str
    num_parameters: int
    block_sizes: tuple[int, ...]
    modules: int
    registered_at: float
    head: str | None = None
    labels: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class BankSnapshot:
    """The adapters of one moment: slot of each name, their classifier labels, and the bank inputs to feed.

    Immutable, and so is what it reads: the slots it maps are never written while it is alive (see
    :mod:`bca_deploy.serving.slots`). A batch holds one from start to finish.
    """

    version: int
    slots: Mapping[str, int]
    infos: Mapping[str, AdapterInfo]
    feeds: Mapping[str, Any]  # bank input name -> OrtValue: kernels (S, 1, R, q, o), heads (S, in, out)
    labels: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # name (BASE: base) -> HeadLabels | None

    def labels_of(self, names: Sequence[str | None]) -> list[Any]:
        """The classifier labels (:class:`~bca_deploy.exporters.bank.HeadLabels`) of each row's adapter.

        Raises:
            UnknownAdapterError: a name is not registered.
            ServingError: a row's adapter (or the base model) has no classifier head (every one listed).
        """
        self.ids(names)
        keys = [BASE if n is None else n for n in names]
        headless = sorted({k for k in keys if self.labels.get(k) is None})
        if headless:
            raise ServingError(
                f"no classifier head for {', '.join(map(repr, headless))}: "
                + ("the base checkpoint has none (a bare encoder); classify rows with an adapter that saves its "
                   "head, or export a checkpoint with a trained head" if BASE in headless else
                   "it saves no head and the base checkpoint has none")
            )
        return [self.labels[k] for k in keys]

    def refusal(self, adapter: str | None, kind: str) -> Exception | None:
        """Why a request of ``kind`` (``"classify"``, ``"embed"``, ``"generate"``) on ``adapter`` cannot join a
        batch on this snapshot (unknown adapter; no classifier head), or None."""
        try:
            if kind == "classify":
                self.labels_of([adapter])
            else:
                self.ids([adapter])
        except (UnknownAdapterError, ServingError) as exc:
            return exc
        return None

    def ids(self, names: Sequence[str | None]) -> np.ndarray:
        """Slot of each row's adapter (``None``/``"__base__"`` → 0) as int64 (batch,).

        Raises:
            UnknownAdapterError: a name is not registered (:func:`not_loaded`: every unknown name, and no other).
        """
        unknown = sorted({n for n in names if n is not None and n != BASE and n not in self.slots})
        if unknown:
            raise not_loaded(unknown)
        return np.array([0 if n is None or n == BASE else self.slots[n] for n in names], dtype=np.int64)


@dataclasses.dataclass
class _Adapter:
    info: AdapterInfo
    tensors: dict[str, np.ndarray]  # bank input name -> (1, R, q, o)
    head: Any = None  # HeadWeights of its own head; None: the base head (if any)
    slot: int = 0


def bank_metadata(export_dir: str | Path) -> ExportMetadata:
    """The metadata of an adapter-bank export (``bca-deploy export --bank``), its bank record checked.

    Raises:
        ServingError: no graph or no ``bca_export.json`` there, or an export without ``--bank``.
        ExportMetadataError, AdapterFormatError: a malformed ``bca_export.json`` (see
            :func:`~bca_deploy.exporters.metadata.read_export_metadata`).
    """
    from bca_deploy.exporters.metadata import METADATA_FILE, read_export_metadata
    from bca_deploy.exporters.validate import ONNX_FILE

    export_dir = Path(export_dir)
    for name in (ONNX_FILE, METADATA_FILE):
        path = export_dir / name
        if not path.is_file():
            if os.path.lexists(path):  # a link to a device or to nothing, a pipe, a folder: said as what it is
                raise ServingError(f"{path}: {why_not_readable(path)}; expected the {name} bca-deploy export --bank "
                                   "writes")
            raise ServingError(f"{export_dir}: no {name}; expected a directory written by bca-deploy export --bank")
    metadata = read_export_metadata(export_dir)
    if metadata.bank is None:
        raise ServingError(
            f"{export_dir} is not an adapter-bank graph (exported {metadata.kind} without --bank); re-export "
            f"it with: {_bank_export_command(export_dir, metadata)}"
        )
    return metadata


def _bank_export_command(export_dir: Path, metadata: ExportMetadata) -> str:
    """The ``bca-deploy export --bank`` command for the model and adapters ``bca_export.json`` records
    (placeholders where it records none), quoted for a shell."""
    import shlex

    words = ["bca-deploy", "export", "--model", shlex.quote(metadata.base_model or "MODEL_DIR")]
    for adapter in metadata.adapters or ["ADAPTER_DIR"]:
        words += ["--adapter", shlex.quote(adapter)]
    words.append("--bank")
    if metadata.dtype == "fp16":
        words += ["--dtype", "fp16"]
    words += ["--out", shlex.quote(f"{export_dir}-bank")]
    return " ".join(words)


class MultiAdapterSession:
    """One base graph in onnxruntime serving any number of BCA adapters, a different one per row.

    Args:
        export_dir: a directory written by ``bca-deploy export --bank`` (``model.onnx``,
            ``bca_export.json``, ``config.json``, tokenizer files if the model had them).
        provider: ``"cpu"`` or ``"cuda"`` (onnxruntime-gpu; the bank then lives on the GPU).
        intra_op_threads: onnxruntime's intra-op thread count (default: onnxruntime's).
        spin: whether those threads busy-wait between runs (onnxruntime's default); False: they sleep
            (``session.intra_op.allow_spinning`` 0), leaving the CPU to other threads and processes.
        load_exported: register the adapters the graph was exported with, under their export names,
            from the ``adapters/*.onnx_adapter`` files of the export.
        max_labels: the most labels of a classifier head registered later (a text-classification bank): every row
            of every adapter computes the widest loaded head's labels, so one wide head slows every tenant and
            widens every answer. The exported heads are always taken; None: no limit.

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
        spin: bool = True,
        load_exported: bool = True,
        max_labels: int | None = DEFAULT_MAX_LABELS,
    ) -> None:
        import onnxruntime as ort

        from bca_deploy.exporters.bank import LOGITS_TO_KEEP, bank_base_matches
        from bca_deploy.exporters.errors import ExportGraphError
        from bca_deploy.exporters.validate import ONNX_FILE, graph_limits, inference_session

        self.export_dir = Path(export_dir)
        onnx_path = self.export_dir / ONNX_FILE
        metadata = bank_metadata(self.export_dir)
        bank = metadata.bank
        self.metadata = metadata
        self.task: str = metadata.task
        self.layout = bank.layout
        self.unused_modules = bank.unused  # adapted at export, not used by the graph: kernels for them are ignored
        # an adapter's base weights are taken only when equal to the graph's own (digests recorded at export)
        self._base_matches = bank_base_matches(bank.base_weights, bank.layout, bank.unused)
        self.ids_input: str = bank.ids_input
        self.base_model_prefix: str = bank.base_model_prefix
        self.model_type: str | None = bank.model_type
        self.provider = provider
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the bank's overridable initializers warn once per input otherwise
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
        if not spin:  # idle intra-op threads sleep instead of busy-waiting for the next run
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The graph's own position table (None: rotary or no absolute positions) and word-embedding rows: config.json
        # and the tokenizer only claim them, and a row past the table or an id past the rows fails inside onnxruntime
        # (HTTP 500), so max_positions and vocabulary take the lower of the two. Read before the session is built: the
        # parsed graph (weights included when they are inside the file) is freed before onnxruntime holds its own
        # copy, so the two do not add up.
        self.embedding_rows: int | None = None
        try:
            self.position_table: PositionTable | None
            self.position_table, self.embedding_rows = graph_limits(onnx_path)
        except ExportGraphError:  # a damaged graph file: onnxruntime's refusal below names it (the documented error)
            self.position_table = None
        self.session = inference_session(onnx_path, options, provider)
        self._device = ("cuda", 0) if provider == "cuda" else ("cpu", 0)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.ids_input not in self.inputs:
            raise ServingError(f"{onnx_path}: the graph has no {self.ids_input!r} input; re-export it with --bank")
        self.with_past = any(PAST_INPUT.fullmatch(n) for n in self.inputs)
        # Generation banks exported since logits_to_keep: a prefill asks for the last position's logits only.
        self.keeps_last_logits = LOGITS_TO_KEEP in {i.name for i in self.session.get_overridable_initializers()}
        self._config = None
        self._generation_defaults: GenerationDefaults | None = None
        self._eos_token_ids: frozenset[int] | None = None
        self._tokenizer = None
        self._tokenizer_mismatch: str | None = None
        self._no_tokenizer: str | None = None  # why there is none, once looked for
        self.tokenizer_error: str | None = None  # its files are there and do not load: why (warm_up refuses to go on)
        # The config and the tokenizer load on first use, which can come from two threads at once (a generation
        # engine's thread and the event loop's); transformers' lazy module raises ImportError ("cannot import
        # name 'AutoConfig'") when two threads import through it at the same moment.
        self._load_lock = threading.RLock()
        # Hugging Face fast tokenizers are not safe to call from several threads at once ("Already borrowed"): texts
        # go through TOKENIZER_COPIES copies, one text per copy at a time, in the order asked for, so neither one
        # request's many texts nor one long text holds every other request's text (and every stream's detokenizer).
        self._tokenizers: TurnPool | None = None
        self._token_pieces_of: dict[int, tuple[str, bytes]] = {}  # token_texts' and token_bytes': (text, bytes) per id
        self._lock = threading.Lock()
        self._adapters: dict[str, _Adapter] = {}
        self._versions = itertools.count(1)
        # Versions of the snapshots still alive: a slot freed at version v is written again only when
        # none older than v is left (bca_deploy.serving.slots). Its own lock: a snapshot may die anywhere.
        self._live: set[int] = set()
        self._live_lock = threading.Lock()
        self.config  # noqa: B018 - read at load: a malformed config.json is refused here, not by a request
        self.head = bank.head
        self._check_graph_inputs(onnx_path)
        self._base_head = self._read_base_head(bank)
        self._shared_labels = None
        if self.head is None and "logits" in self.output_names and not self.with_past:
            config = self.config  # every row shares the checkpoint's head and labels
            self._shared_labels = HeadLabels.of(int(config.num_labels), getattr(config, "id2label", None),
                                                getattr(config, "problem_type", None))
        self._bank = self._new_bank()
        self._base_label_width = self._label_width if self.head is not None else 0
        # Every row of a head bank computes the widest loaded head's labels: one adapter of 100,000 labels made another
        # tenant's rows 7.6x slower and a 64-row answer 337 MB. Heads wider than max_labels (never below the exported
        # heads') are refused at registration.
        widest = max([0, *(labels.num_labels for labels in bank.adapter_labels.values() if labels is not None)])
        self.max_labels = None if max_labels is None else max(int(max_labels), widest, self._base_label_width)
        self._ortvalues: dict[str, tuple[np.ndarray, Any]] = {}
        self._snapshot = self._publish({})
        if load_exported:
            self._register_exported(bank)

    # ---- adapters ----------------------------------------------------------------------------------

    def register(self, name: str, adapter_dir: str | Path, *, replace: bool = False,
                 source: str | Path | None = None, warn: Callable[[str], object] | None = None) -> AdapterInfo:
        """Load the adapter directory ``adapter_dir`` (bca-deploy or PEFT C3A) as ``name``.

        The adapter is read and checked against the graph (modules, block sizes, shapes, model type,
        finite values; in a text-classification bank its head: layers, shapes, labels) before anything
        changes; then it is written into a free slot and a new snapshot is published. Batches already
        running finish with the snapshot they started with. Its base weights (``<module>.base_layer.<param>``:
        PEFT's ``save_embedding_layers``, an adapted ``lm_head``'s frozen weight) are taken only when they equal
        the graph's own values (the digests the export recorded; every row shares the base model), else refused
        naming each (:func:`~bca_deploy.exporters.bank.bank_base_matches`; a bank exported before the digests
        were recorded takes those of the modules it adapts at their layer's shape, as bca-deploy did then).

        ``source``: where the adapter came from, for its :class:`AdapterInfo` (default: ``adapter_dir``; a server
        reads a private copy of a store entry and records the entry).

        An adapter that fits but records another base checkpoint (``base_model_name_or_path``) than the model the
        graph was exported from (``bca_export.json``'s ``base_model``) is registered with the warning load, merge and
        export give (:func:`bca_deploy.fit.base_name_note`): to ``warn`` when given (a server logs it), else as a
        :class:`~bca_deploy.fit.ForeignBaseWarning`.

        Raises:
            AdapterNameError: ``name`` is not a valid adapter name.
            ValueError: ``name`` is registered already and ``replace`` is False.
            bca_deploy.errors.AdapterFormatError: ``adapter_dir`` is not a readable adapter directory.
            AdapterMismatchError: the adapter does not fit the graph (every problem listed).
        """
        from bca_deploy.adapter_io import read_adapter
        from bca_deploy.exporters.bank import adapter_slot

        check_adapter_name(name)
        if name in self._adapters and not replace:
            raise AdapterExistsError(f"adapter {name!r} is already loaded; unregister it first or pass replace=True")
        # adapter_slot runs the one fit check; a file larger than any fitting adapter is refused unread
        config, state = read_adapter(adapter_dir, validate=False, max_bytes=self.max_adapter_bytes)
        tensors, head = adapter_slot(config, state, self.layout, self.base_model_prefix, source=str(adapter_dir),
                                     head=self.head, base_head=self._base_head, model_type=self.model_type,
                                     unused=self.unused_modules, base_matches=self._base_matches, task=self.task,
                                     name_or_path=self.metadata.base_model, warn=warn)
        info = AdapterInfo(name=name, source=str(source or adapter_dir), num_parameters=config.num_parameters,
                           block_sizes=tuple(sorted({s.block_size for s in config.modules.values()})),
                           modules=len(config.modules), registered_at=time.time(), **self._head_info(head))
        self._add(_Adapter(info, tensors, head), replace)
        return info

    def register_tensors(self, name: str, tensors: Mapping[str, np.ndarray], source: str = "tensors",
                         *, replace: bool = False, head: HeadWeights | None = None) -> AdapterInfo:
        """Register bank slots computed elsewhere (``{bank input: (1, R, q, o)}``, e.g. from an adapter file),
        with ``head`` (:class:`~bca_deploy.exporters.bank.HeadWeights`, complete) as its own classifier head.

        Slots are arrays alone: they carry no base checkpoint, so no foreign-base warning is given (:meth:`register`
        and :meth:`register_exported` give it, from the adapter's config or the export's record). A caller that
        knows the base its slots were computed for can say it with :func:`bca_deploy.fit.recorded_base_note` against
        ``metadata.base_model``."""
        check_adapter_name(name)
        if name in self._adapters and not replace:
            raise AdapterExistsError(f"adapter {name!r} is already loaded; unregister it first or pass replace=True")
        from bca_deploy.fit import slot_problems

        problems = slot_problems(tensors, self.layout)
        if head is not None:
            problems += self._head_problems(head)
        if problems:
            raise AdapterMismatchError(format_problems(f"{source} does not fit the bank graph:", problems))
        sizes = tuple(sorted({self.layout[k].block_size for k in tensors}))
        n = sum(self.layout[k].in_features * self.layout[k].out_features // self.layout[k].block_size for k in tensors)
        info = AdapterInfo(name=name, source=source, num_parameters=n, block_sizes=sizes,
                           modules=len({self.layout[k].module for k in tensors}), registered_at=time.time(),
                           **self._head_info(head))
        self._add(_Adapter(info, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, head), replace)
        return info

    def unregister(self, name: str) -> AdapterInfo:
        """Remove adapter ``name``; running batches that use it finish with it.

        Nothing is copied: the new snapshot no longer maps the adapter's slot, and the slot is written
        again only once no older snapshot is alive.

        Raises:
            UnknownAdapterError: no adapter of that name is loaded (:func:`not_loaded`).
        """
        with self._lock:
            if name not in self._adapters:
                raise not_loaded(name)
            adapters = dict(self._adapters)
            removed = adapters.pop(name)
            if self.head is not None:  # the label axis as wide as the widest head left (new arrays: snapshots keep theirs)
                self._resize_labels(max([self._base_label_width, *(a.head.labels.num_labels
                                                                   for a in adapters.values() if a.head is not None)]))
            snapshot = self._publish(adapters)
            self._bank.release(removed.slot, snapshot.version)
            self._snapshot, self._adapters = snapshot, adapters
        return removed.info

    def adapters(self) -> list[AdapterInfo]:
        """The registered adapters, by name."""
        return [self._adapters[n].info for n in sorted(self._adapters)]

    def snapshot(self) -> BankSnapshot:
        """The current bank (what a batch started now would use)."""
        return self._snapshot

    def bank_memory(self) -> dict[str, int]:
        """The bank's size: ``capacity`` and ``used`` slots (base included), ``bytes_per_slot``,
        ``allocated_bytes`` (every bank array) and ``used_bytes`` (slots in use)."""
        with self._lock:
            return self._bank.memory()

    def _add(self, adapter: _Adapter, replace: bool) -> None:
        with self._lock:
            name = adapter.info.name
            if name in self._adapters and not replace:
                raise AdapterExistsError(f"adapter {name!r} is already loaded; unregister it first or pass replace=True")
            labels = adapter.head.labels.num_labels if adapter.head is not None else 0
            if self.max_labels is not None and labels > self.max_labels:
                raise AdapterMismatchError(
                    f"adapter {name!r}: its classifier has {labels:,} labels; this server takes heads of up to "
                    f"{self.max_labels:,} (--max-labels): every row of every adapter computes the widest loaded "
                    "head's labels")
            if self.head is not None and labels > self._label_width:
                self._resize_labels(labels)
            slot = self._bank.allocate(self._oldest_live())
            self._bank.write(slot, self._slot_values(adapter))
            self._bank.commit(slot)
            adapter.slot = slot
            adapters = dict(self._adapters)
            replaced = adapters.get(name)
            adapters[name] = adapter
            snapshot = self._publish(adapters)
            if replaced is not None:  # batches on older snapshots keep reading its slot
                self._bank.release(replaced.slot, snapshot.version)
            self._snapshot, self._adapters = snapshot, adapters

    # ---- the bank --------------------------------------------------------------------------------------

    def _new_bank(self) -> SlotBank:
        from bca_deploy.exporters.bank import SLOT_AXIS

        specs = {name: SlotSpec(SLOT_AXIS, entry.slot_shape) for name, entry in self.layout.items()}
        base: dict[str, np.ndarray] = {}
        if self.head is not None:
            width = 1 if self._base_head is None else max(
                [v.shape[1] for k, v in self._base_head.tensors.items() if k == self.head.label_layer.weight_name] or [1])
            specs.update({name: SlotSpec(0, shape) for name, shape in self.head.slot_shapes(width).items()})
            base = self.head.slot_values(self._base_head, width)
        return SlotBank(specs, base)

    @property
    def _label_width(self) -> int:
        return self._bank.specs[self.head.label_layer.bias_name].slot_shape[0]

    def _resize_labels(self, width: int) -> None:
        """Give the label layer's bank ``width`` labels (new arrays; one copy of that layer): wider for a head with
        more labels, narrower when the widest head left has fewer (columns past a slot's own labels are padding)."""
        old = self._label_width
        if width == old:
            return
        layer, kept = self.head.label_layer, min(old, width)

        def weight(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
            wide = np.zeros(shape, dtype=np.float32)
            wide[..., :kept] = array[..., :kept]
            return wide

        def bias(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
            # new labels: -inf for slots with a head, NaN for slots without one (their column 0 is NaN)
            wide = np.empty(shape, dtype=np.float32)
            wide[:, :kept] = array[:, :kept]
            wide[:, kept:] = np.where(np.isnan(array[:, :1]), np.nan, LABEL_PAD)
            return wide

        self._bank.resize(layer.weight_name, (layer.in_features, width), weight)
        self._bank.resize(layer.bias_name, (width,), bias)

    def _slot_values(self, adapter: _Adapter) -> dict[str, np.ndarray]:
        values = dict(adapter.tensors)
        if self.head is not None:
            values.update(self.head.slot_values(adapter.head or self._base_head, self._label_width))
        return values

    def _oldest_live(self) -> int | None:
        with self._live_lock:
            return min(self._live) if self._live else None

    def _forget(self, version: int) -> None:
        with self._live_lock:
            self._live.discard(version)

    def _publish(self, adapters: Mapping[str, _Adapter]) -> BankSnapshot:
        """A snapshot of ``adapters`` over the bank as it is now (slots already written), tracked while alive."""
        version = next(self._versions)
        names = sorted(adapters)
        labels = {BASE: self._labels(None), **{n: self._labels(adapters[n].head) for n in names}}
        snapshot = BankSnapshot(version=version, slots={n: adapters[n].slot for n in names},
                                infos={n: adapters[n].info for n in names}, feeds=self._bank_feeds(), labels=labels)
        with self._live_lock:
            self._live.add(version)
        weakref.finalize(snapshot, self._forget, version)
        return snapshot

    def _bank_feeds(self) -> dict[str, Any]:
        """An ``OrtValue`` per bank array. On CPU it wraps the array (no copy), so slot writes show in it and
        one is made per array; on a GPU it is a device copy, made again at every change."""
        import onnxruntime as ort

        device, device_id = self._device
        feeds = {}
        for name, array in self._bank.arrays.items():
            cached = self._ortvalues.get(name)
            if cached is None or cached[0] is not array or device != "cpu":
                cached = (array, ort.OrtValue.ortvalue_from_numpy(array, device, device_id))
                self._ortvalues[name] = cached
            feeds[name] = cached[1]
        return feeds

    # ---- heads -----------------------------------------------------------------------------------------

    def _check_graph_inputs(self, onnx_path: Path) -> None:
        """The graph takes and gives what bca-deploy feeds and reads (inputs, outputs and their types:
        :func:`~bca_deploy.exporters.validate.bank_graph_problems`, one line naming the file), and every bank input
        the metadata records is an input of the graph, of the shape it records (dynamic axes aside): a graph or a
        metadata file changed since export is refused at load, not by a request's run."""
        from bca_deploy.exporters.validate import bank_graph_message, bank_graph_problems, session_interface

        interface = bank_graph_problems(self.metadata, *session_interface(self.session))
        if interface:
            raise ServingError(bank_graph_message(onnx_path, interface))
        expected = {name: entry.slot_shape for name, entry in self.layout.items()}
        if self.head is not None:
            expected.update(self.head.slot_shapes(1))  # the label axis is dynamic in the graph
        # bank tensors are initializers listed as inputs: onnxruntime lists them as overridable initializers
        declared = {i.name: i for i in (*self.session.get_overridable_initializers(), *self.session.get_inputs())}
        problems = []
        for name, slot_shape in expected.items():
            graph_input = declared.get(name)
            if graph_input is None:
                problems.append(f"{name}: not an input of the graph")
                continue
            dims = list(graph_input.shape)[1:]  # after the slot axis
            if len(dims) != len(slot_shape) or any(isinstance(d, int) and d != want for d, want in zip(dims, slot_shape)):
                problems.append(f"{name}: the graph declares {graph_input.shape}, the metadata records "
                                f"(slots, {', '.join(map(str, slot_shape))})")
        if problems:
            from bca_deploy.exporters.metadata import METADATA_FILE

            raise ServingError(format_problems(
                f"{onnx_path} does not match the bank its {METADATA_FILE} records (re-export the bank):", problems))

    def _read_base_head(self, bank: BankRecord) -> HeadWeights | None:
        """The base checkpoint's head layers (slot 0 and adapters without a head of their own), checked against
        the graph's head layout: each present layer whole, of its shape, finite; the label layer as wide as the
        base labels recorded (and present exactly when they are). The file (an ``.npz``) is checked before any
        array in it is read: a regular file of a size the head can have, each member one of the head's inputs,
        its ``.npy`` header a real float array of the shape the layout gives (:func:`_read_head_file`)."""
        if self.head is None or bank.base_head_file is None:
            return None
        path = self.export_dir / bank.base_head_file
        labels = bank.base_labels
        expected = {}
        for layer in self.head.layers:
            expected.update(layer.slot_shapes(labels.num_labels if layer.labels and labels is not None else None))
        tensors = _read_head_file(path, expected)
        problems = [f"{name}: not a head input of this graph" for name in sorted(set(tensors) - set(self.head.names()))]
        for layer in self.head.layers:
            present = [n for n in (layer.weight_name, layer.bias_name) if n in tensors]
            if layer.labels and (labels is None) != (not present):
                problems.append(f"{layer.module}: the label layer must be present exactly when base labels are "
                                f"recorded ({'present' if present else 'absent'}, labels "
                                f"{'recorded' if labels is not None else 'not recorded'})")
                continue
            if not present:
                continue
            width = labels.num_labels if layer.labels and labels is not None else None
            for name, shape in layer.slot_shapes(width).items():
                value = tensors.get(name)
                if value is None or value.shape != shape:
                    problems.append(f"{name}: {'missing' if value is None else value.shape}, expected {shape}")
                elif not np.isfinite(value).all():
                    problems.append(f"{name}: NaN/Inf values")
        if problems:
            raise ServingError(format_problems(f"{path}: the base model's head does not fit this bank graph "
                                               "(re-export the bank):", problems))
        return HeadWeights(tensors, labels)

    def _labels(self, head: HeadWeights | None) -> HeadLabels | None:
        """The labels rows of an adapter with ``head`` (None: its own is none, or the base model) classify with."""
        if self.head is None:
            return self._shared_labels
        head = head if head is not None else self._base_head
        return None if head is None else head.labels

    def _head_info(self, head: HeadWeights | None) -> dict[str, Any]:
        labels = self._labels(head)
        if labels is None:
            return {"head": None, "labels": None}
        return {"head": "own" if head is not None else "base", "labels": labels.id2label}

    def _head_problems(self, head: HeadWeights) -> list[str]:
        if self.head is None:
            return ["it has a classifier head, but this bank graph has no per-adapter head"]
        if head.labels is None:
            return ["its head has no labels (an incomplete head cannot be registered)"]
        problems = []
        for layer in self.head.layers:
            for name, shape in layer.slot_shapes(head.labels.num_labels).items():
                value = head.tensors.get(name)
                if value is None or tuple(np.shape(value)) != shape:
                    problems.append(f"{name}: {'missing' if value is None else np.shape(value)}, expected {shape}")
                elif not np.isfinite(value).all():
                    problems.append(f"{name}: NaN/Inf values")
        return problems

    @property
    def max_adapter_bytes(self) -> int:
        """The largest adapter weights file :meth:`register` reads: every kernel of the bank's layout (and one at block
        size 1, the largest, for each module it leaves out as unused) and every head tensor (the label layer at
        :data:`~bca_deploy.config.MAX_NUM_LABELS` classes) in float64, plus 16 MiB for the file's header. An
        adapter that fits the graph is smaller; a larger file (a sparse one declaring GiBs included) would only be
        read into the server's memory to be refused. A bank that recorded its base weights' digests also reads the
        base weights an adapter may carry equal to its own: its input and output embeddings (PEFT's
        ``save_embedding_layers``: an adapted ``lm_head``'s weight) and the adapted layers' biases, in float64
        too; not the other adapted layers' weights, which PEFT never saves."""
        from bca_deploy.config import MAX_NUM_LABELS

        elements = sum(t.in_features * t.out_features // t.block_size for t in self.layout.values())
        elements += sum(u.in_features * u.out_features for u in self.unused_modules)  # any block size: p = 1 at most
        if self.head is not None:
            label = self.head.label_layer
            elements += sum(2 * layer.out_features if layer.norm else
                            (layer.in_features + 1) * (MAX_NUM_LABELS if layer is label else layer.out_features)
                            for layer in self.head.layers)
        for digest in (self.metadata.bank.base_weights or {}).values():  # one entry per name (tied: each name)
            if digest.embedding or len(digest.shape) == 1:
                elements += math.prod(digest.shape)
        return 8 * elements + (16 << 20)

    @property
    def exported_adapters(self) -> tuple[str, ...]:
        """The adapters the graph was exported with: each can be registered from the export itself
        (:meth:`register_exported`), whether or not it is registered now."""
        return tuple(self.metadata.bank.adapters)

    def register_exported(self, adapter: str, *, name: str | None = None, replace: bool = False,
                          warn: Callable[[str], object] | None = None) -> AdapterInfo:
        """Register exported adapter ``adapter`` (one of :attr:`exported_adapters`) from the export's own adapter
        file, as ``name`` (default: ``adapter``): how an exported adapter that was unregistered comes back (and how
        the session registers them all as it starts, unless ``load_exported`` is off).

        An adapter that records another base checkpoint (``bca_export.json``'s ``bank.adapter_bases``, written from
        its config at export) than the model the graph was exported from is registered with the warning
        :meth:`register` gives (:func:`bca_deploy.fit.recorded_base_note`): to ``warn`` when given (a server logs
        it), else as a :class:`~bca_deploy.fit.ForeignBaseWarning`. A bank exported before the bases were recorded
        says nothing (its adapter files carry no config).

        Raises:
            UnknownAdapterError: the graph was not exported with ``adapter``.
            AdapterExistsError: ``name`` is registered already and ``replace`` is False.
            ServingError: the export's adapter file is missing or is not the file this bank exported.
        """
        bank = self.metadata.bank
        if adapter not in bank.adapters:
            raise UnknownAdapterError(f"adapter {adapter!r} is not one this graph was exported with")
        name = adapter if name is None else name
        check_adapter_name(name)
        if name in self._adapters and not replace:
            raise AdapterExistsError(f"adapter {name!r} is already loaded; unregister it first or pass replace=True")
        tensors, head, source = self._exported_slot(bank, adapter)
        from bca_deploy.fit import bank_target, recorded_base_note, say_base_note

        # said before the adapter is registered, as register says it (during its fit check): a warning turned into an
        # error (-W error::ForeignBaseWarning) left the adapter registered while the caller got the exception
        target = bank_target(self.layout, self.model_type, self.base_model_prefix,
                             name_or_path=self.metadata.base_model)
        say_base_note(recorded_base_note(bank.adapter_bases.get(adapter), target.name_or_path, target.description,
                                         f"exported adapter {adapter!r} ({source})"), warn, stacklevel=2)
        return self.register_tensors(name, tensors, source=source, head=head, replace=replace)

    def _register_exported(self, bank: BankRecord) -> None:
        for name in bank.adapters:
            self.register_exported(name)

    def _exported_slot(self, bank: BankRecord, name: str) -> tuple[dict[str, np.ndarray], HeadWeights | None, str]:
        """Exported adapter ``name``'s bank slots and head, read from its ``adapters/*.onnx_adapter`` file."""
        import onnxruntime as ort

        from bca_deploy.exporters.bank import SLOT_AXIS

        path = self.export_dir / bank.adapter_files[name]
        if not path.exists():
            raise ExportFileError(f"{path}: adapter file listed in bca_export.json is missing")
        # unreadable (onnxruntime: a parse failure), a FIFO (it blocks): the OSError naming it; damaged: ExportFileError
        bank.checked_adapter_file(self.export_dir, name, ExportFileError)
        try:
            adapter = ort.AdapterFormat.read_adapter(str(path))
            # copies: the arrays of get_parameters() live in memory the AdapterFormat object owns
            params = {k: np.array(v.numpy(), copy=True) for k, v in adapter.get_parameters().items()}
        except Exception as exc:  # onnxruntime raises RuntimeError/Fail (pybind) for a file it cannot parse
            raise ExportFileError(f"{path}: not a readable onnxruntime adapter file ({type(exc).__name__}: "
                                  f"{onnxruntime_reason(exc)})") from None
        del adapter
        # each parameter holds two slots (zeros, then this adapter) on the slot axis
        short = sorted(k for k, v in params.items() if v.ndim == 0 or v.shape[SLOT_AXIS] != 2)
        own = bank.adapter_labels.get(name)
        missing = [k for k in self.head.names() if k not in params] if self.head is not None and own else []
        # a tensor that is no input of this graph (another block size's kernels...) would be dropped, and the
        # adapter served as the base model
        known = set(self.layout) | (set(self.head.names()) if self.head is not None else set())
        unknown = sorted(k for k in params if k not in known)
        if short or missing or unknown:
            raise ExportFileError(format_problems(f"{path}: not the adapter file this bank exported:", [
                *(f"{k}: shape {params[k].shape}, expected two slots on axis {SLOT_AXIS}" for k in short[:10]),
                *(f"{k}: missing (the adapter's own head)" for k in missing[:10]),
                *(f"{k}: not an input of this bank's graph" for k in unknown[:10])]))
        tensors = {k: np.take(params[k], 1, axis=SLOT_AXIS) for k in self.layout if k in params}
        tensors = {k: v for k, v in tensors.items() if np.any(v)}
        head = None
        if self.head is not None and own is not None:
            head = HeadWeights({k: params[k][1] for k in self.head.names()}, own)
            label = self.head.label_layer  # the file's label axis is as wide as its widest slot
            head.tensors[label.weight_name] = head.tensors[label.weight_name][:, :own.num_labels]
            head.tensors[label.bias_name] = head.tensors[label.bias_name][:own.num_labels]
        return tensors, head, str(path)

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
        snapshot = snapshot or self._snapshot
        ids = snapshot.ids(adapters)
        order = _grouping_order(ids, feeds)
        if order is None:
            values = self._run_ids(feeds, ids, output_names, snapshot)
            return {name: value.numpy() for name, value in values.items()}
        # Rows grouped by adapter: each layer's slot Gather then reads the bank in runs, which measured ~5%
        # faster than interleaved rows (bench/results/bank_scaling.md, "grouped"); every row's numbers are its own.
        values = self._run_ids({k: np.ascontiguousarray(v[order]) for k, v in feeds.items()}, ids[order],
                               output_names, snapshot)
        restore = np.empty_like(order)
        restore[order] = np.arange(len(order))
        return {name: _rows_restored(value.numpy(), restore) for name, value in values.items()}

    def run_ortvalues(self, feeds, adapters, output_names=None, snapshot=None, *,
                      on_device: Sequence[str] = ()) -> dict[str, Any]:
        """:meth:`run` returning onnxruntime ``OrtValue`` s (no copy; feed them back as past key values).

        ``on_device``: outputs to leave on the execution provider's device (a GPU's memory under
        ``provider="cuda"``) instead of onnxruntime's default, host memory; fed back as inputs they are
        never copied. On CPU every output is in host memory either way.
        """
        snapshot = snapshot or self._snapshot
        return self._run_ids(feeds, snapshot.ids(adapters), output_names, snapshot, on_device)

    def _run_ids(self, feeds, ids: np.ndarray, output_names, snapshot: BankSnapshot,
                 on_device: Sequence[str] = ()) -> dict[str, Any]:
        """One onnxruntime run with the bank slots ``ids`` (int64, one per row) of ``snapshot``."""
        import onnxruntime as ort

        names = list(output_names or self.output_names)
        batch = _batch_of(feeds)
        if batch is not None and batch != len(ids):
            raise ServingError(f"the batch has {batch} rows but {len(ids)} adapter names were given (one per row)")
        inputs = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                  for k, v in feeds.items()}
        inputs[self.ids_input] = ort.OrtValue.ortvalue_from_numpy(ids)
        inputs.update(snapshot.feeds)
        if not on_device:
            outputs = self.session.run_with_ort_values(names, inputs)
            return dict(zip(names, outputs, strict=True))
        # run_with_ort_values copies every output to host memory; an IOBinding says where each one goes
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        device, device_id = self._device
        for name in names:
            binding.bind_output(name, device if name in on_device else "cpu", device_id if name in on_device else 0)
        self.session.run_with_iobinding(binding)
        if device != "cpu":  # the CPU provider's outputs are complete when the run returns
            binding.synchronize_outputs()
        return dict(zip(names, binding.get_outputs(), strict=True))

    # ---- text helpers ----------------------------------------------------------------------------------

    @property
    def config(self):
        """The model's transformers config (``config.json`` of the export)."""
        if self._config is None:
            with self._load_lock:  # first use may come from two threads at once (see _load_lock)
                if self._config is None:
                    from bca_deploy.models import load_config

                    self._config = load_config(self.export_dir)
        return self._config

    @property
    def tokenizer(self):
        """The tokenizer saved with the export (raises :class:`ServingError` if there is none)."""
        if self._tokenizer is None:
            with self._load_lock:
                return self._load_tokenizer()
        return self._tokenizer

    def _load_tokenizer(self):
        if self._tokenizer is None:
            if self._no_tokenizer is not None:  # looked for once: every request would stat the files again
                raise ServingError(self._no_tokenizer)
            if not has_tokenizer_files(self.export_dir):
                self._no_tokenizer = (f"{self.export_dir} has no tokenizer files; send token ids, or export a model "
                                      "directory that includes its tokenizer")
                raise ServingError(self._no_tokenizer)
            try:
                tokenizer = load_saved_tokenizer(self.export_dir)
                vocabulary = self.vocabulary
                extra = ids_past_vocabulary(tokenizer, vocabulary)
                self._tokenizer_mismatch = (f"the tokenizer saved in {self.export_dir} does not fit its model: "
                                            f"{describe_ids_past_vocabulary(tokenizer, extra, vocabulary)}; texts "
                                            "using them are refused" if extra else None)
                # copies only: the loaded one stays for what reads it alone (its vocabulary, its chat template), which
                # a copy's call in another thread (setting its truncation) would find "Already borrowed". One copy
                # first, more only while every copy is busy (a 250k-word vocabulary: ~50 MB and 0.4 s per copy).
                self._tokenizers = TurnPool([copy.deepcopy(tokenizer)], make=lambda: copy.deepcopy(tokenizer),
                                            most=TOKENIZER_COPIES)
                self._tokenizer = tokenizer
            except Exception as exc:  # transformers raises many types for incomplete tokenizer files
                # remembered, as a missing one is: a broken tokenizer is not loaded again for every request
                import transformers

                self.tokenizer_error = (f"cannot load the tokenizer saved in {self.export_dir} "
                                        f"({type(exc).__name__}: {first_line(exc, 200)}; transformers "
                                        f"{transformers.__version__} here{self._exported_with()})")
                self._no_tokenizer = f"{self.tokenizer_error}; send token ids, or re-export with the model's tokenizer"
                raise ServingError(self._no_tokenizer) from None
        return self._tokenizer

    def _exported_with(self) -> str:
        """", the export was made with transformers X" where its metadata says so and X differs from this one's
        (transformers 5.x writes tokenizer files 4.x cannot read), else ""."""
        import transformers

        made = self.metadata.fields.get("transformers_version")
        if isinstance(made, str) and made != transformers.__version__:
            return f", the export was made with transformers {made[:40]}"
        return ""

    @property
    def tokenizer_problem(self) -> str | None:
        """Why text inputs are refused (no tokenizer files, or files that do not load), once looked for; else None."""
        return self._no_tokenizer

    @property
    def tokenizer_mismatch(self) -> str | None:
        """Once the tokenizer is loaded: which of its tokens the model cannot embed (texts using them are
        refused, naming them), else None."""
        return self._tokenizer_mismatch

    def tokenize(self, texts: Sequence[str], truncate: bool | None = None, max_length: int | None = None,
                 refuse_param: str | None = None, max_new_tokens: int = 0, side: str | None = None,
                 **options: Any) -> list[list[int]]:
        """Token ids of each text (thread-safe). ``truncate`` (default: for encoders, not for decoders)
        cuts each text at the model's maximum length, or at ``max_length`` where that is lower (a
        sentence-transformers model's ``max_seq_length``), keeping its first tokens, or its last ones with ``side``
        "left" (vLLM's ``truncate_prompt_tokens`` on a prompt; None: the tokenizer's own ``truncation_side``);
        ``options``: more of the tokenizer's (chat prompts: ``add_special_tokens=False``). No more of a long text is
        tokenized than its answer needs (:func:`~bca_deploy.serving.prefix.bounded_ids`).

        ``refuse_param`` (texts not truncated): the request field holding the texts; each is then held to the model's
        positions as it is tokenized, and the first one longer is refused (:class:`ContextLengthError` naming that
        field, as :meth:`check_positions` with ``max_new_tokens`` words it) before the texts after it are read: a
        request's cost before its refusal is bounded by what the model could take, not by its body's size.
        """
        if truncate is None:
            truncate = not self.with_past
        if truncate:
            limit = self._truncation_length(max_length)
            # a copy per text: another request's text goes next, not after all of these
            return [self.text_ids(text, side=side, truncation=True, max_length=limit, **options) for text in texts]
        if refuse_param is None:
            return [self.text_ids(text, **options) for text in texts]
        limit, rows = self.max_positions, []
        for text in texts:
            try:
                ids = self.text_ids(text, most=limit, **options)
            except TextPastLimit as past:
                raise self._prompt_too_long(
                    refuse_param, f"more than {limit} tokens (its first {past.chars:,} of {past.length:,} characters "
                    f"already hold {past.tokens}; the rest was not tokenized)", max_new_tokens) from None
            if limit and len(ids) > limit:
                self.check_positions(len(ids), max_new_tokens, refuse_param)  # raises
            rows.append(ids)
        return rows

    def text_ids(self, text: str, most: int | None = None, side: str | None = None, **options: Any) -> list[int]:
        """The token ids of one text, ``options`` passed to the tokenizer (thread-safe: one of the session's copies);
        ``most``: raise :class:`~bca_deploy.serving.prefix.TextPastLimit` once the text is shown to have more tokens,
        having tokenized only a prefix (:func:`~bca_deploy.serving.prefix.bounded_ids`, which also reads only as
        much of a text as ``truncation=True`` keeps); ``side``: the copy's ``truncation_side`` for this text ("left":
        the last tokens kept, read from a suffix), set back after it."""
        with self._tokenizer_copy() as tok:
            kept = getattr(tok, "truncation_side", None)
            if side is None or side == kept:
                return bounded_ids(tok, text, most, **options)
            tok.truncation_side = side
            try:
                return bounded_ids(tok, text, most, **options)
            finally:
                tok.truncation_side = kept

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """The tokenizer's string of each id (``convert_ids_to_tokens``: vLLM's ``return_token_strs``; thread-safe)."""
        with self._tokenizer_copy() as tok:
            return [str(t) for t in tok.convert_ids_to_tokens(list(token_ids))]

    def tokenize_pairs(self, pairs: Sequence[Sequence[str]], max_length: int | None = None) -> list[PairRow]:
        """Token ids (and token types) of each text pair, as ``tokenizer(first, second, truncation=True,
        max_length=L)`` gives them, as ``train`` and ``evaluate`` read a two-column example (thread-safe): cut
        together at the model's maximum length L (or ``max_length`` where lower), the longer text first.

        No more of a long text is tokenized than the pair's truncation keeps (:func:`~bca_deploy.serving.prefix.
        bounded_text`: a prefix holding the text's first L tokens), except where both texts hold L tokens or more:
        which text loses the odd token then depends on their whole lengths, so both are tokenized whole (each at most
        ``--max-text-chars``).
        """
        limit = self._truncation_length(max_length)
        rows = []
        with self._tokenizer_copy() as tok:
            for first, second in pairs:
                cuts = [bounded_text(tok, text, truncation=True, max_length=limit, add_special_tokens=False)
                        for text in (first, second)]
                if all(len(ids) >= limit for _, ids in cuts):
                    cuts = [(first, []), (second, [])]
                encoding = tok(cuts[0][0], cuts[1][0], truncation=True, max_length=limit)
                rows.append(PairRow(encoding["input_ids"], encoding.get("token_type_ids")))
        return rows

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``, without special tokens unless ``skip_special_tokens`` is false (thread-safe)."""
        with self._tokenizer_copy() as tok:
            return tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text, as vLLM shows tokens in log-probabilities: the id decoded alone, special tokens
        kept (``"</s>"``, not ``""``); ``"token_id:<id>"`` (vLLM's placeholder) without a tokenizer. A byte-level
        token that is only part of a character (an emoji's or a CJK character's first bytes) is written as OpenAI
        writes it, ``"bytes:\\xe2\\x80"`` (each of its bytes escaped), not as the ``"\ufffd"`` its decode gives, so
        two such tokens no longer read as the same text (:func:`token_pieces`). Remembered per id (a vocabulary's
        worth at most), so the same tokens cost one decode each however often they are asked."""
        return [text for text, _ in self._token_pieces(token_ids)]

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Each token's own bytes (OpenAI's chat ``bytes``): a byte-level token's true bytes, also where they are not
        a whole character alone; else the UTF-8 of its :meth:`token_texts` text."""
        return [raw for _, raw in self._token_pieces(token_ids)]

    def _token_pieces(self, token_ids: Sequence[int]) -> list[tuple[str, bytes]]:
        pieces = self._token_pieces_of
        missing = sorted({int(t) for t in token_ids} - pieces.keys())
        if missing:
            try:
                with self._tokenizer_copy() as tok:
                    found = token_pieces(tok, missing)
            except ServingError:  # no tokenizer: the ids themselves
                found = {t: (f"token_id:{t}", f"token_id:{t}".encode()) for t in missing}
            pieces.update(found)  # one dict update (atomic under the GIL); a race decodes an id twice, same text
        return [pieces[int(t)] for t in token_ids]

    def text_offsets(self, text: str, token_ids: Sequence[int]) -> list[int] | None:
        """Where each token of ``token_ids`` (``text``'s tokenization, as :meth:`tokenize` gives it) starts in
        ``text``, OpenAI's ``text_offset``: the end of the token before it in the tokenizer's offset mapping, so the
        characters between two tokens' spans (a word-level tokenizer's spaces) go with the next token, as its decoded
        text holds them, and a token with no characters (an added special token) is where the next text starts.
        ``None`` where the tokenizer gives no offsets (a slow tokenizer, none) or tokenizes ``text`` to other ids."""
        try:
            with self._tokenizer_copy() as tok:
                if not getattr(tok, "is_fast", False):
                    return None
                encoding = tok(text, return_offsets_mapping=True)
        except ServingError:  # no tokenizer
            return None
        if list(encoding["input_ids"]) != [int(t) for t in token_ids]:
            return None
        offsets, end = [], 0
        for _, stop in encoding["offset_mapping"]:
            offsets.append(end)
            end = max(end, int(stop))
        return offsets

    def private_decoder(self) -> Callable[[Sequence[int]], str]:
        """:meth:`decode` over a tokenizer copy of its own, for one thread that must never wait behind other requests'
        texts in the shared copies (the generation engine's, whose detokenizers every stream waits for)."""
        tokenizer = self.tokenizer
        with self._load_lock:
            own = copy.deepcopy(tokenizer)
        return lambda token_ids: own.decode(list(token_ids), skip_special_tokens=True)

    @contextlib.contextmanager
    def _tokenizer_copy(self) -> Iterator[Any]:
        """One of the tokenizer's copies, this thread's alone until the block ends (ServingError if there is none)."""
        self.tokenizer  # noqa: B018  # loaded, and the copies with it
        assert self._tokenizers is not None
        with self._tokenizers.use() as tok:
            yield tok

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenize ``texts`` into the graph's inputs (right padding; encoders truncate at the maximum length)."""
        return self.pad_ids(self.tokenize(texts))

    def pad_ids(self, input_ids: Sequence[Sequence[int]], token_type_ids=None, side: str = "right",
                pad_id: int | None = None) -> dict[str, np.ndarray]:
        """Token-id lists → padded ``input_ids``/``attention_mask`` (+ ``token_type_ids``, ``position_ids`` if the
        graph takes them). ``pad_id``: the id padding positions get (default: :attr:`pad_token_id`). The rows are
        checked first (:meth:`check_ids`)."""
        self.check_ids(input_ids)
        vocab = self.vocabulary or 0
        length = max(len(r) for r in input_ids)
        inside = pad_id is not None and 0 <= pad_id < (vocab or pad_id + 1)
        pad = pad_id if inside else _pad_id(self.config, self._tokenizer)
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
            types = np.zeros_like(ids)
            for b, row in enumerate(input_ids):  # a text pair's second text: its own type (padding keeps 0)
                row_types = getattr(row, "token_types", None)
                if row_types:
                    start = length - len(row) if side == "left" else 0
                    types[b, start:start + len(row)] = row_types
            feeds["token_type_ids"] = types
        if "position_ids" in self.inputs:
            feeds["position_ids"] = _position_ids(mask)
        return feeds

    def check_ids(self, input_ids: Sequence[Sequence[int]]) -> None:
        """Refuse rows :meth:`pad_ids` cannot feed: no rows, an empty row, or ids that are not integers inside the
        vocabulary (:class:`ServingError`). The one rule for every path; alone, it builds no arrays (the generation
        engine checks each prompt with it on the event loop, where padding one only to check it cost 4x as much)."""
        if not input_ids or any(len(r) == 0 for r in input_ids):
            raise ServingError("every row needs at least one token")
        vocab = self.vocabulary or 0
        bad = [t for r in input_ids for t in r if not isinstance(t, (int, np.integer)) or t < 0 or (vocab and t >= vocab)]
        if bad:
            raise ServingError(f"token ids must be integers in [0, {vocab}); got {bad[:5]}")

    def serves(self, kind: str) -> bool:
        """Whether this graph answers ``kind`` (``"embed"``, ``"classify"`` or ``"generate"``): the one rule the
        methods below and every HTTP route check. Embeddings need an encoder's ``last_hidden_state``,
        classification its ``logits`` (a text-classification export), generation a decoder with past."""
        if kind not in KIND_NEEDS:
            raise ValueError(f"kind must be one of {', '.join(KIND_NEEDS)}; got {kind!r}")
        if kind == "generate":
            return self.with_past
        return not self.with_past and {"embed": "last_hidden_state", "classify": "logits"}[kind] in self.output_names

    def require(self, kind: str) -> None:
        """Raise :class:`~bca_deploy.errors.ServingError` when this graph does not answer ``kind``
        (:meth:`serves`), saying which export would."""
        if not self.serves(kind):
            raise ServingError(f"this graph was exported for {self.task!r}; {KIND_NEEDS[kind]}")

    def embed(self, inputs: Sequence[str] | Sequence[Sequence[int]], adapters: Sequence[str | None],
              pooling: str = "mean", normalize: bool = False, snapshot: BankSnapshot | None = None) -> np.ndarray:
        """Sentence embeddings (B, hidden) of texts or token-id lists, each row through its adapter.

        ``pooling``: ``"mean"`` over non-padding tokens (sentence-transformers' default), ``"cls"`` (first
        token) or ``"last"`` (last non-padding token); ``normalize``: L2-normalize each vector.

        Raises:
            ServingError: the graph gives no embeddings (a classifier or a decoder export; :meth:`serves`).
        """
        self.require("embed")
        if pooling not in ("mean", "cls", "last"):
            raise ServingError(f"pooling must be 'mean', 'cls' or 'last'; got {pooling!r}")
        feeds = self._feeds(inputs)
        hidden = self.run(feeds, adapters, ["last_hidden_state"], snapshot)["last_hidden_state"]  # (B, T, H)
        hidden = hidden.astype(np.float32)
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
        """Sequence classification, each row with its adapter's head and labels. ``inputs``: texts, text pairs
        (``[first, second]``: a classifier trained on two text columns reads them so), or token-id lists.

        Returns per row ``{"label", "score", "scores", "logits"}``: the best label's name (``id2label`` of
        the head the row used: its adapter's own, or the checkpoint's), its score, every label's score
        (softmax; sigmoid for ``multi_label_classification``; the raw value for ``regression``) and the
        row's logits, ``num_labels`` of them (the bank's padding labels are never part of an answer).

        Raises:
            UnknownAdapterError: an adapter name is not registered.
            ServingError: the graph does not classify, or a row's adapter (or the base model) has no
                classifier head (checked before anything runs).
        """
        self.require("classify")
        snapshot = snapshot or self._snapshot
        heads = snapshot.labels_of(adapters)
        self.check_text_pairs(inputs, adapters, snapshot)  # (the server checks them before they join a batch)
        # A decoder classifier reads each row's last token that is not its pad id (config.json's, baked into the
        # graph): rows are padded on the right with exactly that id, so each is read where it is read alone (a row of
        # pad tokens only at its first token, as transformers reads it), whatever its neighbours. Every classifier's
        # rows are padded so (an encoder masks its padding, so the id changes nothing there): a decoder's graph need
        # not say it is one (its text-classification graph has no position_ids input, as optimum's has none)
        pad = self.config.pad_token_id
        feeds = self._feeds(inputs, pad_id=pad if isinstance(pad, int) and not isinstance(pad, bool) else None)
        logits = self.run(feeds, adapters, ["logits"], snapshot)["logits"].astype(np.float64)
        results = []
        for row, labels in zip(logits, heads, strict=True):
            values = row[:labels.num_labels]
            scores = _label_scores(values, labels.problem_type)
            best = int(values.argmax())
            results.append({"label": labels.id2label[best], "score": float(scores[best]),
                            "scores": {name: float(s) for name, s in zip(labels.id2label, scores, strict=True)},
                            "logits": [float(v) for v in values]})
        return results

    def prepare(self, inputs: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 0,
                input_param: str = "input", max_text_tokens: int | None = None,
                keep_tokens: int | None = None, text_options: Mapping[str, Any] | None = None) -> list[list[int]]:
        """Check a request's rows before it joins a batch and return them as token-id lists.

        Texts are tokenized here, once (encoders truncate them at the model's maximum length), so a
        batch never waits on the tokenizer. A classifier's rows may be text pairs (``[first, second]``,
        :meth:`tokenize_pairs`): each becomes a :class:`PairRow`, whose token types the graph gets.

        ``keep_tokens`` (vLLM's ``truncate_prompt_tokens``, a count): each row is cut to that many tokens as vLLM cuts
        it: a decoder's text keeps its last tokens (vLLM's left truncation of prompts, special tokens kept), an
        encoder's its first ones (at most where it is cut anyway), a token-id row its last ones. ``text_options``: more
        of the tokenizer's for texts (a chat prompt's ``add_special_tokens``: the chat route's rendered text is cut by
        this same rule).

        Raises:
            ServingError: no rows, a mix of texts, pairs and token ids, an empty row, texts without a
                tokenizer, token ids outside the vocabulary, pairs for a graph that does not classify.
            ContextLengthError: rows (plus ``max_new_tokens``) longer than the model's positions
                (:meth:`check_positions`; ``input_param``: the request field that holds the rows).
        """
        if not inputs:
            raise ServingError("no inputs given")
        pairs = self._text_pairs(inputs)
        texts = [isinstance(x, str) for x in inputs]
        if any(texts) and not all(texts):
            raise ServingError("inputs must be all texts or all token-id lists, not a mix")
        if pairs:
            rows = self.tokenize_pairs(inputs, max_length=max_text_tokens)
        elif all(texts) and keep_tokens is not None and self.with_past:
            rows = self.tokenize(inputs, truncate=True, max_length=keep_tokens, side="left", **(text_options or {}))
        elif all(texts):
            if keep_tokens is not None:
                max_text_tokens = min(keep_tokens, max_text_tokens or keep_tokens)
            rows = self.tokenize(inputs, max_length=max_text_tokens, refuse_param=input_param,
                                 max_new_tokens=max_new_tokens, **(text_options or {}))
        else:
            rows = [list(x)[-keep_tokens:] if keep_tokens else list(x) for x in inputs]
        if (pairs or all(texts)) and self._tokenizer_mismatch:
            self._refuse_unembeddable_texts(rows)
        self.pad_ids(rows)  # raises on empty rows and out-of-vocabulary ids
        self.check_positions(max(len(r) for r in rows), max_new_tokens, input_param)
        return rows

    def check_text_pairs(self, inputs: Sequence[Any], adapters: str | None | Sequence[str | None],
                         snapshot: BankSnapshot | None = None) -> None:
        """Refuse single texts for a classifier head trained on text pairs, and pairs for one trained on single texts
        (the head's ``text_pair``, :attr:`~bca_deploy.config.HeadSpec.text_pair`): answered, either is a label read
        off an input the head never saw, without a word. ``adapters``: each row's, or one for every row. A head that
        records nothing (an adapter made elsewhere, or exported before it was recorded; the base model's) takes
        either; token-id rows are the client's own tokenization: taken. An unknown adapter or one without a head is
        left to the classify checks.

        Raises:
            ServingError: the first row of the other kind, naming its adapter and the form expected.
        """
        snapshot = snapshot or self._snapshot
        for index, row in enumerate(inputs):
            adapter = adapters if adapters is None or isinstance(adapters, str) else adapters[index]
            labels = snapshot.labels.get(BASE if adapter is None else adapter)
            if not (isinstance(row, str) or is_text_pair(row)):
                continue
            trained = text_pair_mismatch(getattr(labels, "text_pair", None), is_text_pair(row))
            if trained is None:
                continue
            name = f"adapter {adapter!r}" if adapter is not None else "the base model"
            if isinstance(row, str):
                raise ServingError(f"input {index}: a single text, but {name} {trained}: send each row as a pair, "
                                   "[first text, second text]")
            raise ServingError(f"input {index}: a text pair, but {name} {trained}: send each row as one text")

    def _text_pairs(self, inputs: Sequence[Any]) -> bool:
        """Whether ``inputs`` are text pairs (:func:`is_text_pair`); a mix of pairs and other rows is refused.

        Raises:
            ServingError: some rows are pairs and others are not, or the graph does not classify (a pair is one
                classifier example: embeddings and generation take single texts).
        """
        pairs = [is_text_pair(x) for x in inputs]
        if not any(pairs):
            return False
        if not all(pairs):
            raise ServingError("inputs must be all text pairs ([first text, second text]), all texts or all token-id "
                               "lists, not a mix")
        if not self.serves("classify"):
            raise ServingError(f"text pairs are classifier inputs; this graph was exported for {self.task!r}: send "
                               "single texts")
        return True

    def _refuse_unembeddable_texts(self, rows: Sequence[Sequence[int]]) -> None:
        """A text whose tokens the model cannot embed is the export's tokenizer's doing, not a bad token id the
        client sent: say which text and which tokens."""
        vocabulary = self.vocabulary or 0
        for index, row in enumerate(rows):
            outside = sorted({t for t in row if t >= vocabulary})
            if outside:
                names = token_names(self.tokenizer, outside[:5]) or [str(i) for i in outside[:5]]
                raise ServingError(f"input {index}: the text has tokens this model has no embedding for "
                                   f"({', '.join(names)}): {self._tokenizer_mismatch}")

    def check_positions(self, prompt_tokens: int, max_new_tokens: int = 0, input_param: str = "input") -> None:
        """Refuse a row of ``prompt_tokens`` that would grow beyond the model's positions with ``max_new_tokens``.

        The one rule for every path (native and OpenAI routes, the generation engine): a
        :class:`~bca_deploy.errors.ContextLengthError` (HTTP 400 ``context_length_exceeded``, saying "maximum
        context length" as OpenAI and vLLM do: clients such as LangChain and LiteLLM recognise a context overflow
        by that status and those words) whose ``param`` is ``input_param`` when the prompt alone is too long, else
        ``"max_new_tokens"``.
        """
        limit = self.max_positions
        if not limit or prompt_tokens + max_new_tokens <= limit:
            return
        if prompt_tokens >= limit or max_new_tokens == 0:
            raise self._prompt_too_long(input_param, f"{prompt_tokens} tokens", max_new_tokens)
        raise ContextLengthError(f"max_new_tokens: {prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed "
                                 f"the model's maximum context length of {limit} positions{self._window_note(limit)}; "
                                 f"ask for at most {limit - prompt_tokens} new tokens", param="max_new_tokens")

    def _prompt_too_long(self, input_param: str, tokens: str, max_new_tokens: int) -> ContextLengthError:
        """The refusal of a prompt longer than the context by itself (``tokens``: how many it has, in words)."""
        limit = self.max_positions
        return ContextLengthError(f"{input_param}: {tokens}; the model's maximum context length is {limit} positions"
                                  f"{self._window_note(limit)}"
                                  + (f", and {max_new_tokens} new tokens were asked for" if max_new_tokens else ""),
                                  param=input_param)

    def check_inputs(self, inputs: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 0) -> int:
        """:meth:`prepare`, returning the longest row's token count."""
        return max(len(r) for r in self.prepare(inputs, max_new_tokens))

    def _feeds(self, inputs, pad_id: int | None = None) -> dict[str, np.ndarray]:
        if self.with_past:
            raise ServingError(f"this graph was exported for {self.task!r} (a decoder with past); use generate()")
        if not inputs:
            raise ServingError("no inputs given")
        if all(isinstance(x, str) for x in inputs):
            return self.pad_ids(self.tokenize(inputs), pad_id=pad_id)  # encoders' texts cut at the model's positions
        if self._text_pairs(inputs):
            return self.pad_ids(self.tokenize_pairs(inputs), pad_id=pad_id)
        rows = [x if isinstance(x, PairRow) else list(x) for x in inputs]  # a prepared pair keeps its token types
        feeds = self.pad_ids(rows, pad_id=pad_id)
        self.check_positions(max(len(r) for r in rows))
        return feeds

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
        repetition_penalty: float | None | Sequence[float | None] = None,
        frequency_penalty: float | Sequence[float] = 0.0,
        presence_penalty: float | Sequence[float] = 0.0,
        min_p: float | Sequence[float] = 0.0,
        logit_bias: Mapping[int, float] | None | Sequence[Mapping[int, float] | None] = None,
        eos_token_id: int | Sequence[int] | None = None,
        snapshot: BankSnapshot | None = None,
    ) -> list[list[int]]:
        """Generate up to ``max_new_tokens`` per row, row b through adapter ``adapters[b]``, with past key values.

        The rows start together (prompts left-padded into one prefill run) and step together; a row that
        is done leaves the batch at once (see :class:`~bca_deploy.serving.decoding.DecodeBatch` for the
        padding, which keeps every row's logits equal to the row run alone). For requests that arrive at
        different times, :class:`~bca_deploy.serving.engine.GenerationEngine` lets rows join a running batch.
        Every sampling parameter is a scalar or one value per row: greedy rows take the argmax (PyTorch's
        ``generate(do_sample=False)`` token for token); sampled rows draw from softmax(logits / temperature)
        after min-p, top-k and top-p filtering, from their own generator seeded by ``seed`` (so a row's tokens do
        not depend on its batch). ``logit_bias`` then penalties come first, on the raw logits, as vLLM applies them
        (see :class:`~bca_deploy.serving.decoding.SamplingParams`).

        Args:
            repetition_penalty: transformers' and vLLM's (> 0; 1: off) over the prompt and the output so far;
                ``None``: the export's ``generation_config.json`` value (:attr:`generation_defaults`), else 1, as
                ``generate`` with the checkpoint's generation config applies it.
            frequency_penalty, presence_penalty: OpenAI's, in [-2, 2], over the output so far (0: off).
            min_p: vLLM's and transformers', in [0, 1] (0: off): a sampled row drops the tokens less likely than
                ``min_p`` times the most likely one, after the temperature.
            logit_bias: OpenAI's ``{token id: bias in [-100, 100]}`` added to those logits (greedy rows too); one
                mapping for every row, or a list of one per row (``None``: off).
            eos_token_id: the id(s) that end a row (default: :attr:`eos_token_ids`: the end-of-sequence ids of
                ``config.json``, ``generation_config.json`` and the tokenizer).
            snapshot: the bank to use (default: the current one) for every step.

        Returns:
            The new token ids of each row (without the prompt), ending at its first end-of-sequence
            token (included) or after its ``max_new_tokens``.

        Raises:
            SamplingParamsError: a sampling parameter is invalid (every bad field named).
            UnknownAdapterError: an adapter is not in the bank (before any work).
            ServingError: not a decoder graph, no prompts, one adapter name per prompt missing, bad token ids.
            ContextLengthError: a prompt plus its ``max_new_tokens`` longer than the model's positions
                (:meth:`check_positions`, :attr:`max_positions`), before any work.
        """
        from .decoding import DecodeBatch, DecodeRow, Sampler, SamplingParams, choose_tokens

        self.require("generate")
        if not inputs:
            raise ServingError("no prompts given")
        prompts = [self.tokenize([x], truncate=False, refuse_param="inputs")[0] if isinstance(x, str) else list(x)
                   for x in inputs]
        rows = len(prompts)
        if len(adapters) != rows:
            raise ServingError(f"{rows} prompts but {len(adapters)} adapter names (one per prompt)")
        per_row = {name: _per_row(value, name, rows) for name, value in (
            ("max_new_tokens", max_new_tokens), ("do_sample", do_sample), ("temperature", temperature),
            ("top_k", top_k), ("top_p", top_p), ("seed", seed), ("repetition_penalty", repetition_penalty),
            ("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty), ("min_p", min_p),
            ("logit_bias", logit_bias))}
        default_repetition = self.generation_defaults.repetition_penalty or 1.0
        per_row["repetition_penalty"] = [default_repetition if r is None else r for r in per_row["repetition_penalty"]]
        params = [SamplingParams(**{k: v[b] for k, v in per_row.items()}) for b in range(rows)]
        samplers = [Sampler(p, prompt) for p, prompt in zip(params, prompts, strict=True)]
        eos = self.eos_token_ids if eos_token_id is None else set(_per_row(eos_token_id, "eos_token_id", None))
        snapshot = snapshot or self._snapshot
        snapshot.ids(adapters)  # unknown names fail before any work
        self.pad_ids(prompts)  # empty rows and ids outside the vocabulary fail before any work
        for prompt, row_params in zip(prompts, params, strict=True):  # as the engine checks each row it takes
            self.check_positions(len(prompt), row_params.max_new_tokens, "inputs")
            row_params.check_vocabulary(self.generated_vocabulary)
        batch = DecodeBatch(self)
        todo = [DecodeRow(prompt, adapter, snapshot, owner=b) for b, (prompt, adapter) in enumerate(zip(prompts, adapters))]
        generated: list[list[int]] = [[] for _ in range(rows)]
        running = todo
        logits, failures = batch.prefill(todo)
        while True:
            if failures:
                raise next(iter(failures.values()))
            done = []
            tokens, failures = choose_tokens(logits, [samplers[r.owner] for r in running])
            if failures:
                raise next(iter(failures.values()))
            for row, token in zip(running, tokens, strict=True):
                out = generated[row.owner]
                out.append(token)
                if token in eos or len(out) >= params[row.owner].max_new_tokens:
                    done.append(row)
                else:
                    row.next_token = token
            batch.remove(done)
            if not batch.has_joined:
                return generated
            running, logits, failures = batch.step()

    @property
    def pad_token_id(self) -> int:
        """The id padding positions get (tokenizer's or config's pad id, else its end-of-sequence id, else 0)."""
        return _pad_id(self.config, self._tokenizer)

    # vocabulary and max_positions are computed once: config.json and the graph do not change under a session, and
    # transformers' config attribute reads made them ~10 us each, on every request (engine.submit's checks)
    @functools.cached_property
    def vocabulary(self) -> int | None:
        """How many token ids rows may use (``0..vocabulary-1``; None: unknown): ``config.json``'s ``vocab_size``, or
        the graph's word-embedding rows where those are fewer (:attr:`embedding_rows`; see :attr:`vocabulary_note`)."""
        bounds = [b for b in (vocabulary_size(self.config), self.embedding_rows) if b]
        return min(bounds) if bounds else None

    @functools.cached_property
    def logits_width(self) -> int | None:
        """How many token ids a generation step scores: the last dimension of the graph's ``logits`` output where the
        graph fixes it, else (a symbolic dimension, as a graph whose output layer is sliced by a computed bound has)
        the width one step of the base model on one token gives, run once (None: no ``logits``, not a decoder, or
        that run failed). Usually :attr:`vocabulary`; fewer where the output layer is narrower than the embedding (ids
        from there on are in prompts but never generated)."""
        output = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if output is None:
            return None
        if output.shape and isinstance(output.shape[-1], int) and output.shape[-1] > 0:
            return int(output.shape[-1])
        if not self.serves("generate"):
            return None
        from .decoding import DecodeBatch, DecodeRow

        # the width is the graph's whatever the row: a symbolic one left unread let a logit_bias id past it through,
        # biasing nothing (what generated_vocabulary refuses)
        with contextlib.suppress(Exception):
            logits, failures = DecodeBatch(self).prefill([DecodeRow([self.pad_token_id], None, self.snapshot())])
            if not failures and logits.ndim == 2 and logits.shape[-1] > 0:
                return int(logits.shape[-1])
        return None

    @functools.cached_property
    def generated_vocabulary(self) -> int | None:
        """How many token ids a generated row can choose (``0..n-1``; None: unknown): :attr:`vocabulary`, or
        :attr:`logits_width` where that is fewer. The bound of the ids a row's settings name (``logit_bias``,
        ``stop_token_ids``: :meth:`~bca_deploy.serving.decoding.SamplingParams.check_vocabulary`): one past it biases
        or ends nothing, a client's mistake, as vLLM refuses a ``logit_bias`` id past the model's vocabulary size."""
        bounds = [b for b in (self.vocabulary, self.logits_width) if b]
        return min(bounds) if bounds else None

    @property
    def vocabulary_note(self) -> str | None:
        """One line for the operator when ``config.json`` claims more token ids than the graph embeds, else None."""
        claimed = vocabulary_size(self.config)
        if not claimed or not self.embedding_rows or claimed <= self.embedding_rows:
            return None
        return (f"{self.export_dir / 'config.json'} claims vocab_size {claimed}, but the graph embeds "
                f"{self.embedding_rows} token ids: ids from {self.embedding_rows} on are refused; correct the file or "
                "export the model again")

    @property
    def eos_token_ids(self) -> set[int]:
        """The end-of-sequence ids a generated row ends with: the model config's, ``generation_config.json``'s
        and the tokenizer's (as vLLM, and as ``generate`` with the checkpoint's generation config: chat models
        often name their end-of-turn token only there)."""
        if self._eos_token_ids is None:
            ids = _eos_ids(self.config, None) | set(self.generation_defaults.eos_token_ids)
            tokenizer = None
            with contextlib.suppress(ServingError):  # an export without a tokenizer: token ids in and out
                tokenizer = self.tokenizer
            tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
            if isinstance(tokenizer_eos, int) and not isinstance(tokenizer_eos, bool):
                ids.add(tokenizer_eos)
            vocabulary = self.vocabulary
            self._eos_token_ids = frozenset(i for i in ids if 0 <= i and (not vocabulary or i < vocabulary))
        return set(self._eos_token_ids)

    @property
    def generation_notes(self) -> list[str]:
        """What of the export's ``generation_config.json`` is not used, one line each, for the operator: values
        transformers would not accept (:attr:`GenerationDefaults.problems`) and end-of-sequence ids outside the
        model's vocabulary (no row could end with them)."""
        defaults = self.generation_defaults
        vocabulary = self.vocabulary
        outside = [i for i in defaults.eos_token_ids if vocabulary and i >= vocabulary]
        notes = list(defaults.problems)
        if outside:
            shown = ", ".join(map(str, outside[:5])) + (", ..." if len(outside) > 5 else "")
            notes.append(f"{self.export_dir / GENERATION_CONFIG_FILE}: eos_token_id {shown} outside the model's "
                         f"{vocabulary} token ids (ignored)")
        return notes

    @property
    def generation_defaults(self) -> GenerationDefaults:
        """What the export's ``generation_config.json`` says about generating (read once; see
        :class:`GenerationDefaults`)."""
        if self._generation_defaults is None:
            self._generation_defaults = GenerationDefaults.read(self.export_dir / GENERATION_CONFIG_FILE)
        return self._generation_defaults

    @functools.cached_property
    def max_positions(self) -> int | None:
        """The most tokens (prompt + generated) one row can hold (None: unknown): the config's position limit,
        the graph's own position table (:attr:`position_table`, where it has one: the config only claims a limit,
        see :attr:`positions_note`), and for a graph with past of a sliding-window model its window
        (:func:`bca_deploy.models.attention_window`: the graph's past stops growing there, so a longer row could not
        be continued), whichever is lowest."""
        limit = position_limit(self.config)
        table = self.position_table.limit if self.position_table is not None else None
        window = attention_window(self.config) if self.with_past else None
        bounds = [int(b) for b in (limit, table, window) if b]
        return min(bounds) if bounds else None

    def _truncation_length(self, max_length: int | None) -> int:
        """The tokens a truncated text (an encoder's text, a text pair) is cut to: :meth:`text_limit` (512 where
        unknown), or ``max_length`` where lower (a sentence-transformers model's ``max_seq_length``)."""
        return min(b for b in (self.text_limit(self.tokenizer) or 512, max_length) if b)

    def text_limit(self, tokenizer: Any = None) -> int | None:
        """The most tokens a text is cut to where texts are truncated (None: unknown): :attr:`max_positions`, or
        the tokenizer's ``model_max_length`` where that is lower (:func:`~bca_deploy.models.tokenizer_limit`)."""
        bounds = [b for b in (self.max_positions, tokenizer_limit(tokenizer)) if b]
        return min(bounds) if bounds else None

    @property
    def positions_note(self) -> str | None:
        """One line for the operator when the export's ``config.json`` (or its loaded tokenizer's
        ``tokenizer_config.json``) claims more positions than the graph's position table holds, else None: the
        table is what requests are held to (:attr:`max_positions`), so longer rows get a context-length error or,
        where texts are truncated, are cut at the table; before, they failed inside onnxruntime (HTTP 500)."""
        table = self.position_table
        if table is None:
            return None
        claims = []
        config_limit = position_limit(self.config)
        if config_limit is not None and config_limit > table.limit:
            written = vars(self.config)  # the fields config.json holds (GPT-2's max_position_embeddings is an alias)
            keys = ("max_position_embeddings", "n_positions") + (
                ("pad_token_id",) if getattr(self.config, "model_type", None) in POSITIONS_AFTER_PADDING else ())
            fields = ", ".join(f"{key}: {written[key]}" for key in keys if isinstance(written.get(key), int))
            claims.append(f"{self.export_dir / 'config.json'} claims rows of up to {config_limit} tokens ({fields})")
        stated = tokenizer_limit(self._tokenizer)
        if stated is not None and stated > table.limit:
            claims.append(f"its tokenizer claims rows of up to {stated} tokens (tokenizer_config.json "
                          f"model_max_length: {stated})")
        if not claims:
            return None
        return (f"{' and '.join(claims)}, but the graph's position table {table.describe()} holds rows of up to "
                f"{table.limit}: requests are held to {table.limit} tokens (longer rows are refused as too long for "
                "the model, or cut where texts are truncated); correct the file or export the model again")

    @property
    def truncation_note(self) -> str | None:
        """One line for the operator when texts are cut (encoders) at the tokenizer's ``model_max_length`` although
        the model holds longer rows: every text longer than that is answered from its first tokens only (a
        ``model_max_length`` of 3 made every text ``[CLS] word [SEP]``). None otherwise, or before the tokenizer
        is loaded."""
        stated = tokenizer_limit(self._tokenizer)
        model = self.max_positions
        if self.with_past or stated is None or model is None or stated >= model:
            return None
        return (f"texts are cut at {stated} tokens: the tokenizer_config.json of {self.export_dir} says "
                f"model_max_length {stated}, and the model holds {model} positions; correct the file if that is not "
                "meant")

    def _window_note(self, limit: int) -> str:
        """What to add to "N positions" when the sliding window is what sets N."""
        if self.with_past and attention_window(self.config) == limit:
            return " (its sliding window: the exported graph keeps no more past than that)"
        return ""

    def warm_up(self) -> float:
        """Load the tokenizer (if the export has one) and run one 1-token row on the base model, so the
        first request does not pay for them. Returns the seconds it took.

        Raises:
            ServingError: the export has tokenizer files and they do not load (:attr:`tokenizer_error`).
        """
        start = time.perf_counter()
        with contextlib.suppress(ServingError):
            self.tokenizer  # noqa: B018
        if self.tokenizer_error:  # a server would start and answer every text with an error (vLLM refuses to start)
            raise ServingError(f"{self.tokenizer_error}: a server does not start with a tokenizer it cannot use. Fix "
                               "or replace its files (export again from the model directory), or remove them to serve "
                               "token ids only")
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
            "head_layers": None if self.head is None else [layer.module for layer in self.head.layers],
            "bank": self.bank_memory(),
            "adapters": [a.name for a in self.adapters()],
        }


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's characters -> the bytes they stand for (GPT-2's ``bytes_to_unicode``, which RoBERTa, Llama 3,
    Qwen and every ``tokenizers`` ``ByteLevel`` model share): printable Latin-1 bytes are themselves, the 68 others
    are written as the characters from U+0100 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_alphabet()
#: SentencePiece's byte-fallback pieces (Llama 2, Mistral, Gemma): one byte each.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoders(tok) -> frozenset[str]:
    """Which of the byte decoders ("ByteLevel", "ByteFallback") the tokenizer's decoder uses (a fast tokenizer's
    decoder, its sequence's parts included; a slow GPT-2 tokenizer: "ByteLevel")."""
    if getattr(tok, "byte_decoder", None):
        return frozenset({"ByteLevel"})
    decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
    try:
        state = json.loads(decoder.__getstate__()) if decoder is not None else {}
    except (TypeError, ValueError, AttributeError):
        return frozenset()
    kinds, todo = set(), [state]
    while todo:
        part = todo.pop()
        if isinstance(part, dict):
            kinds.add(part.get("type"))
            todo += part.get("decoders") or []
    return frozenset(kinds & {"ByteLevel", "ByteFallback"})


def token_pieces(tok, token_ids: Sequence[int]) -> dict[int, tuple[str, bytes]]:
    """Each token id's ``(text, bytes)`` in log-probabilities (:meth:`MultiAdapterSession.token_texts`,
    :meth:`~MultiAdapterSession.token_bytes`): the id decoded alone (special tokens kept) and its UTF-8, except a
    token of a byte decoder (byte-level BPE's, SentencePiece's byte fallback) whose bytes are not valid UTF-8 alone
    (a character's first or last bytes): its decode is ``"\ufffd"``, the same for every such token, so it is written
    as OpenAI writes it, ``"bytes:"`` and each byte as ``\\xNN``, with its true bytes."""
    kinds = _byte_decoders(tok)
    added = getattr(tok, "added_tokens_decoder", None) or {}
    out: dict[int, tuple[str, bytes]] = {}
    for token in token_ids:
        text = tok.decode([token], skip_special_tokens=False)
        raw = None
        if "\ufffd" in text and kinds and token not in added:  # only a partial character decodes to U+FFFD
            raw = _token_raw_bytes(str(tok.convert_ids_to_tokens(token)), kinds)
        if raw is not None:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                out[token] = ("bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw)
                continue
        out[token] = (text, text.encode("utf-8"))
    return out


def _token_raw_bytes(piece: str, kinds: frozenset[str]) -> bytes | None:
    """The bytes a vocabulary piece stands for under a byte decoder, or None where it is not a byte piece."""
    if "ByteFallback" in kinds and (match := _BYTE_PIECE.fullmatch(piece)):
        return bytes([int(match.group(1), 16)])
    if "ByteLevel" in kinds and all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    return None


#: What a head file (``.npz``) may hold on top of its arrays' bytes at 8 bytes a value: .npy headers, zip records.
_HEAD_FILE_SLACK = 64 * 1024
_HEAD_FILE_SLACK_PER_MEMBER = 16 * 1024


class TurnPool:
    """Interchangeable items (copies of a tokenizer), each used by one thread at a time, granted in the order they
    were asked for: ``with pool.use() as item: ...``.

    In order, because ``threading.Lock`` is not fair: a thread that releases it and asks again at once usually gets it
    back before a waiting thread wakes, so a request tokenizing many texts one at a time would keep another request's
    single text waiting for all of them. Several items, so that one request's long text (4 MB of chat took 5 s to
    tokenize) holds one copy while every other request uses the others. A waiter interrupted (``KeyboardInterrupt``
    in the main thread) gives its turn up, so the pool never waits for a ticket nobody holds.
    """

    def __init__(self, items: Sequence[Any], make: Callable[[], Any] | None = None, most: int | None = None) -> None:
        """``items`` to start with; ``make()`` makes another when every item is in use, up to ``most`` in all (so a
        server that never tokenizes two texts at once holds one copy)."""
        if not items:
            raise ValueError("a TurnPool needs at least one item")
        self._turns = threading.Condition(threading.Lock())
        self._free = list(items)
        self._make = make
        self._room = max(0, (most or len(items)) - len(items)) if make is not None else 0  # items still to make
        self._next = 0  # the ticket the next request for an item takes
        self._serving = 0  # the ticket that gets the next free item
        self._abandoned: set[int] = set()

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        with self._turns:
            ticket = self._next
            self._next += 1
            try:
                while ticket != self._serving or not (self._free or self._room):
                    self._turns.wait()
            except BaseException:
                if ticket == self._serving:
                    self._advance()  # its turn had come: pass it on
                else:
                    self._abandoned.add(ticket)  # skipped when its turn comes
                raise
            make = not self._free
            if make:
                self._room -= 1
            else:
                item = self._free.pop()
            self._advance()
        if make:  # made outside the lock: the next in turn need not wait for it
            try:
                assert self._make is not None
                item = self._make()
            except BaseException:
                with self._turns:
                    self._room += 1
                    self._turns.notify_all()
                raise
        try:
            yield item
        finally:
            with self._turns:
                self._free.append(item)
                self._turns.notify_all()

    def _advance(self) -> None:
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._turns.notify_all()


def _read_head_file(path: Path, expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The arrays of a head file (``np.savez``: one ``<input>.npy`` member per head input) as float32, each
    checked before it is read: the file a regular file no larger than ``expected`` (input -> shape) can make it,
    each member named after one of its inputs (once), its ``.npy`` header (read without decompressing the data)
    a real float array (float16/32/64) of the expected shape. So a small file cannot make the reader allocate
    what a header declares (a deflated zip member expands about 1000 times), and a datetime, complex or
    structured array is not silently cast to float32.

    Raises:
        ServingError: naming ``path`` (and the member) and what is wrong.
    """
    import os

    from numpy.lib import format as npy

    try:
        file = open_regular(path)  # a FIFO, a device, a directory: refused before opening (a FIFO would block)
    except OSError as exc:
        raise ServingError(f"{path}: cannot read the base model's head ({exc.strerror or exc})") from None
    with file:
        info = os.fstat(file.fileno())
        limit = 8 * sum(int(np.prod(s)) for s in expected.values()) + _HEAD_FILE_SLACK + \
            _HEAD_FILE_SLACK_PER_MEMBER * len(expected)
        if info.st_size > limit:
            raise ServingError(f"{path}: {info.st_size} bytes, more than this bank's head can take ({limit} bytes at "
                               "most); not the file bca-deploy export wrote (re-export the bank)")
        try:
            with zipfile.ZipFile(file) as archive:
                members = archive.infolist()
                problems, seen = [], set()
                for member in members:
                    name = member.filename.removesuffix(".npy")
                    if not member.filename.endswith(".npy") or name not in expected:
                        problems.append(f"{name[:200]}: not a head input of this graph")
                    elif name in seen:
                        problems.append(f"{name}: stored twice")
                    else:
                        seen.add(name)
                        problem = _npy_header_problem(archive, member, expected[name], npy)
                        if problem:
                            problems.append(f"{member.filename}: {problem}")
                if problems:
                    raise ServingError(format_problems(f"{path}: the base model's head does not fit this bank graph "
                                                       "(re-export the bank):", problems))
                tensors = {}
                for member in members:
                    with archive.open(member) as data:
                        array = npy.read_array(data, allow_pickle=False)
                    tensors[member.filename.removesuffix(".npy")] = np.asarray(array, dtype=np.float32)
                return tensors
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
            raise ServingError(f"{path}: cannot read the base model's head ({exc})") from None


def _npy_header_problem(archive: zipfile.ZipFile, member: zipfile.ZipInfo, shape: tuple[int, ...], npy) -> str | None:
    """What is wrong with the ``.npy`` header of ``member`` for a float array of ``shape`` (None: nothing); only the
    header is decompressed."""
    try:
        with archive.open(member) as data:
            version = npy.read_magic(data)
            if version == (1, 0):
                found, _, dtype = npy.read_array_header_1_0(data)
            elif version == (2, 0):
                found, _, dtype = npy.read_array_header_2_0(data)
            else:
                return f".npy format version {version[0]}.{version[1]}, expected 1.0 or 2.0"
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        return f"not a .npy array ({first_line(exc, 200)})"
    if dtype.kind != "f" or dtype.itemsize > 8 or dtype.fields is not None or dtype.subdtype is not None:
        return f"dtype {str(dtype)[:100]}, expected a real float array (float16, float32 or float64)"
    if tuple(found) != tuple(shape):
        return f"{tuple(found)}, expected {tuple(shape)}"
    return None


def _per_row(value, name: str, rows: int | None) -> list:
    """``value`` as one entry per row: a scalar repeats; a sequence must have ``rows`` entries (any if None)."""
    values = list(value) if isinstance(value, (list, tuple, set, np.ndarray)) else [value] * (rows or 1)
    if rows is not None and len(values) != rows:
        raise ServingError(f"{name}: {len(values)} values for {rows} rows")
    return values


def _label_scores(logits: np.ndarray, problem_type: str | None) -> np.ndarray:
    """Scores of one row's labels (float64): softmax; sigmoid for multi-label; the logits for regression."""
    if problem_type == "regression":
        return logits
    if problem_type == "multi_label_classification":
        return 1.0 / (1.0 + np.exp(-logits))
    probs = np.exp(logits - logits.max())
    return probs / probs.sum()


def _grouping_order(ids: np.ndarray, feeds: Mapping[str, Any]) -> np.ndarray | None:
    """The row order that groups rows by adapter slot (stable), or None when there is nothing to reorder: the rows
    are already grouped, or a feed is not a numpy array with one row per adapter (OrtValues, past key values)."""
    runs = 1 + int(np.count_nonzero(ids[1:] != ids[:-1])) if len(ids) else 0
    if runs == len(np.unique(ids)):  # every adapter's rows are contiguous already
        return None
    if not all(isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == len(ids) for v in feeds.values()):
        return None
    return np.argsort(ids, kind="stable")


def _rows_restored(array: np.ndarray, restore: np.ndarray) -> np.ndarray:
    """``array``'s rows back in request order (outputs without one row per request are returned as they are)."""
    return array[restore] if array.ndim >= 1 and array.shape[0] == len(restore) else array


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
    # Padding positions are masked, so any id inside the vocabulary does; a config's pad/eos id can lie outside
    # it (tiny test configs keep GPT-2's 50256), which the embedding lookup would refuse.
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    for source in (tokenizer, config):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None and 0 <= int(value) and (not vocab or int(value) < vocab):
                return int(value)
    return 0


GENERATION_CONFIG_FILE = "generation_config.json"


#: generation_config.json settings that change what transformers' generate() answers, with their neutral values: a
#: checkpoint that sets one is named at start, as not applied. (``repetition_penalty``, which Qwen2.5-Instruct ships
#: at 1.05, is applied: :attr:`GenerationDefaults.repetition_penalty`; so is ``min_p``, as vLLM reads it:
#: :attr:`GenerationDefaults.min_p`.)
_NOT_APPLIED: dict[str, Any] = {
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_new_tokens": 0, "min_length": 0,
    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "sequence_bias": None, "num_beams": 1, "penalty_alpha": None,
}


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """The generation settings a checkpoint ships in ``generation_config.json`` (export copies it), as vLLM reads
    them: its end-of-sequence ids stop every row, and its sampling values are the defaults of an OpenAI request
    that does not give its own (``temperature``, ``top_p``, ``top_k``, ``min_p``), and its ``repetition_penalty`` that of
    every
    generation request (OpenAI's, the native ``/v1/generate``, :meth:`MultiAdapterSession.generate`), greedy or
    sampled, as vLLM (``--generation-config auto``) and transformers' ``generate`` apply it. None: the file does not
    say.

    ``problems``: values that are not what transformers means by them (each ignored, and said at start).
    """

    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    problems: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    min_p: float | None = None

    @property
    def applied(self) -> dict[str, float | int]:
        """The sampling defaults the file sets (those it leaves out or holds at their neutral value are not listed),
        for the operator at start, as vLLM lists them."""
        values = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                  "min_p": self.min_p, "repetition_penalty": self.repetition_penalty}
        neutral = {"repetition_penalty": 1.0, "min_p": 0.0}
        return {k: v for k, v in values.items() if v is not None and not (k in neutral and v == neutral[k])}

    @classmethod
    def read(cls, path: Path) -> GenerationDefaults:
        from ..config import read_json, show_json_value
        from ..errors import BCAError

        if not os.path.lexists(path):  # there but not a file (a link to nothing): read_json names it, below
            return cls()
        try:
            data = read_json(path, what="generation config", allow_nan=True, unique_keys=False)
        except BCAError as exc:
            return cls(problems=(f"{exc}; its end-of-sequence ids and sampling defaults are not used",))
        problems = []

        def number(key: str, low: float, high: float, low_open: bool = False) -> float | None:
            value = data.get(key)
            if value is None:
                return None
            if (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and (low < value if low_open else low <= value) and value <= high):
                return float(value)
            problems.append(f"{key} {show_json_value(value)} is not a number in {'(' if low_open else '['}{low:g}, "
                            f"{high:g}]")
            return None

        # (temperature: any finite value >= 0, as transformers takes it; a request's own is held to OpenAI's 0..2)
        temperature, top_p = number("temperature", 0, math.inf), number("top_p", 0, 1, low_open=True)
        repetition_penalty = number("repetition_penalty", 0, math.inf, low_open=True)  # transformers: > 0
        min_p = number("min_p", 0, 1)  # transformers' MinPLogitsWarper and vLLM: [0, 1]
        top_k = data.get("top_k")
        if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= -1):
            problems.append(f"top_k {show_json_value(top_k)} is not an integer >= -1")
            top_k = None
        eos = data.get("eos_token_id")
        listed = eos if isinstance(eos, list) else [] if eos is None else [eos]
        ids = tuple(v for v in listed if isinstance(v, int) and not isinstance(v, bool) and v >= 0)
        if len(ids) != len(listed):
            problems.append(f"eos_token_id {show_json_value(eos)} is not a token id or a list of them")
            ids = ()
        for key, neutral in _NOT_APPLIED.items():  # settings transformers' generate() applies and this server does not
            value = data.get(key)
            if value is not None and value != neutral and value != [] and value is not False:
                problems.append(f"{key} {show_json_value(value)}: this server does not apply it, so its answers differ "
                                "from transformers' generate() with this file")
        where = f"{path}: "
        return cls(eos_token_ids=ids, temperature=temperature, top_p=top_p, top_k=top_k,
                   problems=tuple(where + p + " (ignored)" for p in problems), repetition_penalty=repetition_penalty,
                   min_p=min_p)


def _eos_ids(config, eos_token_id) -> set[int]:
    value = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])}
