"""Merge block-circulant adapters into dense weights: in memory, and streaming over safetensors checkpoints.

Two ways to get a plain model whose weights carry the adapters:

* **In memory** (:func:`merge`, :func:`unmerge`, :func:`merge_and_unload`): every :class:`BCALinear` adds
  its ΔW into the base weight. The sum is formed in fp32 and rounded once to the base dtype; ``unmerge``
  restores the original weights bit for bit (the pre-merge weight is kept).
* **Streaming** (:func:`merge_checkpoint`): reads a transformers model directory shard by shard, tensor
  by tensor, adds ``Σ_a weight_a · ΔW_a`` to every adapted weight and writes a standard model directory
  that ``AutoModel*.from_pretrained`` loads with no trace of bca-deploy. The whole model is never in
  memory: adapted weights go through in row blocks of a few MB (each mapped from the checkpoint, merged
  and written while still in the CPU cache, then unmapped), other tensors are copied file to file by the
  kernel, so peak RSS is the Python + torch baseline plus the adapters' kernels plus a few blocks,
  whatever the model's size. Like every reader that maps a checkpoint (safetensors' own ``safe_open``),
  the merge expects its input files not to be truncated while it runs.

The safetensors format is implemented here directly (it is small): 8-byte little-endian header length
N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
padded with spaces to a multiple of 8, then the raw little-endian tensor bytes, contiguous, in offset
order. Shapes and dtypes do not change in a merge, so each output header is computed from the input
header before any tensor is read, and each shard is written front to back.

The dense ΔW of one module, in the base weight's storage layout, is :func:`dense_delta` (built on
:func:`bca_deploy.ops.materialize`). The streaming path adds the same values without building the
matrix: each circulant block is a Toeplitz arrangement of the (scaled) kernel, so ΔW is a zero-copy
numpy view with a negative stride over ``concat(k, k)`` (:func:`_storage_delta_view`), added to
cache-sized row blocks of the weight (ΔW's block-row i depends on kernel row i only). The two give
bit-identical results (a gather copies values; the scale is one fp32 multiply per value either way),
which the tests check. The view is ~25x faster than gathering with ``materialize`` on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import importlib
import json
import math
import mmap
import os
import shutil
import struct
import threading
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from .adapter_io import peft_copied_modules, read_adapter
from .atomic import (atomic_dir, check_inputs_outside, check_outside_adapters, check_target, copied_link_problem,
                     recover)
from .config import (
    CONFIG_FILE,
    KERNEL_SUFFIX,
    AdapterConfig,
    HeadSpec,
    ModuleSpec,
    TaskSpec,
    adapter_as_model_hint,
    parse_json_object,
    read_json,
    run_adapter_dir,
    show_json_value,
)
from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterNameError,
    CheckpointFormatError,
    InvalidOptionError,
    NonFiniteError,
    OutputExistsError,
    format_problems,
    require_readable,
    why_not_readable,
)
from .fit import (
    ForeignBaseWarning,
    ModuleInfo,
    ParamInfo,
    Target,
    adapter_problems,
    align_paths,
    base_name_note,
    conversion_mapping,
    converted_key,
    model_target,
    model_type_problem,
    prefix_forms,
    resolve_tied,
    split_base_key,
    target_problems,
)
from .inject import bca_layers, mark_untied, remove_adapters, restore_tie_config, shared_weight_layers
from .layers import BCALinear, dense_delta
from .peft_compat import is_peft_config

__all__ = [
    "merge",
    "unmerge",
    "merge_and_unload",
    "dense_delta",
    "merge_checkpoint",
    "CheckpointFormatError",
    "TensorInfo",
    "SafetensorsHeader",
    "read_safetensors_header",
    "SafetensorsWriter",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


# ================================================================================================
# In-memory merge
# ================================================================================================


def _selected_names(layers: list[tuple[str, BCALinear]], adapter_names: str | Iterable[str] | None) -> list[str] | None:
    if adapter_names is None:
        return None
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = {n for _, layer in layers for n in layer.bca_kernels}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterNameError(f"unknown adapter(s) {unknown}; this model has {sorted(known)}")
    return names


def _layer_selection(layer: BCALinear, names: list[str] | None) -> list[str]:
    chosen = layer.active_adapters if names is None else [n for n in names if n in layer.bca_kernels]
    return [n for n in chosen if n not in layer.merged_adapters]


def merge(
    model: nn.Module, adapter_names: str | Iterable[str] | None = None, keep_original: bool = True
) -> nn.Module:
    """Add the ΔW of adapters into the base weight of every :class:`BCALinear` of ``model`` (in place).

    The sum ``W + Σ ΔW`` is formed in fp32 and rounded once to the base dtype. Merged adapters are
    skipped by ``forward``, so outputs do not change (up to that one rounding for bf16/fp16 bases).
    Every kernel is checked for NaN/Inf before any weight changes; if a layer still fails, the layers
    merged by this call are unmerged again. A layer whose weight Parameter is shared with another module
    (an ``lm_head`` tied to the input embedding) is untied: it gets its own ``W + ΔW``, the other module keeps
    ``W``, and the config's ``tie_word_embeddings`` is set False (so ``save_pretrained``/``from_pretrained``
    keep them apart); :func:`unmerge` ties it again and sets the flag back.

    Args:
        model: a model carrying BCA adapters.
        adapter_names: adapter name(s) to merge; default: each layer's active adapters.
        keep_original: keep an exact copy of each pre-merge weight so :func:`unmerge` restores it bit
            for bit (costs one weight copy per adapted layer). Without it, unmerge subtracts in fp32.

    Returns:
        The same ``model``.

    Raises:
        ValueError: an unknown adapter name, or the model has no BCA layers.
        AdapterFormatError: a kernel holds NaN/Inf (every such kernel is listed).
    """
    layers = list(bca_layers(model))
    if not layers:
        raise InvalidOptionError(f"this {type(model).__name__} has no BCA layers; inject or load an adapter first")
    names = _selected_names(layers, adapter_names)
    problems = [
        f"{path}.bca_kernels.{n}: has NaN/Inf values"
        for path, layer in layers
        for n in _layer_selection(layer, names)
        if not torch.isfinite(layer.bca_kernels[n].detach()).all()
    ]
    if problems:
        raise NonFiniteError(format_problems("refusing to merge non-finite adapter kernels:", problems))
    # A weight shared with another module (a tied lm_head and input embedding) is untied, not added to in
    # place: the other module must keep computing with W.
    tied = shared_weight_layers(model, layers)
    merged_now: list[BCALinear] = []
    try:
        for path, layer in layers:
            selection = _layer_selection(layer, names)
            if not selection:
                continue
            had_merged = bool(layer.merged_adapters)
            layer.merge(selection, keep_original=keep_original, untie=path in tied)
            if not had_merged:
                merged_now.append(layer)
    except Exception:
        for layer in merged_now:
            layer.unmerge()
        raise
    mark_untied(model, [layer for _, layer in layers])
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` on every :class:`BCALinear` (bit-exact where the original was kept; a weight the
    merge untied is tied again, and ``tie_word_embeddings`` set back)."""
    layers = [layer for _, layer in bca_layers(model)]
    for layer in layers:
        layer.unmerge()
    restore_tie_config(model, layers)
    return model


def merge_and_unload(model: nn.Module, adapter_names: str | Iterable[str] | None = None) -> nn.Module:
    """Merge adapters into the base weights and unwrap every :class:`BCALinear`: a plain model remains.

    Adapters already merged stay in the weights. The adapter configs registered on the model are
    dropped; the result has no trace of bca-deploy (``save_pretrained`` writes a standard checkpoint).

    Args:
        model: a model carrying BCA adapters.
        adapter_names: adapter(s) to merge; default: each layer's active adapters.

    Returns:
        The same ``model``, unwrapped.
    """
    merge(model, adapter_names, keep_original=False)
    for _, layer in bca_layers(model):
        layer.active_adapters = list(layer.merged_adapters)  # nothing more to merge while unwrapping
    return remove_adapters(model, merge=True)


# ================================================================================================
# The safetensors format
# ================================================================================================

# Bounds on a header's shapes (far above any real tensor) that keep every size computed from them exact.
_MAX_TENSOR_DIMS = 32
_MAX_TENSOR_ELEMENTS = 2**48
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
#: Every safetensors dtype name -> the torch dtype (those this torch has), for entries read as meta tensors.
_META_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("I16", "int16"), ("U16", "uint16"), ("I32", "int32"),
    ("U32", "uint32"), ("I64", "int64"), ("U64", "uint64"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("F32", "float32"), ("F64", "float64"), ("C64", "complex64"), ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E8M0", "float8_e8m0fnu")) if hasattr(torch, attr)}


#: The inverse of :data:`_META_DTYPES`: a torch dtype -> its safetensors name (those this torch has).
_META_DTYPE_NAMES = {dtype: name for name, dtype in _META_DTYPES.items()}


def safetensors_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``"F32"``, ``"I64"``, ``"F8_E4M3"``), else torch's without its prefix."""
    return _META_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()} | {
    torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file.

    Attributes:
        name: the tensor's key.
        dtype: safetensors dtype string (``"F32"``, ``"BF16"``, ...).
        shape: its shape.
        offset: start of its bytes, relative to the data section (``data_offsets[0]``).
        nbytes: its size in bytes (``data_offsets[1] - data_offsets[0]``).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @classmethod
    def new(cls, name: str, dtype: str | torch.dtype, shape: Sequence[int]) -> TensorInfo:
        """An entry for a tensor to be written (offset 0; a writer lays entries out in order)."""
        if isinstance(dtype, torch.dtype):
            if dtype not in _DTYPE_NAMES:
                raise ValueError(f"tensor {name}: torch dtype {dtype} has no safetensors name here")
            dtype = _DTYPE_NAMES[dtype]
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"tensor {name}: dtype {dtype!r} has no known size; known: {sorted(_DTYPE_BYTES)}")
        shape = tuple(int(d) for d in shape)
        return cls(name, dtype, shape, 0, math.prod(shape) * _DTYPE_BYTES[dtype])

    def meta_tensor(self) -> torch.Tensor | None:
        """A tensor of this entry's dtype and shape on the meta device (no memory), or None for a dtype this torch
        has no type for: what shape-and-dtype checks (PEFT conversion) read before any data is."""
        dtype = _META_DTYPES.get(self.dtype)
        return None if dtype is None else torch.empty(self.shape, dtype=dtype, device="meta")


