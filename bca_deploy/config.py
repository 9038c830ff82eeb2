"""The adapter configuration: what is adapted, with which block size and scale, on which base model.

This is the in-memory form of ``adapter_config.json``. It records the identity of the base model
(``model_type`` and the shape of every adapted weight) so an adapter can be checked against a model
or a checkpoint before anything is computed or written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterFormatError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUT",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "KERNEL_SUFFIX",
    "INITS",
    "LAYER_TYPES",
    "ModuleSpec",
    "AdapterConfig",
    "block_size_for",
    "valid_block_sizes",
]

FORMAT_NAME = "bca-deploy"
FORMAT_VERSION = 1
LAYOUT = "first-column"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KERNEL_SUFFIX = ".bca_kernel"
INITS = ("zeros", "normal", "xavier_uniform", "kaiming_uniform")
LAYER_TYPES = ("linear", "conv1d")


@dataclass
class ModuleSpec:
    """One adapted module.

    Attributes:
        block_size: p; divides both ``in_features`` and ``out_features``.
        scaling: ΔW = scaling · BlockCirculant(w).
        in_features: d_in of the base layer.
        out_features: d_out of the base layer.
        layer_type: ``"linear"`` (weight stored (d_out, d_in)) or ``"conv1d"`` (transformers'
            GPT-2 ``Conv1D``, weight stored transposed, (d_in, d_out)).
    """

    block_size: int
    scaling: float
    in_features: int
    out_features: int
    layer_type: str = "linear"

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight as stored in the model / checkpoint."""
        if self.layer_type == "conv1d":
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def kernel_shape(self) -> tuple[int, int, int]:
        p = self.block_size
        return (self.out_features // p, self.in_features // p, p)


def valid_block_sizes(in_features: int, out_features: int) -> list[int]:
    """Every p that divides both dimensions (the block sizes a layer accepts), ascending."""
    g = math.gcd(in_features, out_features)
    return [p for p in range(1, g + 1) if g % p == 0]


def block_size_for(module_name: str, block_size: int, block_size_pattern: dict[str, int]) -> int:
    """The block size of ``module_name``: the first override whose key matches, else the default.

    A key matches when it equals the module path or, as in PEFT's C3A, when ``.*\\.{key}$``
    matches it (so ``"query"`` or ``"layer.0.attention.self.query"`` both work).
    """
    for key, value in block_size_pattern.items():
        if key == module_name or re.match(rf".*\.{key}$", module_name):
            return int(value)
    return int(block_size)


@dataclass
class AdapterConfig:
    """Everything in ``adapter_config.json`` (format version 1).

    Attributes:
        target_modules: the user's selection (names matched as path suffixes, or one regex).
        block_size: default p.
        block_size_pattern: per-module overrides, ``{name or regex: p}``.
        scaling: default scale applied to new modules.
        init: how kernels were initialised (``zeros`` makes the adapter a no-op at start).
        modules: per adapted module path, its :class:`ModuleSpec`; the authority when loading.
        modules_to_save: paths of modules saved whole beside the kernels (e.g. a classifier head).
        base_model_type: ``config.model_type`` of the base model, if known.
        base_model_name_or_path: where the base model came from, informational.
    """

    target_modules: list[str] | str
    block_size: int
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    scaling: float = 1.0
    init: str = "zeros"
    modules: dict[str, ModuleSpec] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    base_model_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        for key, value in self.block_size_pattern.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"block_size_pattern[{key!r}] must be a positive integer, got {value!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        if not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be finite, got {self.scaling!r}")
        for name, spec in self.modules.items():
            if spec.layer_type not in LAYER_TYPES:
                raise ValueError(f"module {name}: layer_type must be one of {LAYER_TYPES}, got {spec.layer_type!r}")
            p = spec.block_size
            if p < 1 or spec.in_features % p or spec.out_features % p:
                raise ValueError(
                    f"module {name}: block size {p} does not divide its shape "
                    f"(in_features={spec.in_features}, out_features={spec.out_features})"
                )

    @property
    def num_parameters(self) -> int:
        """Trainable kernel parameters: Σ d_out·d_in / p over adapted modules."""
        return sum(s.in_features * s.out_features // s.block_size for s in self.modules.values())

    # ---- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "layout": LAYOUT,
            "base_model": {
                "model_type": self.base_model_type,
                "name_or_path": self.base_model_name_or_path,
                "adapted_weights": {f"{n}.weight": list(s.weight_shape) for n, s in sorted(self.modules.items())},
            },
            "target_modules": self.target_modules,
            "block_size": self.block_size,
            "block_size_pattern": dict(self.block_size_pattern),
            "scaling": self.scaling,
            "init": self.init,
            "modules_to_save": list(self.modules_to_save),
            "modules": {n: asdict(s) for n, s in sorted(self.modules.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
        if data.get("format") != FORMAT_NAME:
            raise AdapterFormatError(
                f"{source}: 'format' is {data.get('format')!r}, expected {FORMAT_NAME!r} "
                "(for a PEFT C3A adapter, use load_adapter, which converts it)"
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise AdapterFormatError(
                f"{source}: format_version {version!r} is not supported by this bca-deploy "
                f"(it reads version {FORMAT_VERSION}); upgrade bca-deploy to read newer adapters"
            )
        if data.get("layout") != LAYOUT:
            raise AdapterFormatError(f"{source}: layout {data.get('layout')!r}, expected {LAYOUT!r}")
        try:
            modules = {name: ModuleSpec(**spec) for name, spec in data["modules"].items()}
            base = data.get("base_model") or {}
            return cls(
                target_modules=data["target_modules"],
                block_size=data["block_size"],
                block_size_pattern=dict(data.get("block_size_pattern") or {}),
                scaling=float(data.get("scaling", 1.0)),
                init=data.get("init", "zeros"),
                modules=modules,
                modules_to_save=list(data.get("modules_to_save") or []),
                base_model_type=base.get("model_type"),
                base_model_name_or_path=base.get("name_or_path"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterFormatError(f"{source}: malformed adapter config: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> AdapterConfig:
        path = Path(path)
        return cls.from_dict(read_json(path), source=str(path))


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path`` with errors that name the file."""
    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
