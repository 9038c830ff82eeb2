"""Merge block-circulant adapters into dense weights: in memory, and streaming over safetensors checkpoints.

Two ways to get a plain model whose weights carry the adapters:

* **In memory** (:func:`merge`, :func:`unmerge`, :func:`merge_and_unload`): every :class:`BCALinear` adds
  its ΔW into the base weight. The sum is formed in fp32 and rounded once to the base dtype; ``unmerge``
  restores the original weights bit for bit (the pre-merge weight is kept).
* **Streaming** (:func:`merge_checkpoint`): reads a transformers model directory shard by shard, tensor
  by tensor, adds ``Σ_a weight_a · ΔW_a`` to every adapted weight and writes a standard model directory
  that ``AutoModel*.from_pretrained`` loads with no trace of bca-deploy. The whole model is never in
  memory: adapted weights go through in row blocks of a few MB (read, merged and written while still in
  the CPU cache), other tensors are copied file to file by the kernel, so peak RSS is the Python + torch
  baseline plus the adapters' kernels plus a few blocks, whatever the model's size.

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

import errno
import functools
import json
import math
import os
import queue
import shutil
import struct
import tempfile
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from .adapter_io import kernel_problem, read_adapter
from .config import KERNEL_SUFFIX, AdapterConfig, ModuleSpec
from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    BCAError,
    OutputExistsError,
    format_problems,
)
from .inject import bca_layers, remove_adapters
from .layers import BCALinear, dense_delta

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


class CheckpointFormatError(BCAError, ValueError):
    """A model directory or safetensors file is malformed or not a transformers safetensors checkpoint."""


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
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(known)}")
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
    merged by this call are unmerged again.

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
        raise ValueError(f"this {type(model).__name__} has no BCA layers; inject or load an adapter first")
    names = _selected_names(layers, adapter_names)
    problems = [
        f"{path}.bca_kernels.{n}: has NaN/Inf values"
        for path, layer in layers
        for n in _layer_selection(layer, names)
        if not torch.isfinite(layer.bca_kernels[n].detach()).all()
    ]
    if problems:
        raise AdapterFormatError(format_problems("refusing to merge non-finite adapter kernels:", problems))
    merged_now: list[BCALinear] = []
    try:
        for _, layer in layers:
            selection = _layer_selection(layer, names)
            if not selection:
                continue
            had_merged = bool(layer.merged_adapters)
            layer.merge(selection, keep_original=keep_original)
            if not had_merged:
                merged_now.append(layer)
    except Exception:
        for layer in merged_now:
            layer.unmerge()
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` on every :class:`BCALinear` (bit-exact where the original was kept)."""
    for _, layer in bca_layers(model):
        layer.unmerge()
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

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
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


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file (the tensor bytes are not read).

    Checks what a reader relies on: header length within the file, valid JSON, every entry with a dtype,
    a shape and data offsets, offsets contiguous from 0 and covering the data section exactly, and
    sizes equal to ``prod(shape) * itemsize`` for dtypes whose size is known.

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
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointFormatError(f"{path}: __metadata__ must map strings to strings")
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointFormatError(f"{path}: tensor {name}: malformed header entry {entry!r}") from exc
        if not isinstance(dtype, str) or any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise CheckpointFormatError(f"{path}: tensor {name}: malformed header entry {entry!r}")
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
    if data_start + position != size:
        raise CheckpointFormatError(
            f"{path}: the header describes {position} data bytes but the file holds {size - data_start}; truncated?"
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


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        written = os.write(fd, data)
        data = data[written:]


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
    """Write a safetensors file front to back: the header first, then each tensor's bytes, in order.

    The whole header is known up front (names, dtypes, shapes, sizes), so tensors can be produced one at
    a time, or a piece at a time (:meth:`write_chunk`), and never need to be in memory together. Offsets
    are assigned contiguously in the order of ``tensors``, and tensors must be written in that order.

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
        self._next = 0  # index of the tensor being written
        self._written = 0  # bytes of it written so far
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(self._fd, memoryview(header))
        except BaseException:
            self.__exit__(RuntimeError, None, None)
            raise

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
        _write_all(self._fd, view)
        self._advance(entry, len(view))

    def write_chunk(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append the next bytes of tensor ``name``; it is complete once its ``nbytes`` have been written."""
        entry = self._current(name)
        view = memoryview(data).cast("B")
        if self._written + len(view) > entry.nbytes:
            raise ValueError(
                f"{self.path}: tensor {name}: {self._written + len(view)} bytes given, the header says {entry.nbytes}"
            )
        _write_all(self._fd, view)
        self._advance(entry, len(view))

    def copy_range(self, name: str, src_fd: int, src_offset: int) -> None:
        """Write tensor ``name`` whole by copying its bytes from another open file (inside the kernel if it can)."""
        entry = self._current(name)
        if self._written:
            raise ValueError(f"{self.path}: tensor {name} is partly written; copy_range writes whole tensors")
        remaining, offset = entry.nbytes, src_offset
        try:
            while remaining:
                copied = os.copy_file_range(src_fd, self._fd, remaining, offset)
                if copied == 0:
                    break
                remaining -= copied
                offset += copied
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                raise
        if remaining:  # no copy_file_range here (another filesystem, an old kernel): read and write
            chunk = bytearray(min(remaining, 1 << 20))
            while remaining:
                view = memoryview(chunk)[: min(remaining, len(chunk))]
                _pread_into(src_fd, view, offset, f"fd {src_fd}")
                _write_all(self._fd, view)
                remaining -= len(view)
                offset += len(view)
        self._advance(entry, entry.nbytes)

    def close(self) -> None:
        """Close the file. Raises if tensors are missing (call only after writing all of them)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._next != len(self.tensors):
            missing = [t.name for t in self.tensors[self._next:]]
            raise ValueError(f"{self.path}: closed with {len(missing)} tensor(s) unwritten: {missing[:5]}")

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
_BLOCK_ELEMENTS = 1 << 18  # weight elements per row block (at least lcm(p) rows): ~1 MB of fp32, cache-sized
_BUFFERS = 4  # row blocks in flight: one being merged, the others queued for the writer thread
_WRITER_THREAD = True


@dataclass
class _Checkpoint:
    directory: Path
    shards: list[str]  # file names, in order
    headers: dict[str, SafetensorsHeader]
    index: dict[str, Any] | None  # the parsed index JSON, if sharded
    model_type: str | None

    def locations(self) -> dict[str, tuple[str, TensorInfo]]:
        return {t.name: (shard, t) for shard in self.shards for t in self.headers[shard].tensors}


@dataclass
class _Adapter:
    directory: Path
    weight: float
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]


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
    terms: dict[str, list[_Term]] = field(default_factory=dict)  # checkpoint key -> delta terms
    replace: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint key -> new value


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
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointFormatError(f"{index_path}: not a valid safetensors index ({exc})") from exc
        shards = list(dict.fromkeys(weight_map.values()))
        bad = [s for s in shards if not isinstance(s, str) or "/" in s or "\\" in s or s.startswith(".")]
        if bad:
            raise CheckpointFormatError(f"{index_path}: shard names must be plain file names, got {bad[:3]}")
        shards.sort()
    else:
        others = sorted(p.name for p in model_dir.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
        hint = (f"; it has {', '.join(others)}: convert the checkpoint to safetensors first "
                "(load it with transformers and save_pretrained)") if others else ""
        raise CheckpointFormatError(
            f"{model_dir}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}{hint}"
        )
    problems, headers = [], {}
    for shard in shards:
        if not (model_dir / shard).is_file():
            problems.append(f"shard {shard}: listed in the index but missing")
            continue
        headers[shard] = read_safetensors_header(model_dir / shard)
    if index is not None:
        for name, shard in index["weight_map"].items():
            if shard in headers and name not in headers[shard].by_name():
                problems.append(f"tensor {name}: the index puts it in {shard}, which does not hold it")
    if problems:
        raise CheckpointFormatError(format_problems(f"{model_dir}: inconsistent checkpoint:", problems))
    model_type = None
    config_path = model_dir / "config.json"
    if config_path.is_file():
        try:
            model_type = json.loads(config_path.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
    return _Checkpoint(model_dir, shards, headers, index, model_type)


def _find_key(target: str, locations: dict[str, Any], keys: list[str]) -> tuple[str | None, list[str]]:
    """The checkpoint key for ``target`` (``<module path>.weight``): exact, else the one key that differs only
    by a leading prefix (``model.`` / ``bert.`` / ``transformer.``), on either side. Returns (key, candidates)."""
    if target in locations:
        return target, [target]
    candidates = [k for k in keys if k.endswith("." + target) or target.endswith("." + k)]
    return (candidates[0] if len(candidates) == 1 else None), candidates


def _read_adapters(adapters: Sequence[tuple[str | Path, float]]) -> list[_Adapter]:
    if not adapters:
        raise ValueError("no adapters given: pass a list of (adapter directory, weight) pairs")
    result = []
    for item in adapters:
        if isinstance(item, (str, Path)):
            directory, weight = item, 1.0
        else:
            directory, weight = item
        weight = float(weight)
        if not math.isfinite(weight):
            raise ValueError(f"adapter {directory}: weight must be finite, got {weight!r}")
        config, tensors = read_adapter(Path(directory))
        result.append(_Adapter(Path(directory).resolve(), weight, config, tensors))
    return result


def _plan_merge(ckpt: _Checkpoint, adapters: list[_Adapter]) -> _Plan:
    """Match every adapter against the checkpoint; raise with every problem at once, or return the plan."""
    bad_values = [
        f"{a.directory}: tensor {key} has NaN/Inf values"
        for a in adapters
        for key, tensor in a.tensors.items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad_values:
        raise AdapterFormatError(format_problems("refusing to merge adapters with non-finite values:", bad_values))

    locations = ckpt.locations()
    keys = list(locations)
    problems: list[str] = []
    plan = _Plan()
    replaced_by: dict[str, Path] = {}
    for a in adapters:
        cfg = a.config
        if cfg.base_model_type and ckpt.model_type and cfg.base_model_type != ckpt.model_type:
            problems.append(
                f"{a.directory}: trained on a {cfg.base_model_type!r} model, but {ckpt.directory} is a "
                f"{ckpt.model_type!r} model (config.json)"
            )
            continue
        for module, spec in sorted(cfg.modules.items()):
            where = f"{a.directory}: module {module}"
            problem = kernel_problem(a.tensors, module, spec, check_finite=False)  # NaN/Inf: checked per tensor above
            if problem is not None:
                problems.append(f"{where}: {problem}")
                continue
            kernel = a.tensors[module + KERNEL_SUFFIX]
            key, candidates = _find_key(module + ".weight", locations, keys)
            if key is None:
                if candidates:
                    problems.append(f"{where}: ambiguous, matches several checkpoint tensors: {', '.join(candidates[:5])}")
                else:
                    problems.append(f"{where}: no tensor {module}.weight (or a prefixed variant) in the checkpoint")
                continue
            shard, info = locations[key]
            if info.shape != tuple(spec.weight_shape):
                problems.append(
                    f"{where}: checkpoint tensor {key} has shape {list(info.shape)}, the adapter expects "
                    f"{list(spec.weight_shape)} ({spec.layer_type}, in={spec.in_features}, out={spec.out_features})"
                )
                continue
            if info.dtype not in _TORCH_DTYPES:
                problems.append(f"{where}: checkpoint tensor {key} is {info.dtype}; merging supports F32, F16, BF16")
                continue
            factor = a.weight * float(spec.scaling)
            plan.terms.setdefault(key, []).append(_Term(f"{a.directory}:{module}", kernel, spec, factor))
        for name, tensor in a.tensors.items():
            if name.endswith(KERNEL_SUFFIX):
                continue
            key, candidates = _find_key(name, locations, keys)
            where = f"{a.directory}: modules_to_save tensor {name}"
            if key is None:
                detail = f"ambiguous ({', '.join(candidates[:5])})" if candidates else "not in the checkpoint"
                problems.append(
                    f"{where}: {detail}; save the base model with this head (e.g. with the task's "
                    "AutoModelFor... class) and merge into that checkpoint"
                )
                continue
            info = locations[key][1]
            if info.shape != tuple(tensor.shape):
                problems.append(f"{where}: shape {list(tensor.shape)}, the checkpoint's {key} is {list(info.shape)}")
                continue
            if info.dtype not in _TORCH_DTYPES:
                problems.append(f"{where}: checkpoint tensor {key} is {info.dtype}; only F32, F16, BF16 are replaced")
                continue
            if key in replaced_by:
                problems.append(f"{where}: {key} is also replaced by {replaced_by[key]}; merge these adapters separately")
                continue
            replaced_by[key] = a.directory
            plan.replace[key] = tensor.detach().to(_TORCH_DTYPES[info.dtype]).contiguous()
    both = sorted(set(plan.terms) & set(plan.replace))
    problems += [f"checkpoint tensor {k}: both adapted and replaced by modules_to_save" for k in both]
    if problems:
        raise AdapterMismatchError(format_problems(f"adapters do not fit the checkpoint {ckpt.directory}:", problems))
    return plan


def _check_paths(model_dir: Path, out_dir: Path, adapter_dirs: list[Path], overwrite: bool) -> None:
    exists = out_dir.exists() or out_dir.is_symlink()
    out_dir = out_dir.parent.resolve() / out_dir.name  # compare real locations (model_dir is resolved)
    if out_dir == model_dir:
        raise OutputExistsError(
            f"out_dir {out_dir} is the model directory; merging in place would destroy the base checkpoint: "
            "choose another out_dir"
        )
    if model_dir in out_dir.parents:
        raise OutputExistsError(f"out_dir {out_dir} is inside the model directory {model_dir}; choose a path outside it")
    for protected in [model_dir, *adapter_dirs]:
        if out_dir in protected.parents or out_dir == protected:
            raise OutputExistsError(
                f"out_dir {out_dir} contains {protected}, an input of this merge; choose another out_dir"
            )
    if exists and not overwrite:
        raise OutputExistsError(f"{out_dir}: already exists; pass overwrite=True to replace it")


def _other_files(ckpt: _Checkpoint) -> tuple[list[Path], list[str]]:
    """Files to copy (relative paths) and weight files left out."""
    weights = set(ckpt.shards) | ({SAFE_WEIGHTS_INDEX_NAME} if ckpt.index is not None else set())
    copy, skipped = [], []
    for root, dirs, files in os.walk(ckpt.directory, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        rel_root = Path(root).relative_to(ckpt.directory)
        for name in sorted(files):
            rel = rel_root / name
            if rel_root == Path(".") and name in weights:
                continue
            if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
                skipped.append(str(rel))
                continue
            copy.append(rel)
    return copy, skipped


class _BackgroundWriter:
    """Runs a shard's write operations in order on one thread, so writing overlaps reading and the math."""

    def __init__(self, threaded: bool = True) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.error: BaseException | None = None
        self._stop = False
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="bca-merge-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                return
            if self.error is not None or self._stop:
                continue
            try:
                op()
            except BaseException as exc:  # re-raised on the main thread
                self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, op: Callable[[], None]) -> None:
        self.check()
        if self._thread is None:
            op()
        else:
            self._queue.put(op)

    def finish(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        self.check()

    def abort(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()


class _BufferPool:
    """A few reusable byte buffers of one row block each (allocated on first use, reused after)."""

    def __init__(self, count: int, nbytes: int) -> None:
        self._free: queue.Queue[bytearray | None] = queue.Queue()
        for _ in range(count):
            self._free.put(None)
        self.nbytes = nbytes

    def get(self, writer: _BackgroundWriter) -> bytearray:
        while True:
            writer.check()  # a failed writer gives no buffers back
            try:
                buf = self._free.get(timeout=0.2)
            except queue.Empty:
                continue
            return buf if buf is not None else bytearray(self.nbytes)

    def put(self, buf: bytearray) -> None:
        self._free.put(buf)


def _block_rows(info: TensorInfo, terms: list[_Term]) -> int:
    """Rows per block: a multiple of every adapter's p (ΔW row-block n depends on kernel row n only)."""
    unit = math.lcm(*(t.block_size for t in terms))
    return max(1, _BLOCK_ELEMENTS // (unit * info.shape[1])) * unit


def _merge_block(raw: memoryview, info: TensorInfo, start: int, stop: int, terms: list[_Term],
                 views: list[np.ndarray], scratch: torch.Tensor) -> None:
    """Add the delta terms to rows [start, stop) of a weight, held in ``raw``, in place.

    The sum is formed in fp32 and rounded once to the weight's dtype; the block is then checked for
    NaN/Inf (an fp16 overflow, or non-finite values in the checkpoint).
    """
    dtype = _TORCH_DTYPES[info.dtype]
    n, cols = stop - start, info.shape[1]
    block = torch.frombuffer(raw, dtype=dtype, count=n * cols).view(n, cols)  # shares raw
    if dtype == torch.float32:
        acc = block
    else:
        acc = scratch[: n * cols].view(n, cols)
        acc.copy_(block)  # exact widening to fp32
    acc_np = acc.numpy()
    for term, view in zip(terms, views):
        p = term.block_size
        acc4 = acc_np.reshape(n // p, p, cols // p, p)
        np.add(acc4, view[start // p : stop // p], out=acc4)
    if dtype != torch.float32:
        block.copy_(acc)  # the one rounding, to nearest even
    low, high = torch.aminmax(block)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        source = ", ".join(t.source for t in terms)
        raise AdapterMismatchError(
            f"merged tensor {info.name} ({source}) has NaN/Inf values in rows {start}-{stop - 1}: the sum "
            f"overflows {info.dtype} or the checkpoint holds non-finite values there; nothing was written"
        )


def _write_shard(ckpt: _Checkpoint, shard: str, out_path: Path, plan: _Plan, pool: _BufferPool,
                 scratch: torch.Tensor, bar: Any) -> None:
    """Write one output shard front to back: adapted weights a row block at a time, the rest copied.

    Row blocks are small (a few MB) so a block is read, merged and written while it is still in the
    CPU cache; writes run on a background thread. Memory: ``_BUFFERS`` blocks, whatever the model.
    """
    header = ckpt.headers[shard]
    src_path = ckpt.directory / shard
    src_fd = os.open(src_path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # read-ahead for a cold page cache
    writer = None
    background = _BackgroundWriter(threaded=_WRITER_THREAD)
    try:
        writer = SafetensorsWriter(out_path, header.tensors, header.metadata)

        def write_block(name: str, buf: bytearray, nbytes: int) -> None:
            writer.write_chunk(name, memoryview(buf)[:nbytes])
            pool.put(buf)

        for info in header.tensors:
            name = info.name
            if name in plan.terms:
                terms = plan.terms[name]
                rows, cols = info.shape
                row_bytes = cols * _DTYPE_BYTES[info.dtype]
                step = _block_rows(info, terms)
                views = [term.delta_view() for term in terms]
                for start in range(0, rows, step):
                    stop = min(rows, start + step)
                    buf = pool.get(background)
                    nbytes = (stop - start) * row_bytes
                    raw = memoryview(buf)[:nbytes]
                    _pread_into(src_fd, raw, header.data_start + info.offset + start * row_bytes, src_path)
                    _merge_block(raw, info, start, stop, terms, views, scratch)
                    background.submit(functools.partial(write_block, name, buf, nbytes))
            elif name in plan.replace:
                background.submit(functools.partial(writer.write, name, plan.replace[name]))
            else:
                background.submit(functools.partial(writer.copy_range, name, src_fd, header.data_start + info.offset))
            bar.update(1)
        background.finish()
        writer.close()
    except BaseException:
        background.abort()
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


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out_dir``; with overwrite, the old one is moved aside, then deleted."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.rename(tmp, out_dir)
        return
    if not overwrite:  # appeared while we were writing
        raise OutputExistsError(f"{out_dir}: already exists; pass overwrite=True to replace it")
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    try:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    except OSError as exc:
        warnings.warn(f"merged model is in {out_dir}, but the previous one could not be deleted from {old}: {exc}")


def merge_checkpoint(
    model_dir: str | Path,
    adapters: Sequence[tuple[str | Path, float]],
    out_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge adapters into a safetensors checkpoint, streaming tensor by tensor, into a new model directory.

    Every adapted weight becomes ``W + Σ_a weight_a · ΔW_a`` (sum formed in fp32, rounded once to the
    tensor's dtype; ``Conv1D`` weights, stored (in, out), get ΔWᵀ); ``modules_to_save`` tensors of an
    adapter replace the checkpoint's (cast to its dtype; an adapter's weight does not apply to them).
    Every other tensor is copied byte for byte. The output has the input's shard names and split
    (``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
    with the same weight map), and every non-weight file of ``model_dir`` (config.json, tokenizer
    files, generation_config.json, ...) copied; it loads with plain ``AutoModel*.from_pretrained``.

    Adapter module paths are matched to checkpoint keys ``<path>.weight`` exactly, else to the one key
    that differs by a leading prefix (``model.``, ``bert.``, ...), on either side.

    Safety: everything below is checked before anything is written, with all problems of a kind
    listed together. The output is written to a temporary directory beside ``out_dir`` and renamed
    into place at the end, so an error or a crash never leaves a partial model at ``out_dir`` (with
    ``overwrite``, the old directory is moved aside, replaced, then deleted). Files are not fsynced.

    Cost: about a file copy plus one read and a few cache-resident passes per adapted value; torch is
    set to one thread for the duration (restored after), the writes run on a second thread.

    Args:
        model_dir: a transformers model directory with safetensors weights (symlinked files, as in
            the Hugging Face cache, are fine).
        adapters: ``(adapter directory, weight)`` pairs; bca-deploy or PEFT C3A directories.
        out_dir: the directory to create.
        overwrite: replace ``out_dir`` if it exists.
        progress: show a tqdm progress bar over tensors (on stderr).

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        OutputExistsError: ``out_dir`` exists (without ``overwrite``), is ``model_dir``, is inside it, or
            contains an input.
        CheckpointFormatError: ``model_dir`` has no safetensors weights or a malformed shard/index.
        AdapterFormatError: an adapter directory is malformed, or a kernel holds NaN/Inf.
        AdapterMismatchError: an adapter does not fit the checkpoint (module not found or ambiguous,
            shape, model_type, unsupported dtype), or a merged weight is not finite (named; the
            temporary output is removed).
        OSError: not enough free disk space (checked up front), or an I/O error.
    """
    threads = torch.get_num_threads()
    # The math runs on cache-sized row blocks, one at a time, while a thread writes: torch's own worker
    # threads would only compete with it for the cores (10x slower on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        return _merge_checkpoint(Path(model_dir), adapters, Path(out_dir), overwrite, progress)
    finally:
        torch.set_num_threads(threads)


def _merge_checkpoint(
    model_dir: Path, adapters: Sequence[tuple[str | Path, float]], out_dir: Path, overwrite: bool, progress: bool
) -> Path:
    from tqdm.auto import tqdm

    model_dir = model_dir.resolve()
    out_dir = Path(os.path.abspath(out_dir))
    sources = _read_adapters(adapters)
    _check_paths(model_dir, out_dir, [a.directory for a in sources], overwrite)
    ckpt = _read_checkpoint(model_dir)
    plan = _plan_merge(ckpt, sources)
    others, skipped = _other_files(ckpt)
    if skipped:
        warnings.warn(
            f"{model_dir}: not copying other weight files (they hold unmerged weights): {', '.join(skipped[:10])}"
            + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    needed = sum((model_dir / s).stat().st_size for s in ckpt.shards)
    needed += sum((model_dir / rel).stat().st_size for rel in others)
    free = shutil.disk_usage(out_dir.parent).free
    if free < needed + (64 << 20):
        raise OSError(
            errno.ENOSPC,
            f"not enough free space for the merged model: {needed / 2**30:.2f} GiB needed in "
            f"{out_dir.parent}, {free / 2**30:.2f} GiB free",
        )

    locations = ckpt.locations()
    block_bytes = [
        _block_rows(locations[k][1], terms) * locations[k][1].shape[1] * _DTYPE_BYTES[locations[k][1].dtype]
        for k, terms in plan.terms.items()
    ]
    scratch_elements = max(
        [_block_rows(locations[k][1], terms) * locations[k][1].shape[1]
         for k, terms in plan.terms.items() if locations[k][1].dtype != "F32"],
        default=0,
    )
    scratch = torch.empty(scratch_elements, dtype=torch.float32)
    pool = _BufferPool(_BUFFERS, max(block_bytes, default=0))

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.merging-", dir=out_dir.parent))
    total = sum(len(h.tensors) for h in ckpt.headers.values())
    try:
        for rel in others:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model_dir / rel, tmp / rel)
        with tqdm(total=total, unit="tensor", desc="merge", disable=not progress) as bar:
            for shard in ckpt.shards:
                bar.set_postfix_str(shard, refresh=False)
                _write_shard(ckpt, shard, tmp / shard, plan, pool, scratch, bar)
        if ckpt.index is not None:
            _write_index(ckpt, tmp)
        _install(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