@dataclass
class SafetensorsHeader:
    """The parsed header of a safetensors file.

    Attributes:
        path: the file.
        tensors: every tensor, in the order of its bytes in the file.
        metadata: the ``__metadata__`` string map, or None when absent.
        data_start: file offset of the data section (8 + header length).
    """

    path: Path
    tensors: list[TensorInfo]
    metadata: dict[str, str] | None
    data_start: int

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def read_safetensors_header(path: str | Path, max_tensors: tuple[int, str] | None = None) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file (the tensor bytes are not read).

    Checks what a reader relies on: header length within the file, valid JSON, every entry with a dtype,
    a shape and data offsets, offsets contiguous from 0 and covering the data section exactly, and
    sizes equal to ``prod(shape) * itemsize`` for dtypes whose size is known.

    Args:
        path: the file.
        max_tensors: ``(most tensors, what allows that many)`` when the caller knows how many the file can hold (an
            adapter's config): a header declaring more is refused once parsed, before any per-tensor work (240,000
            empty tensors in a 16 MB header took ~9 s to check one by one before their refusal).

    Raises:
        CheckpointFormatError: naming the file and the offending tensor.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointFormatError(f"{path}: {size} bytes, too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointFormatError(
                    f"{path}: header length {header_len} is impossible for a {size}-byte file; not safetensors?"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointFormatError(f"{path}: cannot read ({exc})") from exc

    def refuse_count(count: int) -> None:
        if max_tensors is not None and count > max_tensors[0]:
            raise CheckpointFormatError(f"{path}: the header declares {count:,} tensors, more than {max_tensors[1]} "
                                        f"({max_tensors[0]:,} at most); refused before reading them")

    # Each entry's "data_offsets" key, counted at C speed before the parse (whose hooks cost ~7 us per entry); a key
    # written with escapes is not counted here but by the check of the parsed header below.
    refuse_count(raw.count(b'"data_offsets"'))
    try:  # the one JSON rule (nesting, NaN/Infinity, number sizes, a top-level object), errors as this file's
        header = parse_json_object(raw.decode("utf-8"), f"{path}: header", "safetensors header")
    except UnicodeDecodeError as exc:
        raise CheckpointFormatError(f"{path}: header is not valid JSON (not UTF-8 at byte {exc.start})") from exc
    except AdapterFormatError as exc:
        raise CheckpointFormatError(str(exc)) from None
    metadata = header.pop("__metadata__", None)
    refuse_count(len(header))
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointFormatError(f"{path}: __metadata__ must map strings to strings")
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape, offsets = entry["shape"], entry["data_offsets"]
            if not (isinstance(shape, list) and isinstance(offsets, list)
                    and all(type(v) is int for v in [*shape, *offsets])):  # JSON integers: not 2.7, true or "3"
                raise TypeError("shape and data_offsets must be lists of integers")
            shape = tuple(shape)
            begin, end = offsets
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointFormatError(f"{path}: tensor {name}: malformed header entry {str(entry)[:300]}") from exc
        if not isinstance(dtype, str) or any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise CheckpointFormatError(f"{path}: tensor {name}: malformed header entry {str(entry)[:300]}")
        if len(shape) > _MAX_TENSOR_DIMS or (math.prod(shape) or math.prod(max(d, 1) for d in shape)) > \
                _MAX_TENSOR_ELEMENTS:  # (the product itself where no dimension is 0: a generator per tensor was slow)
            # an empty tensor passes the size rule whatever its other dimensions: [0, 10**20, 64] is 0 bytes, and
            # torch (shape checks on the meta device, array views) overflows on it
            raise CheckpointFormatError(
                f"{path}: tensor {name}: shape {str(list(shape))[:200]} is impossible (at most {_MAX_TENSOR_DIMS} "
                f"dimensions, and at most 2**{_MAX_TENSOR_ELEMENTS.bit_length() - 1} elements with empty ones counted "
                "as 1)")
        if dtype in _DTYPE_BYTES and end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise CheckpointFormatError(
                f"{path}: tensor {name}: {end - begin} bytes for shape {list(shape)} of {dtype} "
                f"(expected {math.prod(shape) * _DTYPE_BYTES[dtype]})"
            )
        tensors.append(TensorInfo(name, dtype, shape, begin, end - begin))
    tensors.sort(key=lambda t: (t.offset, t.offset + t.nbytes))
    position = 0
    for t in tensors:
        if t.offset != position:
            raise CheckpointFormatError(
                f"{path}: tensor {t.name} starts at byte {t.offset} of the data section, expected {position} "
                "(tensor data must be contiguous)"
            )
        position += t.nbytes
    data_start = 8 + header_len
    if data_start + position > size:  # name the first tensor the file does not hold whole
        t = next(t for t in tensors if data_start + t.offset + t.nbytes > size)
        raise CheckpointFormatError(
            f"{path}: tensor {t.name} ({t.dtype} {list(t.shape)}, {t.nbytes:,} bytes at bytes {t.offset:,}.."
            f"{t.offset + t.nbytes:,} of the data section) ends past the end of the file: the header describes "
            f"{position:,} data bytes, the file holds {size - data_start:,}; truncated?"
        )
    if data_start + position < size:
        raise CheckpointFormatError(
            f"{path}: the header describes {position:,} data bytes but the file holds {size - data_start:,} "
            f"({size - data_start - position:,} bytes after the last tensor); not one safetensors file?"
        )
    return SafetensorsHeader(path, tensors, metadata, data_start)


def _header_bytes(tensors: Sequence[TensorInfo], metadata: dict[str, str] | None) -> tuple[bytes, list[TensorInfo]]:
    """Serialized header (length prefix included) for ``tensors`` laid out contiguously in order."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    laid_out, offset = [], 0
    for t in tensors:
        if t.name == "__metadata__" or t.name in header:
            raise ValueError(f"tensor name {t.name!r} is reserved or repeated")
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        laid_out.append(TensorInfo(t.name, t.dtype, t.shape, offset, t.nbytes))
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    text += b" " * (-len(text) % 8)  # pad with spaces so the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, laid_out


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _pread_into(fd: int, buffer: memoryview, offset: int, path: Path | str) -> None:
    position = 0
    while position < len(buffer):
        got = os.preadv(fd, [buffer[position:]], offset + position)
        if got == 0:
            raise CheckpointFormatError(f"{path}: unexpected end of file at byte {offset + position}")
        position += got


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (no copy when it is contiguous)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class SafetensorsWriter:
    """Write a safetensors file: the header first, then every tensor's bytes at their place.

    The whole header is known up front (names, dtypes, shapes, sizes), so is every tensor's place in
    the file: tensors can be produced one at a time, or a piece at a time, and never need to be in
    memory together. Offsets are assigned contiguously in the order of ``tensors``. Two ways to write:

    * in order (:meth:`write`, :meth:`write_chunk`, :meth:`copy_range`): each call continues the next
      tensor (checked);
    * by position (:meth:`write_at`, :meth:`copy_at`): any byte range of any tensor, in any order, from
      several threads at once (what the streaming merge does).

    :meth:`close` checks that every tensor got exactly its size in bytes.

    Args:
        path: file to create (truncated if it exists).
        tensors: entries in file order (their ``offset`` is ignored; see :meth:`TensorInfo.new`).
        metadata: the ``__metadata__`` map (transformers writes ``{"format": "pt"}``).

    Example::

        entries = [TensorInfo.new("w", "BF16", (4, 4))]
        with SafetensorsWriter("x.safetensors", entries, {"format": "pt"}) as w:
            w.write("w", torch.zeros(4, 4, dtype=torch.bfloat16))
    """

    def __init__(self, path: str | Path, tensors: Sequence[TensorInfo], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header, self.tensors = _header_bytes(tensors, metadata)
        self.data_start = len(header)  # file offset of the data section
        self._index = {t.name: i for i, t in enumerate(self.tensors)}
        self._filled = [0] * len(self.tensors)  # bytes written per tensor, all calls together
        self._lock = threading.Lock()
        self._next = 0  # in-order writing: index of the tensor being written
        self._written = 0  # in-order writing: bytes of it written so far
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(self._fd, memoryview(header), 0)
        except BaseException:
            self.__exit__(RuntimeError, None, None)
            raise

    def _entry(self, name: str) -> tuple[int, TensorInfo]:
        if self._fd < 0:
            raise ValueError(f"{self.path}: writer is closed")
        if name not in self._index:
            raise ValueError(f"{self.path}: no tensor {name} in this file's header")
        i = self._index[name]
        return i, self.tensors[i]

    def _current(self, name: str) -> TensorInfo:
        if self._fd < 0:
            raise ValueError(f"{self.path}: writer is closed")
        if self._next >= len(self.tensors):
            raise ValueError(f"{self.path}: tensor {name} written after the last one")
        entry = self.tensors[self._next]
        if entry.name != name:
            raise ValueError(f"{self.path}: tensor {name} written out of order; expected {entry.name} next")
        return entry

    def _advance(self, entry: TensorInfo, nbytes: int) -> None:
        self._written += nbytes
        if self._written == entry.nbytes:
            self._next += 1
            self._written = 0

    def _check_range(self, entry: TensorInfo, start: int, nbytes: int) -> None:
        if start < 0 or nbytes < 0 or start + nbytes > entry.nbytes:
            raise ValueError(
                f"{self.path}: tensor {entry.name}: bytes [{start}, {start + nbytes}) given, the header says "
                f"{entry.nbytes} bytes"
            )

    def _put(self, i: int, start: int, view: memoryview) -> None:
        _pwrite_all(self._fd, view, self.data_start + self.tensors[i].offset + start)
        with self._lock:
            self._filled[i] += len(view)

    def _copy(self, i: int, start: int, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` from ``src_fd`` at ``src_offset`` into tensor ``i`` at ``start`` (in the kernel if it can)."""
        dst = self.data_start + self.tensors[i].offset + start
        remaining = nbytes
        try:
            while remaining:
                copied = os.copy_file_range(src_fd, self._fd, remaining, src_offset, dst)
                if copied == 0:
                    break
                remaining -= copied
                src_offset += copied
                dst += copied
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                raise
        if remaining:  # no copy_file_range here (another filesystem, an old kernel): read and write
            chunk = bytearray(min(remaining, 1 << 20))
            while remaining:
                view = memoryview(chunk)[: min(remaining, len(chunk))]
                _pread_into(src_fd, view, src_offset, f"fd {src_fd}")
                _pwrite_all(self._fd, view, dst)
                remaining -= len(view)
                src_offset += len(view)
                dst += len(view)
        with self._lock:
            self._filled[i] += nbytes

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | memoryview) -> None:
        """Write tensor ``name`` (the next one in order) whole, from a tensor or raw bytes."""
        entry = self._current(name)
        if isinstance(data, torch.Tensor):
            if entry.dtype in _TORCH_DTYPES and (data.dtype != _TORCH_DTYPES[entry.dtype] or tuple(data.shape) != entry.shape):
                raise ValueError(
                    f"{self.path}: tensor {name}: got {data.dtype} {tuple(data.shape)}, the header says "
                    f"{entry.dtype} {entry.shape}"
                )
            data = _tensor_bytes(data)
        view = memoryview(data).cast("B")
        if self._written or len(view) != entry.nbytes:
            raise ValueError(f"{self.path}: tensor {name}: {len(view)} bytes given, the header says {entry.nbytes}")
        self._put(self._next, 0, view)
        self._advance(entry, len(view))

    def write_chunk(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append the next bytes of tensor ``name``; it is complete once its ``nbytes`` have been written."""
        entry = self._current(name)
        view = memoryview(data).cast("B")
        self._check_range(entry, self._written, len(view))
        self._put(self._next, self._written, view)
        self._advance(entry, len(view))

    def copy_range(self, name: str, src_fd: int, src_offset: int) -> None:
        """Write tensor ``name`` whole by copying its bytes from another open file (inside the kernel if it can)."""
        entry = self._current(name)
        if self._written:
            raise ValueError(f"{self.path}: tensor {name} is partly written; copy_range writes whole tensors")
        self._copy(self._next, 0, src_fd, src_offset, entry.nbytes)
        self._advance(entry, entry.nbytes)

    def write_at(self, name: str, start: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` into tensor ``name`` from its byte ``start`` on (any order; thread-safe)."""
        i, entry = self._entry(name)
        view = memoryview(data).cast("B")
        self._check_range(entry, start, len(view))
        self._put(i, start, view)

    def copy_at(self, name: str, start: int, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` of another open file, from ``src_offset``, into tensor ``name`` at its byte ``start``.

        Any order, thread-safe; inside the kernel (``copy_file_range``) where the filesystems allow.
        """
        i, entry = self._entry(name)
        self._check_range(entry, start, nbytes)
        self._copy(i, start, src_fd, src_offset, nbytes)

    def close(self) -> None:
        """Close the file. Raises if a tensor did not get exactly its size (call after writing all of them)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        wrong = [(t.name, f, t.nbytes) for t, f in zip(self.tensors, self._filled) if f != t.nbytes]
        if wrong:
            detail = ", ".join(f"{n} ({f} of {b} bytes)" for n, f, b in wrong[:5])
            raise ValueError(f"{self.path}: closed with {len(wrong)} tensor(s) not written exactly once: {detail}")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ================================================================================================
# Streaming merge of a checkpoint
# ================================================================================================

# Other weight formats in a model directory hold the *unmerged* weights: copying them would ship a
# second, stale copy of the model, so they are left out (with a warning).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data")
_SKIPPED_DIRS = {".git", ".cache", "__pycache__"}
_BLOCK_ELEMENTS = 1 << 21  # weight elements per work item (a range of whole rows, mapped at once): 4 MB of bf16
# Elements per chunk a work item is merged and written in, each chunk from widening to pwrite while it is
# still in the CPU cache (512 KB of bf16 output, 1 MB of fp32 sum). Measured in place, 1.1B bf16 Llama,
# 2-core EPYC: merge CPU time 1.9-2.0 s at 2**18, 2.4-2.5 s at 2**16 and 2**17 (per-call overhead), 2.7-3.0 s
# at 2**19 and 2**20 (pwrite from a buffer no longer in cache: 2-5x a kernel copy of the same bytes),
# against 3.2-3.3 s for the previous path (pread into a row block of >= p rows, pwrite of the whole block).
_CHUNK_ELEMENTS = 1 << 18
_COPY_CHUNK_BYTES = 32 << 20  # untouched tensors are copied in pieces of this size, so every worker can take some
# Worker threads, each reading, merging and writing whole row blocks: the math (torch/numpy) and the
# system calls release the GIL, so the threads share the cores; more than 4 gains little (memory bandwidth).
_WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass
class _Checkpoint:
    directory: Path
    shards: list[str]  # file names, in order
    headers: dict[str, SafetensorsHeader]
    index: dict[str, Any] | None  # the parsed index JSON, if sharded
    model_type: str | None
    config: dict[str, Any] | None = None  # the parsed config.json, if any

    def locations(self) -> dict[str, tuple[str, TensorInfo]]:
        return {t.name: (shard, t) for shard in self.shards for t in self.headers[shard].tensors}


@dataclass
class _Adapter:
    directory: Path
    weight: float
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    peft: bool = False  # a PEFT C3A directory: its config's rules are checked against the checkpoint's layers


@dataclass
class _Term:
    """One adapter's contribution to one checkpoint tensor: ``factor · ΔW(kernel)``, factor = weight·scaling."""

    source: str  # "<adapter dir>:<module path>" for messages
    kernel: torch.Tensor
    spec: ModuleSpec
    factor: float

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    def delta_view(self) -> np.ndarray:
        """(rows/p, p, cols/p, p) view in storage layout (built per tensor: it holds 2x the kernel)."""
        return _storage_delta_view(self.kernel, self.spec, self.factor)


@dataclass
class _Plan:
    terms: dict[str, list[_Term]] = field(default_factory=dict)  # output key -> delta terms
    replace: dict[str, torch.Tensor] = field(default_factory=dict)  # output key -> new value (or a new tensor)
    checkpoint: _Checkpoint | None = None  # what to write: the input's shards under output names (_output_view)
    config: dict[str, Any] | None = None  # a new config.json (a head was added, or tied weights untied), or None
    tied: dict[str, tuple[str, list[_Term]]] = field(default_factory=dict)  # output key -> (source key, terms)
    new_bytes: int = 0  # bytes of tensors the input does not hold (a head's, an untied weight's)
    # checkpoint tensors (output names) a classification checkpoint does not load, left out of it: the source
    # architecture's own head (a causal LM's lm_head, a masked LM's cls.*), which transformers would only report
    dropped: dict[str, int] = field(default_factory=dict)  # output name -> bytes
    # why no architecture was built from config.json (merged by the tensors' names and shapes alone), or ""
    structure_note: str = ""


def _storage_delta_view(kernel: torch.Tensor, spec: ModuleSpec, factor: float) -> np.ndarray:
    """``factor · ΔW`` in storage layout as a zero-copy 4-D numpy view: (rows/p, p, cols/p, p).

    With ``k = factor · kernel`` (fp32; one multiply per value, as in :func:`dense_delta`), each
    circulant block is Toeplitz, ``block[r, s] = k[(r - s) mod p]``, so it is a sliding window over
    ``concat(k, k)`` read with one negative stride (numpy has them, torch does not). The windows are
    chosen so the storage's last (contiguous) axis is also contiguous in the view, which keeps numpy's
    add vectorized:

    * Linear, ``view[i, r, j, s] = ΔW[i·p + r, j·p + s]``: with ``u = flip(k)``, ``ext = concat(u, u)``,
      ``k[(r - s) mod p] = ext[p - 1 - r + s]`` (ascending in s).
    * Conv1D, stored (in, out), ``view[j, s, i, r] = ΔWᵀ[j·p + s, i·p + r]``: with ``ext = concat(k, k)``,
      ``k[(r - s) mod p] = ext[p - s + r]`` (ascending in r).

    Block-row ``n`` of the stored weight is ``view[n]``.
    """
    p = spec.block_size
    k = kernel.detach().to(torch.float32)
    if factor != 1.0:
        k = k * factor
    if spec.layer_type == "conv1d":
        ext = torch.cat([k, k], dim=-1).contiguous().numpy()  # (o, q, 2p)
        windows = sliding_window_view(ext, p, axis=-1)  # (o, q, p + 1, p): [i, j, t, r] = ext[t + r]
        toeplitz = windows[:, :, 1 : p + 1][:, :, ::-1]  # [i, j, s, r] = ext[p - s + r]
        return toeplitz.transpose(1, 2, 0, 3)  # (q, p, o, p): [j, s, i, r]
    u = torch.flip(k, dims=[-1])
    ext = torch.cat([u, u], dim=-1).contiguous().numpy()  # (o, q, 2p)
    windows = sliding_window_view(ext, p, axis=-1)  # (o, q, p + 1, p): [i, j, t, s] = ext[t + s]
    toeplitz = windows[:, :, :p][:, :, ::-1]  # [i, j, r, s] = ext[p - 1 - r + s]
    return toeplitz.transpose(0, 2, 1, 3)  # (o, p, q, p): [i, r, j, s]


def _read_checkpoint(model_dir: Path) -> _Checkpoint:
    if not model_dir.is_dir():
        raise CheckpointFormatError(f"{model_dir}: model directory not found")
    index_path = model_dir / SAFE_WEIGHTS_INDEX_NAME
    single = model_dir / SAFE_WEIGHTS_NAME
    index = None
    if single.is_file():  # transformers loads model.safetensors first when both exist; so do we
        shards = [SAFE_WEIGHTS_NAME]
    elif index_path.is_file():
        try:
            index = read_json(index_path, what="safetensors index")
        except AdapterFormatError as exc:
            raise CheckpointFormatError(str(exc)) from None
        if not isinstance(index.get("metadata"), dict):  # transformers (4.x and 5.x) adds to it as it loads the shards
            raise CheckpointFormatError(
                f"{index_path}: 'metadata' must be an object (such as {{\"total_size\": <bytes>}}), got "
                f"{'nothing' if 'metadata' not in index else show_json_value(index['metadata'])}: transformers cannot "
                "load a sharded checkpoint without one (KeyError/TypeError)")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(f"{index_path}: 'weight_map' must be an object mapping tensor names to shard "
                                        f"files, got {type(weight_map).__name__}")
        bad = [s for s in weight_map.values() if not isinstance(s, str) or not s or "/" in s or "\\" in s
               or s.startswith(".")]
        if bad:
            raise CheckpointFormatError(f"{index_path}: shard names must be plain file names, got {str(bad[:3])[:300]}")
        shards = sorted(set(weight_map.values()))
    else:
        there = [p for p in (single, index_path) if os.path.lexists(p)]
        if there:  # a FIFO, a device, a directory, a link to nothing: said as what it is, not taken for absent (the
            # message said "no model.safetensors ...; it has model.safetensors: convert the checkpoint to safetensors")
            from .models import weights_file_problem

            raise CheckpointFormatError("; ".join(filter(None, map(weights_file_problem, there))))
        others = sorted(p.name for p in model_dir.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
        hint = adapter_as_model_hint(model_dir) or ((
            f"; it has {', '.join(others)}: convert the checkpoint to safetensors first "
            "(load it with transformers and save_pretrained)") if others else "")
        raise CheckpointFormatError(
            f"{model_dir}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}{hint}"
        )
    problems, headers = [], {}
    for shard in shards:
        path = model_dir / shard
        try:
            regular = path.is_file()
        except OSError as exc:  # a name the file system cannot hold (ENAMETOOLONG): the index's error, not exit 1
            problems.append(f"shard {show_json_value(shard)}: {exc.strerror or exc}")
            continue
        if not regular:  # a FIFO, a device, a directory, a link to nothing or a loop: said as what it is
            problems.append(f"shard {shard}: " + (f"{why_not_readable(path)}; expected a safetensors file"
                                                  if os.path.lexists(path) else "listed in the index but missing"))
            continue
        headers[shard] = read_safetensors_header(path)
    if index is not None:
        for name, shard in index["weight_map"].items():
            if shard in headers and name not in headers[shard].by_name():
                problems.append(f"tensor {name}: the index puts it in {shard}, which does not hold it")
        # transformers loads what the index lists: a tensor it does not list would be merged and written, then left
        # out on load, its parameter initialized at random (merge exited 0 on such a checkpoint)
        unlisted = [(t.name, shard) for shard, header in headers.items() for t in header.tensors
                    if t.name not in index["weight_map"]]
        problems += [f"tensor {name}: in {shard}, but {SAFE_WEIGHTS_INDEX_NAME} does not list it (transformers loads "
                     "only what the index lists)" for name, shard in unlisted[:20]]
    # A tensor in two shards would be merged (and loaded) twice; transformers would silently keep one.
    seen: dict[str, str] = {}
    for shard, header in headers.items():
        for t in header.tensors:
            if t.name in seen:
                problems.append(f"tensor {t.name}: present in both {seen[t.name]} and {shard}")
            seen.setdefault(t.name, shard)
    if problems:
        raise CheckpointFormatError(format_problems(f"{model_dir}: inconsistent checkpoint:", problems))
    config = None
    config_path = model_dir / "config.json"
    if os.path.lexists(config_path):  # there but not a file (a pipe, a device, a link to nothing): refused by name
        try:
            config = read_json(config_path, what="model config", allow_nan=True, unique_keys=False)
        except AdapterFormatError as exc:
            raise CheckpointFormatError(str(exc)) from None
    model_type = config.get("model_type") if config is not None else None
    return _Checkpoint(model_dir, shards, headers, index, model_type if isinstance(model_type, str) else None, config)


def _read_adapters(adapters: Sequence[tuple[str | Path, float]],
                   largest_elements: int | None = None) -> list[_Adapter]:
    if not adapters:
        raise InvalidOptionError("no adapters given: pass a list of (adapter directory, weight) pairs")
    result = []
    for item in adapters:
        if isinstance(item, (str, Path)):
            directory, weight = item, 1.0
        else:
            directory, weight = item
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise InvalidOptionError(f"adapter {directory}: weight must be a finite number, got {weight!r}")
        directory = run_adapter_dir(directory)  # a training run's directory stands for its best/ or last/ adapter
        # checked against the checkpoint below; saved tensors larger than its largest are refused unread here
        config, tensors = read_adapter(Path(directory), validate=False, largest_elements=largest_elements)
        peft = is_peft_config(read_json(Path(directory) / CONFIG_FILE, what="adapter config"))
        result.append(_Adapter(Path(directory).resolve(), float(weight), config, tensors, peft))
    return result


# ---- the checkpoint as a fit-check target -------------------------------------------------------

#: Stored dtypes the streaming merge adds a delta to, or writes a replaced tensor in.
_MERGEABLE = tuple(_TORCH_DTYPES)


def _head_adapter(ckpt: _Checkpoint, adapters: list[_Adapter]) -> _Adapter | None:
    """The one adapter whose classification head the merged checkpoint gets, or None; several: refused.

    A seq-cls adapter that saves its classifier without recording it (PEFT's SEQ_CLS adapters) carries the head
    :func:`bca_deploy.models.saved_label_head` finds, as every other stage reads it."""
    for a in adapters:
        task = a.config.task
        if task is not None and task.type == "seq-cls" and task.head is None and a.config.modules_to_save:
            head = _saved_head(ckpt, a)
            if head is not None:
                a.config.task = dataclasses.replace(task, head=head)
    heads = [a for a in adapters if a.config.task is not None and a.config.task.head is not None]
    if len(heads) > 1:
        raise AdapterMismatchError(
            "several adapters carry a classification head (" + ", ".join(str(a.directory) for a in heads)
            + "): a merged checkpoint has one head; merge only one of them, or merge the others' kernels from "
            "adapters saved without a head"
        )
    return heads[0] if heads else None


def _saved_head(ckpt: _Checkpoint, adapter: _Adapter) -> HeadSpec | None:
    from .models import load_config, saved_label_head

    if ckpt.config is None:
        return None  # no config.json: no architecture to find the label layer in (the fit check names the head)
    try:
        model_config = load_config(ckpt.directory)
    except Exception:  # noqa: BLE001 - a config transformers cannot read: the checkpoint's own checks say why
        return None
    return saved_label_head(model_config, adapter.config.modules_to_save,
                            {name: tuple(t.shape) for name, t in adapter.tensors.items()})


def _head_architecture(task: TaskSpec, model_type: str | None) -> str:
    """The sequence-classification class the merged checkpoint is written for."""
    from .config import task_architecture

    if task.architecture and task.architecture.endswith("ForSequenceClassification"):
        return task.architecture
    name = task_architecture("seq-cls", model_type)
    if name is None:
        raise AdapterMismatchError(f"the adapter carries a classification head, but transformers has no sequence "
                                   f"classification class for model_type {model_type!r}")
    return name


def _structure(ckpt: _Checkpoint, architecture: str | None, head_task: TaskSpec | None) -> nn.Module:
    """The model class the checkpoint is loaded with, built on the meta device (module types, no memory).

    Raises:
        CheckpointFormatError: config.json contradicts the checkpoint (refused).
        LookupError: no config.json or no model_type (callers use the tensors' shapes alone).
        Exception: whatever transformers raises when it cannot build the class (likewise).
    """
    if ckpt.config is None or not isinstance(ckpt.config.get("model_type"), str):
        raise LookupError(f"{ckpt.directory}: no config.json with a model_type")
    # A model has at least one stored tensor per layer: a config asking for more layers than the checkpoint
    # holds tensors is not this checkpoint's (and a hostile one could ask for millions of modules).
    from .models import count_problem, layer_count_problem

    tensors = sum(len(h.tensors) for h in ckpt.headers.values())
    source = f"{ckpt.directory}/config.json"
    problem = layer_count_problem(ckpt.config, tensors, source) or count_problem(ckpt.config, source)
    if problem is not None:
        raise CheckpointFormatError(problem)
    import transformers

    config = transformers.AutoConfig.for_model(**ckpt.config)
    if head_task is not None:
        values = head_task.head.config_values()
        values.setdefault("problem_type", None)
        for key, value in values.items():
            setattr(config, key, value)
    name = architecture or next(iter(getattr(config, "architectures", None) or []), None)
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    # Only the module types are needed: skip the random initialisation (on the meta device it still runs
    # torch's Python reference kernels per parameter, ~0.4 s of a ~0.7 s planning step for a 1.1B Llama).
    # transformers' switch is process-wide for the moment of the build, as in its own from_pretrained;
    # where a version lacks it, the build initialises (slower, same structure).
    skip_init = getattr(importlib.import_module("transformers.modeling_utils"), "no_init_weights", None)
    with warnings.catch_warnings(), torch.device("meta"), (skip_init() if skip_init else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        if model_class is not None:
            model = model_class(config)
        elif architecture is not None:
            raise AdapterMismatchError(f"transformers has no model class {architecture!r} (the adapter's "
                                       "task.architecture)")
        else:
            model = transformers.AutoModel.from_config(config)
        # Tie as from_pretrained does (skipped with the initialisation on some versions): a module whose weight
        # is another's (a tied lm_head) is then seen by identity, and merged as an untied copy.
        tie = getattr(model, "tie_weights", None)
        if callable(tie):
            with contextlib.suppress(Exception):
                tie()
        return model


def _checkpoint_renamer(model: nn.Module) -> Callable[[str], str]:
    """How transformers renames a stored key of ``model``'s checkpoints as it loads them: 4.x's
    ``_fix_state_dict_key_on_load`` (``LayerNorm.gamma`` -> ``.weight``); 5.x's conversion mapping, its renamings
    (GPT-NeoX's ``embed_out`` -> ``lm_head``, the legacy ``gamma``/``beta``). 5.x's converters, which fuse several
    stored tensors into one (MoE experts), map no key one to one and are left out: such tensors stay unmatched
    (:func:`_fused_keys` says which parameter they make).
    """
    fix = getattr(model, "_fix_state_dict_key_on_load", None)
    if callable(fix):
        return lambda key: fix(key)[0]
    renamings, _ = conversion_mapping(model)
    if not renamings:
        return lambda key: key
    from transformers.core_model_loading import apply_renamings

    return lambda key: apply_renamings(key, renamings)


def _fused_keys(model: nn.Module, ckpt_keys: Iterable[str]) -> dict[str, str]:
    """Checkpoint key -> the model's parameter that transformers 5.x fuses it into as it loads it (Mixtral's
    ``block_sparse_moe.experts.3.w1.weight`` is part of ``mlp.experts.gate_up_proj``), for the keys a converter of
    :func:`bca_deploy.fit.conversion_mapping` takes; empty on transformers 4.x, which loads every tensor as stored."""
    renamings, converters = conversion_mapping(model)
    if not converters:
        return {}
    expected = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    mapping: dict[str, str] = {}
    for key in ckpt_keys:
        name, fused = converted_key(key, renamings, converters)
        if fused and (found := _prefixed(name, expected, prefix)) is not None:
            mapping[key] = found
    return mapping


def _prefixed(name: str, expected: Collection[str], prefix: str) -> str | None:
    """``name`` (a stored key, renamed as transformers loads it) as one of the model's ``expected`` names: as is, or
    with its ``base_model_prefix`` added or dropped (a bare encoder's keys in a classifier); None where none is."""
    return next((c for c in prefix_forms(name, prefix) if c in expected), None)


def _key_map(model: nn.Module, ckpt_keys: Iterable[str]) -> dict[str, str]:
    """Checkpoint key -> the model's state-dict key, where one matches (legacy renames, prefix added or dropped).

    Buffers count too, non-persistent ones included (old checkpoints hold ``embeddings.position_ids``), so
    their keys get the same prefix and transformers recognizes them.
    """
    expected = set(model.state_dict()) | {name for name, _ in model.named_buffers()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    rename = _checkpoint_renamer(model)
    mapping: dict[str, str] = {}
    for key in ckpt_keys:
        found = _prefixed(rename(key), expected, prefix)
        if found is not None:
            mapping[key] = found
    return mapping


@dataclass
class _CheckpointTarget:
    """A checkpoint seen as a fit-check target, and how its keys are named in the merged output."""

    target: Target
    out_names: dict[str, str]  # checkpoint key -> key in the output (renamed only when a head is written)
    expected: dict[str, tuple[int, ...]] | None  # parameters the output's architecture needs (head mode)
    model: nn.Module | None = None  # the architecture built on the meta device (None: the tensors' shapes only)
    # head mode: output keys of tensors the head's architecture neither loads nor has a module for (another
    # architecture's head: a causal LM's lm_head), not written
    foreign: frozenset[str] = frozenset()
    structure_note: str = ""
    # Modules whose weight the architecture ties to another stored tensor (an lm_head to the input embedding):
    # module path -> (checkpoint key of the tensor it is tied to, checkpoint key of its own weight or None).
    tied: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    # head mode: the architecture's state-dict names the output's stored tensors load as (one per stored tensor, or
    # one per fused parameter transformers 5.x makes of several: MoE experts)
    provided: frozenset[str] = frozenset()


def _checkpoint_target(ckpt: _Checkpoint, head_task: TaskSpec | None) -> _CheckpointTarget:
    """Describe ``ckpt`` for :func:`bca_deploy.fit.check_adapter`: module types from its architecture built on
    the meta device, stored shapes and dtypes from the safetensors headers.

    With ``head_task`` (an adapter carrying a classification head), the target is the checkpoint as that
    head's architecture loads it: keys in that architecture's layout (``bert.`` prefix added to a bare
    encoder's keys), and head parameters the checkpoint lacks listed as new.
    """
    locations = ckpt.locations()
    architecture = _head_architecture(head_task, ckpt.model_type) if head_task is not None else None
    try:
        model = _structure(ckpt, architecture, head_task)
    except CheckpointFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - no structure to be had: the tensors' shapes only
        if head_task is not None:
            raise AdapterMismatchError(
                f"cannot write a classification checkpoint from {ckpt.directory}: transformers cannot build "
                f"{architecture} from its config.json ({type(exc).__name__}: {exc})") from None
        return _shapes_only_target(ckpt, f"{type(exc).__name__}: {exc}")
    key_map = _key_map(model, locations)
    _check_config_fits(ckpt, model, locations, key_map, head_task)
    to_ckpt = {v: k for k, v in key_map.items()}
    structure = model_target(model)
    first_name = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    modules: dict[str, ModuleInfo] = {}
    tied: dict[str, tuple[str, str | None]] = {}
    for path, info in structure.modules.items():
        key = to_ckpt.get(f"{path}.weight")
        if info.kind in ("linear", "conv1d"):
            weight = getattr(model.get_submodule(path), "weight", None)
            source = first_name.get(id(weight), f"{path}.weight")
            if source != f"{path}.weight" and to_ckpt.get(source) is not None:
                # Tied (transformers loads it as the tensor it is tied to, stored or not): merged as that
                # tensor + ΔW under its own key, the config untied, so the other module keeps its weight.
                source_key = to_ckpt[source]
                tied[path] = (source_key, key)
                key = source_key
            if key is None:
                continue  # not stored (nor tied to a stored tensor): nothing to add a delta to
            stored = locations[key][1]
            info = ModuleInfo(info.kind, info.in_features, info.out_features, stored.shape, stored.dtype, key=key)
        modules[path] = info
    head_paths = tuple(m + "." for m in (head_task.head.modules if head_task is not None else []))
    default_dtype = _dominant_dtype(ckpt)
    params: dict[str, ParamInfo] = {}
    for name, info in (structure.params or {}).items():
        key = to_ckpt.get(name)
        if key is not None and not name.startswith(head_paths):
            stored = locations[key][1]
            params[name] = ParamInfo(stored.shape, stored.dtype, stored.dtype in _MERGEABLE, key)
        elif head_task is not None:  # written by this merge: the architecture's shape, the checkpoint's dtype
            params[name] = ParamInfo(info.shape, default_dtype, True, key)
    description = f"checkpoint {ckpt.directory}" + (f" (as {architecture})" if architecture else "")
    target = Target(description, modules, params, ckpt.model_type, structure.prefixes, _MERGEABLE,
                    tied=structure.tied, renamed=structure.renamed, name_or_path=str(ckpt.directory))
    if head_task is None:
        return _CheckpointTarget(target, {k: k for k in locations}, None, model=model, tied=tied)
    # The output keeps each tensor's stored name, the base_model_prefix added or dropped as the head's architecture
    # loads it (a bare encoder's keys get bert.): transformers renames the rest as it loads the checkpoint, and a name
    # one line gives it is not the other's (5.x loads Mixtral's block_sparse_moe.gate as mlp.gate; 4.x loads only
    # the stored name, as 5.x's own save_pretrained writes it).
    prefix = getattr(model, "base_model_prefix", "") or ""
    fused = _fused_keys(model, locations)
    out_names = {k: _stored_spelling(k, key_map.get(k) or fused.get(k) or k, prefix) for k in locations}
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}  # shared (tied) parameters listed once
    # what the head's architecture does not load and has no module for: another architecture's head (a causal LM's
    # lm_head, a pre-training BERT's cls.*); a stored buffer of a module it has (position_ids) is kept, as before
    modules, loads = {name for name, _ in model.named_modules()}, set(model.state_dict())
    foreign = frozenset(out_names[k] for k in locations if k not in key_map and k not in fused
                        and out_names[k] not in loads and out_names[k].rpartition(".")[0] not in modules)
    provided = frozenset(key_map.values()) | frozenset(fused.values())
    return _CheckpointTarget(target, out_names, expected, model=model, foreign=foreign, tied=tied, provided=provided)


def _stored_spelling(key: str, name: str, prefix: str) -> str:
    """The output name of stored ``key``, which the head's architecture loads as ``name``: ``key`` with the model's
    ``prefix`` added or dropped as in ``name``, any other renaming left to transformers' loading."""
    if not prefix or key == name:
        return key
    stored, loaded = key.startswith(prefix + "."), name.startswith(prefix + ".")
    if loaded and not stored:
        return f"{prefix}.{key}"
    if stored and not loaded:
        return key[len(prefix) + 1:]
    return key


def _check_config_fits(ckpt: _Checkpoint, model: nn.Module, locations: dict[str, tuple[str, TensorInfo]],
                       key_map: dict[str, str], head_task: TaskSpec | None) -> None:
    """Refuse a checkpoint whose config.json does not describe its weights, before anything is written: the rule
    :func:`bca_deploy.models.config_fit_problems` (shapes from the safetensors headers against ``model``, built from
    the config on the meta device; layer counts; another architecture's config). A merged copy would be refused by
    ``from_pretrained`` or, worse, load with layers dropped or initialized at random. A classifier head the merge
    writes (``head_task``) is the adapter's, not checked against the checkpoint's. ``locations`` is
    ``ckpt.locations()``, as the caller has it.

    Raises:
        CheckpointFormatError: naming config.json, every tensor or layer list that does not fit, and both shapes.
    """
    from .models import config_fit_problems, config_misfit_error

    stored = {key: (info.dtype, info.shape) for key, (_, info) in locations.items()}
    files = {key: shard for key, (shard, _) in locations.items()}
    skip = tuple(m + "." for m in head_task.head.modules) if head_task is not None else ()
    problems = config_fit_problems(model, stored, key_map, skip=skip, files=files)
    if problems:
        raise config_misfit_error(ckpt.directory, ckpt.model_type, model, problems, "merge into")


def _shapes_only_target(ckpt: _Checkpoint, reason: str) -> _CheckpointTarget:
    """A target from the tensors alone (layer types unknown) when no architecture can be built."""
    modules, params = {}, {}
    for key, (_, t) in ckpt.locations().items():
        if key.endswith(".weight") and len(t.shape) == 2:
            modules[key[: -len(".weight")]] = ModuleInfo("unknown", weight_shape=t.shape, dtype=t.dtype, key=key)
        params[key] = ParamInfo(t.shape, t.dtype, t.dtype in _MERGEABLE, key)
    prefixes = tuple(sorted({k.split(".", 1)[0] for k in params if "." in k}))
    target = Target(f"checkpoint {ckpt.directory}", modules, params, ckpt.model_type, prefixes, _MERGEABLE,
                    name_or_path=str(ckpt.directory))
    return _CheckpointTarget(target, {k: k for k in params}, None, structure_note=reason)


def _dominant_dtype(ckpt: _Checkpoint) -> str:
    counts: dict[str, int] = {}
    for header in ckpt.headers.values():
        for t in header.tensors:
            if t.dtype in _MERGEABLE:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.nbytes
    return max(counts, key=counts.get) if counts else "F32"


def _plan_merge(ckpt: _Checkpoint, adapters: list[_Adapter]) -> _Plan:
    """Check every adapter against the checkpoint (:mod:`bca_deploy.fit`); raise with every problem, or plan.

    The plan's ``checkpoint`` is the output's view of ``ckpt``: the same shards and byte offsets, tensors
    under their output names, and, when an adapter carries a classification head, the head's tensors
    the checkpoint lacks appended to the last shard.
    """
    # Another model type is said before any head is built (a bert adapter on a llama checkpoint is that, not a
    # classifier llama's config cannot build), once the checkpoint itself is found sound: weights that config.json
    # does not describe (its model_type among them) are the checkpoint's error (CheckpointFormatError).
    other_type = [f"{a.directory}: {p}" for a in adapters
                  if (p := model_type_problem(a.config, ckpt.model_type, f"checkpoint {ckpt.directory}")) is not None]
    if other_type:
        _checkpoint_target(ckpt, None)
        raise AdapterMismatchError(format_problems(f"adapters do not fit the checkpoint {ckpt.directory}:", other_type))
    head_adapter = _head_adapter(ckpt, adapters)
    head_task = head_adapter.config.task if head_adapter is not None else None
    view = _checkpoint_target(ckpt, head_task)
    target = view.target
    problems: list[str] = []
    notes: list[str] = []  # fit.base_name_note's: an adapter recording another base checkpoint than this one
    for a in adapters:
        if a.peft and view.model is not None:
            # A PEFT config adapts modules by rules (target_modules, layers_to_transform...), and PEFT gives a module
            # they adapt without a kernel in the file a new random one: checked against this checkpoint's layers, as
            # load_adapter and export check it against the model (read without them, the file's kernels are all there
            # is, and the module would be merged unadapted without a word).
            try:
                read_adapter(a.directory, view.model, validate=False)
            except AdapterFormatError as exc:
                problems.append(str(exc).replace("\n", "\n  "))  # its own list, nested in this one
    plan = _Plan(structure_note=view.structure_note)
    replaced_by: dict[str, Path] = {}
    new_tensors: dict[str, torch.Tensor] = {}
    # base weights (fit.split_base_key: PEFT's save_embedding_layers), by output key: (checkpoint key, value, adapter);
    # the checkpoint's tensor is replaced by it, and the deltas of the modules it belongs to are added to it
    based_by: dict[str, tuple[str, torch.Tensor, Path]] = {}
    for a in adapters:
        prefixes = target.prefixes
        if view.structure_note:  # no architecture: try each first path component as the prefix
            prefixes = prefixes + tuple(sorted({p.split(".", 1)[0] for p in list(a.config.modules) + a.config.modules_to_save}))
        config, tensors = align_paths(a.config, a.tensors, prefixes, target.has_path)
        # a tied Parameter saved under both its names (a tied lm_head's): one tensor, under the stored name
        renamed = dict(zip(a.config.modules_to_save, config.modules_to_save))
        copied = {renamed[m] for m in peft_copied_modules(a.directory, a.config.modules_to_save)}
        config, tensors, tied = resolve_tied(config, tensors, target, copied, fold=True)
        found = adapter_problems(config, tensors) + tied + target_problems(config, tensors, target)
        problems += [f"{a.directory}: {p}" for p in found]
        if found:
            continue
        if (note := base_name_note(config, target, str(a.directory))) is not None:
            notes.append(note)  # said once every adapter fits: a refused merge says only why it is refused
        for module, spec in sorted(config.modules.items()):
            factor = a.weight * float(spec.scaling)
            term = _Term(f"{a.directory}:{module}", tensors[module + KERNEL_SUFFIX], spec, factor)
            if module in view.tied:  # its own copy: the tensor it is tied to + ΔW, under its own key
                source, own = view.tied[module]
                name = view.out_names[own] if own is not None else f"{module}.weight"
                plan.tied.setdefault(name, (source, []))[1].append(term)
                continue
            key = target.modules[module].key or f"{module}.weight"
            name = view.out_names[key]
            plan.terms.setdefault(name, []).append(term)
        for param_name, tensor in tensors.items():
            if param_name.endswith(KERNEL_SUFFIX):
                continue
            base = split_base_key(param_name, config.modules_to_save)
            info = target.params[param_name if base is None else ".".join(base)]
            name = view.out_names[info.key] if info.key is not None else param_name
            if base is not None:
                value = tensor.detach().to(_TORCH_DTYPES[info.dtype]).contiguous()
                earlier = based_by.get(name)
                if info.key is None:
                    problems.append(f"{a.directory}: base weight {param_name}: checkpoint {ckpt.directory} does not "
                                    f"hold {'.'.join(base)}, which it would replace")
                elif earlier is not None and not torch.equal(earlier[1], value):
                    problems.append(f"{a.directory}: base weight {param_name}: {earlier[2]} gives {name} other base "
                                    "values; a merged checkpoint has one base model: merge these adapters separately")
                else:
                    based_by.setdefault(name, (info.key, value, a.directory))
                continue
            if name in replaced_by:
                problems.append(f"{a.directory}: modules_to_save tensor {param_name}: {name} is also replaced by "
                                f"{replaced_by[name]}; merge these adapters separately")
                continue
            replaced_by[name] = a.directory
            value = tensor.detach().to(_TORCH_DTYPES[info.dtype]).contiguous()
            if info.key is None:
                new_tensors[name] = value
            plan.replace[name] = value
    both = sorted((set(plan.terms) | set(plan.tied)) & set(plan.replace))
    problems += [f"checkpoint tensor {k}: both adapted and replaced by modules_to_save" for k in both]
    problems += [f"checkpoint tensor {k}: replaced by modules_to_save of {replaced_by[k]} and given a base weight by "
                 f"{based_by[k][2]}; merge these adapters separately" for k in sorted(set(replaced_by) & set(based_by))]
    if view.expected is not None and not problems:
        written = set(view.provided) | set(new_tensors)
        missing = sorted(set(view.expected) - written)
        if missing:
            problems.append(f"the merged {_head_architecture(head_task, ckpt.model_type)} checkpoint would lack "
                            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} (transformers would "
                            "initialize them at random): merge into a checkpoint that has them")
    if problems:
        if head_task is None and any(": no such parameter in checkpoint" in p or " has no such module; " in p
                                     for p in problems):
            problems.append("(a modules_to_save tensor the checkpoint lacks, e.g. a classifier head, is written only "
                            "for an adapter whose config records its head (task.head, as bca-deploy train writes it); "
                            "otherwise merge into a checkpoint that has the head)")
        if view.structure_note:
            problems.append(f"(layer types not checked: {view.structure_note})")
        raise AdapterMismatchError(format_problems(f"adapters do not fit the checkpoint {ckpt.directory}:", problems))
    for note in notes:
        warnings.warn(note, ForeignBaseWarning, stacklevel=3)
    for name, (key, value, _) in sorted(based_by.items()):  # the base weight, and the deltas added to it
        terms = plan.terms.pop(name, None)
        plan.replace[name] = value if not terms else _tied_value(ckpt, key, value, terms, name)
    stored_names = {view.out_names[k]: info for k, (_, info) in ckpt.locations().items()}
    for name, (source, terms) in sorted(plan.tied.items()):
        value = _tied_value(ckpt, source, plan.replace.get(view.out_names[source]), terms, name)
        if name in stored_names:
            value = value.to(_TORCH_DTYPES[stored_names[name].dtype])
        else:
            new_tensors[name] = value
        plan.replace[name] = value
    plan.new_bytes = sum(v.numel() * v.element_size() for v in new_tensors.values())
    # checked above: everything the head's architecture needs is written
    plan.dropped = {name: info.nbytes for key, (_, info) in ckpt.locations().items()
                    if (name := view.out_names[key]) in view.foreign and name not in plan.replace}
    plan.checkpoint = _output_view(ckpt, view.out_names, plan.replace, new_tensors, set(plan.dropped))
    if head_task is not None:
        plan.config = _classification_config(ckpt.config or {}, head_task,
                                             _head_architecture(head_task, ckpt.model_type), ckpt.directory)
    if plan.tied:
        plan.config = _untied_config(plan.config if plan.config is not None else dict(ckpt.config or {}))
    return plan


def _tied_value(ckpt: _Checkpoint, source: str, replaced: torch.Tensor | None, terms: list[_Term],
                name: str) -> torch.Tensor:
    """``source + Σ terms`` for a module tied to the checkpoint tensor ``source`` (or to its replacement by a
    ``modules_to_save`` tensor or a base weight; also a module's own weight replaced by its base weight): the same
    chunked fp32 sum and one rounding as :func:`_merge_block`, into a new tensor of the source's dtype (memory: that
    one tensor, at most a shard)."""
    shard, info = ckpt.locations()[source]
    dtype = _TORCH_DTYPES[info.dtype]
    out = torch.empty(info.shape, dtype=dtype)
    out_bytes = memoryview(out.view(-1).view(torch.uint8).numpy())

    def write(offset: int, data: memoryview) -> None:
        out_bytes[offset : offset + len(data)] = data

    entry = TensorInfo(name, info.dtype, info.shape, 0, info.nbytes)
    views = [term.delta_view() for term in terms]
    scratch = _Scratch()
    if replaced is not None:
        _merge_block(_tensor_bytes(replaced.to(dtype)), 0, entry, 0, info.shape[0], terms, views, scratch, write)
        return out
    path = ckpt.directory / shard
    fd = os.open(path, os.O_RDONLY)
    try:
        _merge_rows_from(fd, path, ckpt.headers[shard].data_start + info.offset, entry, 0, info.shape[0], terms,
                         views, scratch, write)
    finally:
        os.close(fd)
    return out


def _merge_rows_from(fd: int, path: Path, offset: int, info: TensorInfo, start: int, stop: int, terms: list[_Term],
                     views: list[np.ndarray], scratch: _Scratch, write: Callable[[int, memoryview], None]) -> None:
    """Rows ``start:stop`` of the tensor ``info`` whose first of them is at byte ``offset`` of ``fd``: read through a
    private mapping where possible (:func:`_map_rows`), else into ``scratch``, merged with ``terms`` and written by
    ``write`` (:func:`_merge_block`); the mapping is closed after."""
    nbytes = (stop - start) * info.shape[1] * _DTYPE_BYTES[info.dtype]
    mapped = _map_rows(fd, offset, nbytes, _DTYPE_BYTES[info.dtype])
    if mapped is None:
        source, source_offset = scratch.source(nbytes), 0
        _pread_into(fd, source, offset, path)
    else:
        source, source_offset = mapped
    try:
        _merge_block(source, source_offset, info, start, stop, terms, views, scratch, write)
    finally:
        if mapped is not None:
            with contextlib.suppress(BufferError):  # still referenced by an exception's frames: unmapped once they go
                mapped[0].close()


def _untied_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json with ``tie_word_embeddings`` false (top level and a nested ``text_config``), so transformers
    loads the merged, untied weight instead of tying it to the embedding again."""
    out = dict(config)
    out["tie_word_embeddings"] = False
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = {**out["text_config"], "tie_word_embeddings": False}
    return out


def _output_view(ckpt: _Checkpoint, out_names: dict[str, str], replace: dict[str, torch.Tensor],
                 new_tensors: dict[str, torch.Tensor], dropped: set[str] = frozenset()) -> _Checkpoint:
    """``ckpt`` with output names (and shapes of replaced tensors), new tensors appended to the last shard,
    the ``dropped`` output names left out (of the shards and of the index).

    Source offsets are kept, so the shard writer reads each tensor where it is and writes it under its new
    name; new and replaced tensors are written from ``replace``.
    """
    headers: dict[str, SafetensorsHeader] = {}
    for shard in ckpt.shards:
        header = ckpt.headers[shard]
        tensors = []
        for t in header.tensors:
            name = out_names.get(t.name, t.name)
            if name in dropped:
                continue
            if name in replace:
                value = replace[name]
                entry = TensorInfo.new(name, t.dtype, tuple(value.shape))
                tensors.append(TensorInfo(name, t.dtype, entry.shape, t.offset, entry.nbytes))
            else:
                tensors.append(TensorInfo(name, t.dtype, t.shape, t.offset, t.nbytes))
        if shard == ckpt.shards[-1]:
            tensors += [TensorInfo.new(name, value.dtype, tuple(value.shape)) for name, value in sorted(new_tensors.items())]
        headers[shard] = SafetensorsHeader(header.path, tensors, header.metadata, header.data_start)
    index = None
    if ckpt.index is not None:
        index = json.loads(json.dumps(ckpt.index))
        weight_map = {out_names.get(k, k): v for k, v in index["weight_map"].items()}
        weight_map = {k: v for k, v in weight_map.items() if k not in dropped}
        weight_map.update({name: ckpt.shards[-1] for name in new_tensors})
        index["weight_map"] = dict(sorted(weight_map.items()))
    return _Checkpoint(ckpt.directory, ckpt.shards, headers, index, ckpt.model_type, ckpt.config)


def _classification_config(config: dict[str, Any], task: TaskSpec, architecture: str,
                           model_dir: Path) -> dict[str, Any]:
    """config.json of the merged classification checkpoint: the head's architecture and config values (labels,
    problem type, pad id: :meth:`HeadSpec.config_values`). A pad id neither the head nor the config gives (a PEFT
    classifier on Llama) comes from ``model_dir``'s tokenizer, as every loader takes it
    (:func:`bca_deploy.models.saved_tokenizer_pad_id`): transformers refuses to batch a decoder classifier without."""
    from .models import saved_tokenizer_pad_id

    head = task.head
    out = dict(config)
    out["architectures"] = [architecture]
    out.pop("problem_type", None)
    out.update(head.config_values())
    out["id2label"] = {str(i): head.id2label[i] for i in range(head.num_labels)}  # (JSON keys are strings)
    out["label2id"] = {name: i for i, name in sorted(head.id2label.items())}
    if out.get("pad_token_id") is None:
        pad = saved_tokenizer_pad_id(model_dir)
        if pad is not None:
            out["pad_token_id"] = pad
    return out


def _check_paths(model_dir: Path, out_dir: Path, adapter_dirs: list[Path], overwrite: bool) -> None:
    out_dir = out_dir.parent.resolve() / out_dir.name  # compare real locations (model_dir is resolved)
    if out_dir == model_dir:
        raise OutputExistsError(
            f"--out (out_dir in Python) {out_dir} is the model directory; merging in place would destroy the base "
            "checkpoint: choose another --out"
        )
    if model_dir in out_dir.parents:
        raise OutputExistsError(f"--out (out_dir in Python) {out_dir} is inside the model directory {model_dir}; "
                                "choose a path outside it")
    check_inputs_outside(out_dir, [("the model directory", model_dir), *(("the adapter", a) for a in adapter_dirs)])
    check_outside_adapters(out_dir, [("the adapter", a) for a in adapter_dirs])
    recover(out_dir)  # a merge killed earlier: its temporary tree removed, a replaced tree restored
    check_target(out_dir, overwrite, checkpoint=True)


def _other_files(ckpt: _Checkpoint) -> tuple[list[Path], list[str], list[str]]:
    """Files to copy (relative paths), weight files left out, and folders left out because they are links.

    A link to a folder is not followed (it could lead to ``/`` or back to an ancestor); it is named in a warning, so
    a sentence-transformers ``1_Pooling`` linked from elsewhere is not missing from the output unannounced."""
    weights = set(ckpt.shards) | ({SAFE_WEIGHTS_INDEX_NAME} if ckpt.index is not None else set())
    copy, skipped, linked = [], [], []
    for root, dirs, files in os.walk(ckpt.directory, followlinks=False):
        rel_root = Path(root).relative_to(ckpt.directory)
        linked += [str(rel_root / d) for d in sorted(dirs) if d not in _SKIPPED_DIRS and os.path.islink(Path(root, d))]
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not os.path.islink(Path(root, d)))
        for name in sorted(files):
            rel = rel_root / name
            if rel_root == Path(".") and name in weights:
                continue
            if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
                skipped.append(str(rel))
                continue
            _require_regular(Path(root, name))
            if problem := copied_link_problem(Path(root, name), ckpt.directory, "the model directory",
                                              "the merge copies"):
                raise CheckpointFormatError(problem)
            copy.append(rel)
    return copy, skipped, linked


def _require_regular(path: Path) -> None:
    """Refuse a file to copy that is not a regular file once links are followed (:func:`require_readable`): a link
    to ``/dev/zero`` would be copied until the disk is full, a named pipe would wait for a writer (checked before
    anything is written)."""
    try:
        require_readable(path)
    except OSError as exc:
        link = " (through a link)" if path.is_symlink() else ""
        raise CheckpointFormatError(f"{path}: cannot be copied: {exc.strerror}{link}; the merge copies a model "
                                    "directory's other files: remove it from there or fix it") from None


class _Scratch:
    """One worker's reusable buffers, a row block each (grown on demand, kept for the next block)."""

    def __init__(self) -> None:
        self._bytes = bytearray()
        self._source = bytearray()
        self._acc = torch.empty(0, dtype=torch.float32)

    def raw(self, nbytes: int) -> memoryview:
        """A buffer for a block of the output's bytes."""
        if len(self._bytes) < nbytes:
            self._bytes = bytearray(nbytes)
        return memoryview(self._bytes)[:nbytes]

    def source(self, nbytes: int) -> memoryview:
        """A buffer to read a block of the checkpoint into (where it is not mapped, see :func:`_map_rows`)."""
        if len(self._source) < nbytes:
            self._source = bytearray(nbytes)
        return memoryview(self._source)[:nbytes]

    def acc(self, rows: int, cols: int) -> torch.Tensor:
        """A (rows, cols) fp32 block to sum in."""
        if self._acc.numel() < rows * cols:
            self._acc = torch.empty(rows * cols, dtype=torch.float32)
        return self._acc[: rows * cols].view(rows, cols)


# Read the adapted weights' rows through a private mapping of the checkpoint rather than pread: widening
# straight from the page cache skips a copy into a user buffer, which costs more than the widening itself
# (measured per bf16 value, 2-core EPYC, page cache warm: pread + widen ~0.8 ns, mapped + widen ~0.31 ns).
# The output is still written with pwrite: a shared writable mapping of a new ext4 file was ~10x slower
# (a page fault and an unwritten-extent conversion per page).
_MAP_SOURCE = hasattr(mmap, "ACCESS_COPY")


def _map_rows(fd: int, offset: int, nbytes: int, itemsize: int) -> tuple[mmap.mmap, int] | None:
    """A private, never-written mapping of bytes [offset, offset + nbytes) of ``fd``, and where they start in it.

    None where mapping is not possible (disabled, the bytes not aligned for their dtype, a filesystem
    without mmap): the caller reads them instead. Private (``ACCESS_COPY``) so the tensor over it is
    writable for torch and nothing can reach the file; nothing is written to it, so no page is copied.
    The kernel is asked to start reading the block (and the next one) in the background, so a cold page
    cache streams as with sequential reads.
    """
    if not _MAP_SOURCE or offset % itemsize or nbytes == 0:
        return None
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mapping = mmap.mmap(fd, offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
    except (OSError, ValueError):
        return None
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, 2 * nbytes, os.POSIX_FADV_WILLNEED)
    return mapping, offset - start


def _block_rows(info: TensorInfo) -> int:
    """Rows per work item (whole rows: their bytes are contiguous in the file)."""
    return max(1, _BLOCK_ELEMENTS // max(1, info.shape[1]))


def _add_term_rows(acc: np.ndarray, start: int, stop: int, p: int, view: np.ndarray) -> None:
    """Add rows [start, stop) of one term's ΔW (``view``, see :func:`_storage_delta_view`) to ``acc`` (rows, cols).

    Whole block-rows (start and stop multiples of p) go in one call; otherwise each block-row the range
    touches is added on its own (row r of block-row i is ``view[i, r]``, a (cols/p, p) array).
    """
    cols = acc.shape[1]
    if start % p == 0 and stop % p == 0:
        acc4 = acc.reshape((stop - start) // p, p, cols // p, p)
        np.add(acc4, view[start // p : stop // p], out=acc4)
        return
    for i in range(start // p, (stop - 1) // p + 1):
        lo, hi = max(start, i * p), min(stop, (i + 1) * p)
        rows = acc[lo - start : hi - start].reshape(hi - lo, cols // p, p)
        np.add(rows, view[i, lo - i * p : hi - i * p], out=rows)


def _merge_block(source: memoryview | mmap.mmap, source_offset: int, info: TensorInfo, start: int, stop: int,
                 terms: list[_Term], views: list[np.ndarray], scratch: _Scratch,
                 write: Callable[[int, memoryview], None]) -> None:
    """Merge rows [start, stop) of a weight and hand each piece of the result to ``write(byte offset, bytes)``.

    ``source`` holds the rows' checkpoint bytes from ``source_offset`` on (read only). The rows go in chunks
    of about :data:`_CHUNK_ELEMENTS` values, each cache-resident from start to end: the sum is formed in fp32
    and rounded once to the weight's dtype, as the in-memory merge does: widen (exact) into an fp32 chunk,
    add each term's strided view (numpy: torch has no negative strides), round to nearest even into an
    output chunk, check it for NaN/Inf (an fp16 overflow, or non-finite values in the checkpoint) and
    write it (the byte offset is relative to the tensor's start).
    """
    dtype = _TORCH_DTYPES[info.dtype]
    itemsize = _DTYPE_BYTES[info.dtype]
    n, cols = stop - start, info.shape[1]
    rows = torch.frombuffer(source, dtype=dtype, count=n * cols, offset=source_offset).view(n, cols)
    step = max(1, _CHUNK_ELEMENTS // max(1, cols))
    try:
        for lo in range(start, stop, step):
            hi = min(stop, lo + step)
            acc = scratch.acc(hi - lo, cols)
            acc.copy_(rows[lo - start : hi - start])  # exact widening to fp32 (a plain copy for fp32)
            acc_np = acc.numpy()
            for term, view in zip(terms, views):
                _add_term_rows(acc_np, lo, hi, term.block_size, view)
            if dtype == torch.float32:
                result, out = acc, memoryview(acc_np).cast("B")
            else:
                out = scratch.raw((hi - lo) * cols * itemsize)
                result = torch.frombuffer(out, dtype=dtype, count=(hi - lo) * cols).view(hi - lo, cols)
                result.copy_(acc)  # the one rounding, to nearest even
            low, high = torch.aminmax(result)
            if not (math.isfinite(float(low)) and math.isfinite(float(high))):
                source_names = ", ".join(t.source for t in terms)
                raise AdapterMismatchError(
                    f"merged tensor {info.name} ({source_names}) has NaN/Inf values in rows {lo}-{hi - 1}: the "
                    f"sum overflows {info.dtype} or the checkpoint holds non-finite values there; nothing was "
                    "written"
                )
            write(lo * cols * itemsize, out)
    finally:
        del rows  # the source may be a mapping, closed by the caller


class _TensorJob:
    """One adapted tensor being merged: its delta views (built by the first block that needs them, dropped
    after the last) and how many of its blocks are still to do."""

    def __init__(self, info: TensorInfo, terms: list[_Term], blocks: int) -> None:
        self.info, self.terms, self.remaining = info, terms, blocks
        self._views: list[np.ndarray] | None = None
        self._lock = threading.Lock()

    def views(self) -> list[np.ndarray]:
        with self._lock:
            if self._views is None:
                self._views = [term.delta_view() for term in self.terms]
            return self._views

    def block_done(self) -> bool:
        """Count one block as done; True for the last one (the views are released then)."""
        with self._lock:
            self.remaining -= 1
            if self.remaining == 0:
                self._views = None
            return self.remaining == 0


def _run_workers(items: Iterator[Callable[[_Scratch], None]], workers: int) -> None:
    """Run ``items`` (taken in order) on ``workers`` threads, the calling thread being one of them.

    The first error stops every worker after its current item and is raised here, as is a
    KeyboardInterrupt of the calling thread (after the other workers have stopped).
    """
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        scratch = _Scratch()
        while not stop.is_set():
            try:
                with lock:
                    item = next(items, None)
                if item is None:
                    return
                item(scratch)
            except BaseException as exc:
                errors.append(exc)
                stop.set()
                return

    threads = [threading.Thread(target=work, name=f"bca-merge-{k}", daemon=True) for k in range(1, workers)]
    for thread in threads:
        thread.start()
    try:
        work()  # returns when the items are exhausted or a worker failed
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]


def _write_shard(ckpt: _Checkpoint, shard: str, out_path: Path, plan: _Plan, bar: Any) -> None:
    """Write one output shard: adapted weights row block by row block, the rest copied file to file.

    Every piece of the output has a known place (the header is the input's), so :data:`_WORKERS` threads
    each take the next piece in file order and write it where it belongs (``pwrite``): a row block of an
    adapted weight (read through a private mapping of the block, merged and written while still in the CPU
    cache, see :func:`_map_rows` and :func:`_merge_block`), a
    chunk of an untouched tensor (``copy_file_range``: the kernel copies, no user-space buffer), or a
    ``modules_to_save`` tensor. Each worker reads, computes and writes, so the work spreads evenly over
    the cores (a reader thread plus a writer thread left the reader the bottleneck: the math is about
    as costly as the reading and writing together). Memory: a row block (mapped, then unmapped), its fp32
    sum and its output bytes per worker, and the delta views of the tensors in flight, whatever the model.
    """
    header = ckpt.headers[shard]
    src_path = ckpt.directory / shard
    src_fd = os.open(src_path, os.O_RDONLY)
    writer = None
    progress_lock = threading.Lock()

    def tensor_done() -> None:
        with progress_lock:
            bar.update(1)

    def merge_rows(job: _TensorJob, start: int, stop: int, scratch: _Scratch) -> None:
        info = job.info
        offset = header.data_start + info.offset + start * info.shape[1] * _DTYPE_BYTES[info.dtype]
        _merge_rows_from(src_fd, src_path, offset, info, start, stop, job.terms, job.views(), scratch,
                         functools.partial(writer.write_at, info.name))
        if job.block_done():
            tensor_done()

    def copy_piece(info: TensorInfo, start: int, nbytes: int, last: bool, scratch: _Scratch) -> None:
        writer.copy_at(info.name, start, src_fd, header.data_start + info.offset + start, nbytes)
        if last:
            tensor_done()

    def replace(name: str, scratch: _Scratch) -> None:
        writer.write_at(name, 0, _tensor_bytes(plan.replace[name]))
        tensor_done()

    def items() -> Iterator[Callable[[_Scratch], None]]:
        for info in header.tensors:
            name = info.name
            if name in plan.terms:
                terms = plan.terms[name]
                step = _block_rows(info)
                starts = range(0, info.shape[0], step)
                job = _TensorJob(info, terms, len(starts))
                for start in starts:
                    yield functools.partial(merge_rows, job, start, min(info.shape[0], start + step))
            elif name in plan.replace:
                yield functools.partial(replace, name)
            elif info.nbytes == 0:
                tensor_done()
            else:
                for start in range(0, info.nbytes, _COPY_CHUNK_BYTES):
                    nbytes = min(_COPY_CHUNK_BYTES, info.nbytes - start)
                    yield functools.partial(copy_piece, info, start, nbytes, start + nbytes == info.nbytes)

    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # read-ahead for a cold page cache
        writer = SafetensorsWriter(out_path, header.tensors, header.metadata)
        _run_workers(items(), _WORKERS)
        writer.close()
    except BaseException:
        if writer is not None:
            writer.__exit__(RuntimeError, None, None)
        raise
    finally:
        os.close(src_fd)


def _write_index(ckpt: _Checkpoint, out_dir: Path) -> None:
    index = json.loads(json.dumps(ckpt.index))  # a deep copy; every other key is kept as it was
    metadata = index.get("metadata")
    if not isinstance(metadata, dict):
        metadata = index["metadata"] = {}
    metadata["total_size"] = sum(t.nbytes for h in ckpt.headers.values() for t in h.tensors)
    (out_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def merge_checkpoint(
    model_dir: str | Path,
    adapters: Sequence[tuple[str | Path, float]],
    out_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    fsync: bool = True,
) -> Path:
    """Merge adapters into a safetensors checkpoint, streaming tensor by tensor, into a new model directory.

    Every adapted weight becomes ``W + Σ_a weight_a · ΔW_a`` (sum formed in fp32, rounded once to the
    tensor's dtype; ``Conv1D`` weights, stored (in, out), get ΔWᵀ); ``modules_to_save`` tensors of an
    adapter replace the checkpoint's (cast to its dtype; an adapter's weight does not apply to them).
    Every other tensor is copied byte for byte. The output has the input's shard names and split
    (``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
    with the same weight map), and every non-weight file of ``model_dir`` (config.json, tokenizer
    files, generation_config.json, ...) copied; it loads with plain ``AutoModel*.from_pretrained``.

    Every adapter is checked against the checkpoint by :func:`bca_deploy.fit.check_adapter`, the check
    ``load_adapter`` uses: module types come from the checkpoint's architecture (config.json) built on
    PyTorch's ``meta`` device (no memory), shapes and dtypes from the safetensors headers, so a ``conv1d``
    adapter on a Linear, an adapter on an embedding table, missing/unexpected/non-finite tensors and the
    like are refused with every problem listed. Module paths that differ from the checkpoint's by the
    architecture's ``base_model_prefix`` (``model.``, ``bert.``...) are aligned, all or nothing.

    **Classification heads.** When one adapter carries a task head (``task.head`` in its config: a
    classifier trained with it), the output is a complete checkpoint of the head's architecture
    (``BertForSequenceClassification``...): config.json gets ``architectures``, ``num_labels``,
    ``id2label``/``label2id`` and ``problem_type``; the head's tensors are written (added when the base
    checkpoint has none, e.g. a bare encoder directory); every key is named as that architecture names it
    (a bare encoder's keys get its ``bert.``-style prefix). ``AutoModelForSequenceClassification``
    loads it with nothing newly initialized. Several adapters with heads are refused (which head?).

    **Tied weights.** An adapted module whose weight the architecture ties to another tensor (an ``lm_head``
    tied to the input embedding, often not stored at all) is written under its own key as that tensor +
    ΔW (same sum and rounding), the other tensor is left as it is, and config.json gets
    ``tie_word_embeddings: false`` so transformers loads the two apart. That one tensor is built in memory.

    Safety: everything is checked before anything is written, with all problems listed together. The
    output is written to a temporary directory beside ``out_dir``, fsynced, and put in place atomically
    (:mod:`bca_deploy.atomic`): a failure or a kill at any moment leaves ``out_dir`` as it was (the old
    tree, with ``overwrite``) or the complete new one, and the next merge to the same ``out_dir``
    removes what a killed one left behind. ``fsync=False`` skips the fsync (the output reaches the disk
    later, in the background, as after a plain copy): still never half-written after a kill, but a power
    cut or an OS crash soon after may leave the new files incomplete.

    Cost: about a file copy plus a few cache-resident passes per adapted value, spread over up to 4
    worker threads; torch is set to one intra-op thread for the duration (restored after).

    Args:
        model_dir: a transformers model directory with safetensors weights (symlinked files, as in
            the Hugging Face cache, are fine).
        adapters: ``(adapter directory, weight)`` pairs; bca-deploy or PEFT C3A directories, or training runs'
            (their best/, else last/).
        out_dir: the directory to create.
        overwrite: replace ``out_dir`` if it exists.
        progress: show a tqdm progress bar over tensors (on stderr).
        fsync: wait until the output is on the disk before putting it in place (see Safety).

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        OutputExistsError: ``out_dir`` exists (without ``overwrite``), is ``model_dir``, is inside it, or
            contains an input.
        CheckpointFormatError: ``model_dir`` has no safetensors weights, a malformed shard, index or
            config.json, or a tensor in two shards.
        AdapterFormatError: an adapter directory or its config is malformed.
        AdapterMismatchError: an adapter is unusable (tensors missing, unexpected, non-finite...) or does
            not fit the checkpoint (module not found, layer type, shape, model_type, dtype), several
            adapters carry heads, or a merged weight is not finite (named; nothing is written).
        InvalidOptionError: no adapters, or a weight that is not a finite number.
        OSError: not enough free disk space (checked up front), or an I/O error.
    """
    threads = torch.get_num_threads()
    # The math runs on cache-sized row blocks, one per worker thread: torch's own intra-op threads
    # would only compete with the workers for the cores (10x slower on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        return _merge_checkpoint(Path(model_dir), adapters, Path(out_dir), overwrite, progress, fsync)
    finally:
        torch.set_num_threads(threads)


def _merge_checkpoint(
    model_dir: Path, adapters: Sequence[tuple[str | Path, float]], out_dir: Path, overwrite: bool, progress: bool,
    fsync: bool,
) -> Path:
    from tqdm.auto import tqdm

    model_dir = model_dir.resolve()
    out_dir = Path(os.path.abspath(out_dir))
    ckpt = _read_checkpoint(model_dir)  # headers only: their largest tensor bounds what an adapter may save
    if ckpt.config is None:  # merged by shapes alone (a checkpoint of no known architecture is still merged)
        warnings.warn(f"{model_dir}: no config.json, so the merged weights have none either: transformers cannot load "
                      "them as they are (copy the base model's config.json beside them); layer types are not checked")
    sources = _read_adapters(adapters, max((math.prod(t.shape) for h in ckpt.headers.values() for t in h.tensors),
                                           default=0))
    _check_paths(model_dir, out_dir, [a.directory for a in sources], overwrite)
    plan = _plan_merge(ckpt, sources)
    if plan.structure_note and ckpt.config is not None:  # (without one: warned above) merged, but not checked
        warnings.warn(f"{model_dir}/config.json: transformers cannot build the model it describes "
                      f"({plan.structure_note[:300]}); merged by the tensors' names and shapes alone, layer types not "
                      "checked, and the merged model has the same config.json")
    if plan.dropped:
        names = sorted(plan.dropped)
        warnings.warn(
            f"{model_dir}: not writing {len(names)} tensor(s) the merged {plan.config['architectures'][0]} "
            f"does not load ({sum(plan.dropped.values()) / 2**20:,.1f} MiB: {', '.join(names[:5])}"
            + (f" and {len(plan.dropped) - 5} more" if len(plan.dropped) > 5 else "")
            + "): the head of the architecture it was saved as, which the classification head replaces")
    ckpt = plan.checkpoint  # the output's view: same shards and offsets, output names, a head's new tensors
    others, skipped, linked = _other_files(ckpt)
    if skipped:
        warnings.warn(
            f"{model_dir}: not copying other weight files (they hold unmerged weights): {', '.join(skipped[:10])}"
            + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        )
    if linked:
        warnings.warn(
            f"{model_dir}: not copying folders that are links (links are not followed): {', '.join(linked[:10])}"
            + (f" and {len(linked) - 10} more" if len(linked) > 10 else "")
            + "; copy them into the merged model by hand if it needs them"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    needed = sum((model_dir / s).stat().st_size for s in ckpt.shards) + plan.new_bytes
    needed += sum((model_dir / rel).stat().st_size for rel in others)
    free = shutil.disk_usage(out_dir.parent).free
    if free < needed + (64 << 20):
        raise OSError(
            errno.ENOSPC,
            f"not enough free space for the merged model: {needed / 2**30:.2f} GiB needed in "
            f"{out_dir.parent}, {free / 2**30:.2f} GiB free",
        )

    total = sum(len(h.tensors) for h in ckpt.headers.values())
    with atomic_dir(out_dir, overwrite=overwrite, fsync=fsync, checkpoint=True) as tmp:
        for rel in others:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model_dir / rel, tmp / rel)
        if plan.config is not None:
            (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        with tqdm(total=total, unit="tensor", desc="merge", disable=not progress) as bar:
            for shard in ckpt.shards:
                bar.set_postfix_str(shard, refresh=False)
                _write_shard(ckpt, shard, tmp / shard, plan, bar)
        if ckpt.index is not None:
            _write_index(ckpt, tmp)
    return out_dir
