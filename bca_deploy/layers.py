"""``BCALinear``: a frozen ``nn.Linear`` (or transformers ``Conv1D``) plus named block-circulant adapters.

Each adapter is a kernel tensor of shape (d_out/p, d_in/p, p), fp32 whatever the base dtype, held in
an ``nn.ParameterDict`` keyed by adapter name. Several active adapters **sum** their deltas (each
sees the layer's input; none is fed into the next).

A layer can also route **each row of a batch to its own adapter** (multi-adapter serving): while
``row_adapters`` is set (by :func:`bca_deploy.inject.mixed_adapters`), row b of the input gets the
delta of adapter ``row_adapters[b]`` only, or none for :data:`BASE_ADAPTER`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable

import torch
from torch import nn

from .config import INITS, ModuleSpec, valid_block_sizes
from .errors import (
    AdapterMismatchError,
    AdapterNameError,
    BlockSizeError,
    InvalidOptionError,
    NonFiniteError,
    TargetModuleError,
)
from .ops import block_circulant_matmul, materialize

__all__ = ["BCALinear", "BASE_ADAPTER", "RowAdapters", "adapter_name_problem", "require_adapter_name",
           "dense_delta", "is_adaptable", "layer_type_of", "layer_dims"]

#: The adapter name that selects the base model alone for a row of a mixed batch (as in PEFT).
BASE_ADAPTER = "__base__"


class RowAdapters:
    """Which rows of a batch use which adapter: ``rows[name]`` = its row indices, in order;
    :meth:`groups` gives them as int64 tensors on a device.

    Built once per batch by :func:`bca_deploy.inject.mixed_adapters` and shared by every layer.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.batch_size = len(self.names)
        order: dict[str, list[int]] = {}
        for row, name in enumerate(self.names):
            order.setdefault(name, []).append(row)
        self.rows = order
        self._on_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    def groups(self, device: torch.device) -> dict[str, torch.Tensor]:
        """``{adapter name: row indices}`` as int64 tensors on ``device`` (cached per device)."""
        if device not in self._on_device:
            self._on_device[device] = {
                name: torch.tensor(rows, dtype=torch.long, device=device) for name, rows in self.rows.items()
            }
        return self._on_device[device]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers is only imported by callers that use it; if it is not loaded, no Conv1D exists.
    if "transformers" not in sys.modules:
        return False
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_adaptable(module: nn.Module) -> bool:
    """True for the layer types bca-deploy can wrap: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def layer_type_of(module: nn.Module) -> str:
    """``"linear"`` or ``"conv1d"``; raises :class:`TargetModuleError` for anything else."""
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_conv1d(module):
        return "conv1d"
    raise TargetModuleError(
        f"{type(module).__name__} cannot be adapted: bca-deploy wraps torch.nn.Linear and "
        "transformers.pytorch_utils.Conv1D"
    )


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D (whose weight is stored (in, out))."""
    if layer_type_of(module) == "conv1d":
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return int(module.in_features), int(module.out_features)


def dense_delta(kernel: torch.Tensor, spec: ModuleSpec, weight: float = 1.0) -> torch.Tensor:
    """``weight · spec.scaling · ΔW`` of one module as a dense matrix in the base weight's storage layout.

    This is the one definition of a module's dense delta: ``materialize`` (an exact gather), one fp32
    multiply by the combined scale, then a transpose for ``Conv1D`` (whose weight is stored (in, out)).
    :meth:`BCALinear.delta_weight`, the in-memory and the streaming merge all use it.

    Args:
        kernel: (d_out/p, d_in/p, p), first-column layout, any float dtype (computed in fp32, or fp64
            if the kernel is fp64).
        spec: the module's :class:`ModuleSpec` (block size, scaling, dims, layer type).
        weight: extra factor (the adapter's weight in a weighted merge).

    Returns:
        (d_out, d_in) for ``linear``, (d_in, d_out) for ``conv1d``; fp32 (fp64 for fp64 kernels).
    """
    if tuple(kernel.shape) != spec.kernel_shape:
        raise AdapterMismatchError(f"kernel shape {tuple(kernel.shape)} does not match the spec's {spec.kernel_shape}")
    k = kernel.detach()
    if k.dtype != torch.float64:
        k = k.float()
    delta = materialize(k)  # (d_out, d_in)
    factor = float(weight) * float(spec.scaling)
    if factor != 1.0:
        delta = delta * factor
    return delta.T if spec.layer_type == "conv1d" else delta


def adapter_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name an adapter in a model, or None: it keys each layer's kernels (a PyTorch
    ``ParameterDict``, as PEFT keys its adapters), so it is a non-empty string without ``.``."""
    if not isinstance(name, str) or not name:
        return f"an adapter name must be a non-empty string, got {name!r}"
    if "." in name:
        return (f"adapter name {name[:80]!r} contains '.', which PyTorch parameter names cannot (PEFT's adapter "
                "names neither); use another, e.g. " + repr(name[:80].replace(".", "_")))
    return None


def require_adapter_name(name: object) -> None:
    """Raise :class:`AdapterNameError` saying why ``name`` cannot name an adapter (:func:`adapter_name_problem`)."""
    problem = adapter_name_problem(name)
    if problem is not None:
        raise AdapterNameError(problem)


class BCALinear(nn.Module):
    """A frozen base layer plus named block-circulant adapters.

    ``forward(x) = base(x) + Σ_{a active, not merged} scaling_a · ΔW_a x`` with
    ΔW_a = materialize(kernel_a), computed by :func:`bca_deploy.ops.block_circulant_matmul`.

    Args:
        base_layer: the ``nn.Linear`` or ``Conv1D`` to wrap (kept as ``self.base_layer``).
        name: the module's path in its model, used in error messages.
    """

    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        super().__init__()
        self.layer_type = layer_type_of(base_layer)
        self.base_layer = base_layer
        self.module_name = name
        self.in_features, self.out_features = layer_dims(base_layer)
        self.bca_kernels = nn.ParameterDict()
        self.block_sizes: dict[str, int] = {}
        self.scalings: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.adapters_disabled = False
        self.merged_adapters: list[str] = []
        # Exact copy of the base weight taken at the first merge, so unmerge restores it bit for bit.
        self._weight_before_merge: torch.Tensor | None = None
        # The base weight Parameter while this layer is untied for a merge: a weight shared with another
        # module (a tied lm_head / input embedding) gets its own merged copy, the shared one stays W. Held in
        # a tuple so nn.Module does not register it as this layer's parameter.
        self._tied_weight: tuple[nn.Parameter] | None = None
        # Per-row adapter choice of the current batch (None: every row gets the active adapters).
        self.row_adapters: RowAdapters | None = None

    # ---- adapters ---------------------------------------------------------------------------

    def spec(self, adapter_name: str) -> ModuleSpec:
        return ModuleSpec(
            block_size=self.block_sizes[adapter_name],
            scaling=self.scalings[adapter_name],
            in_features=self.in_features,
            out_features=self.out_features,
            layer_type=self.layer_type,
        )

    def check_block_size(self, block_size: int) -> None:
        """Raise :class:`BlockSizeError` naming this module if ``block_size`` does not fit it."""
        if block_size < 1 or self.in_features % block_size or self.out_features % block_size:
            raise BlockSizeError(block_size_message(self.module_name, self.in_features, self.out_features, block_size))

    def add_adapter(
        self,
        adapter_name: str,
        block_size: int,
        scaling: float = 1.0,
        init: str = "zeros",
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        """Create adapter ``adapter_name`` with fp32 kernels (d_out/p, d_in/p, p) on the base's device.

        ``init``: ``zeros`` (ΔW = 0, the default: the adapted model equals the base model),
        ``normal`` (std ``init_std``), ``xavier_uniform`` or ``kaiming_uniform`` (bounds from the
        base layer's fan-in/fan-out, as PEFT's C3A).
        """
        require_adapter_name(adapter_name)
        if adapter_name in self.bca_kernels:
            raise AdapterNameError(f"{self.module_name}: adapter {adapter_name!r} already exists")
        if init not in INITS:
            raise InvalidOptionError(f"init must be one of {', '.join(INITS)}; got {init!r}")
        self.check_block_size(block_size)
        p = block_size
        device = self.base_layer.weight.device
        kernel = torch.zeros(self.out_features // p, self.in_features // p, p, dtype=torch.float32)
        if init == "normal":
            kernel.normal_(0.0, init_std, generator=generator)
        elif init == "xavier_uniform":
            bound = math.sqrt(6.0 / (self.in_features + self.out_features))
            kernel.uniform_(-bound, bound, generator=generator)
        elif init == "kaiming_uniform":
            bound = math.sqrt(1.0 / self.in_features)
            kernel.uniform_(-bound, bound, generator=generator)
        self.bca_kernels[adapter_name] = nn.Parameter(kernel.to(device))
        self.block_sizes[adapter_name] = p
        self.scalings[adapter_name] = float(scaling)
        if adapter_name not in self.active_adapters:
            self.active_adapters.append(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise InvalidOptionError(f"{self.module_name}: adapter {adapter_name!r} is merged; unmerge it first")
        del self.bca_kernels[adapter_name]
        del self.block_sizes[adapter_name]
        del self.scalings[adapter_name]
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def set_active_adapters(self, names: Iterable[str]) -> None:
        names = list(names)
        unknown = [n for n in names if n not in self.bca_kernels]
        if unknown:
            raise AdapterNameError(
                f"{self.module_name}: unknown adapter(s) {unknown}; this layer has {sorted(self.bca_kernels)}"
            )
        self.active_adapters = names

    def scaled_kernel(self, adapter_name: str) -> torch.Tensor:
        """scaling · kernel, (d_out/p, d_in/p, p) fp32. Scaling a kernel scales ΔW by linearity."""
        kernel = self.bca_kernels[adapter_name]
        scaling = self.scalings[adapter_name]
        return kernel if scaling == 1.0 else kernel * scaling

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of one adapter as a dense fp32 matrix **in the base weight's storage layout**.

        Returns:
            (d_out, d_in) for ``Linear``; (d_in, d_out) for ``Conv1D``.
        """
        with torch.no_grad():
            return dense_delta(self.bca_kernels[adapter_name], self.spec(adapter_name))

    # ---- merge (in place; the model-level API is bca_deploy.merge) -----------------------------

    @property
    def untied(self) -> bool:
        """True while a merge has given this layer its own weight in place of one shared with another module."""
        return self._tied_weight is not None

    @torch.no_grad()
    def merge(self, adapter_names: Iterable[str] | None = None, keep_original: bool = True,
              untie: bool = False) -> None:
        """Add the ΔW of ``adapter_names`` (default: active adapters) into the base weight.

        The sum is formed in fp32 and rounded once to the base dtype. With ``keep_original`` the
        pre-merge weight is kept so :meth:`unmerge` restores it exactly.

        ``untie``: the base weight Parameter is shared with another module (a tied ``lm_head`` and input
        embedding; the model-level merge finds out by identity): the merged weight becomes a new Parameter
        of this layer and the shared one keeps W, so the other module computes what it did. :meth:`unmerge`
        puts the shared Parameter back (exact, whatever ``keep_original``).
        """
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n not in self.merged_adapters]
        if not names:
            return
        weight = self.base_layer.weight
        untie = untie and self._tied_weight is None
        if keep_original and not untie and self._weight_before_merge is None and not self.merged_adapters:
            self._weight_before_merge = weight.detach().clone()
        merged = weight.detach().float()
        for name in names:
            merged = merged + self.delta_weight(name).to(weight.device)
        if not torch.isfinite(merged).all():
            raise NonFiniteError(
                f"{self.module_name}: merging {names} gives non-finite weights (NaN/Inf in the kernels?); "
                "the base weight was left unchanged"
            )
        if untie:
            self.base_layer.weight = nn.Parameter(merged.to(weight.dtype), requires_grad=weight.requires_grad)
            self._tied_weight = (weight,)
        else:
            weight.data.copy_(merged.to(weight.dtype))
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Remove every merged ΔW: exact restore if the original was kept, else subtract in fp32."""
        if not self.merged_adapters:
            return
        if self._tied_weight is not None:  # untied by the merge: the shared Parameter still holds W
            self.base_layer.weight = self._tied_weight[0]
            self._tied_weight = None
            self._weight_before_merge = None
            self.merged_adapters = []
            return
        weight = self.base_layer.weight
        if self._weight_before_merge is not None:
            weight.data.copy_(self._weight_before_merge)
            self._weight_before_merge = None
        else:
            restored = weight.detach().float()
            for name in self.merged_adapters:
                restored = restored - self.delta_weight(name).to(weight.device)
            weight.data.copy_(restored.to(weight.dtype))
        self.merged_adapters = []

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_in) -> (..., d_out) in the base layer's output dtype."""
        result = self.base_layer(x)
        if self.row_adapters is not None:  # an explicit per-row choice overrides active/disabled state
            return self._forward_rows(x, result, self.row_adapters)
        if self.adapters_disabled:
            if self.merged_adapters:
                raise RuntimeError(
                    f"{self.module_name}: adapters are disabled but {self.merged_adapters} are merged into "
                    "the base weight; unmerge first"
                )
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            delta = block_circulant_matmul(x, self.scaled_kernel(name))  # (..., d_out), x's dtype
            result = result + delta.to(result.dtype)
        return result

    def _forward_rows(self, x: torch.Tensor, result: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """base(x) + ΔW_{a(b)} x_b for each row b: each adapter's rows are gathered, mixed, added back.

        x (B, ..., d_in), result = base(x) (B, ..., d_out). Rows of adapters this layer does not
        hold (and :data:`BASE_ADAPTER` rows) keep the base output: their adapter has no delta here.
        """
        held = [n for n in rows.rows if n in self.bca_kernels]  # none: every row keeps the base output, any shape
        if held and (x.dim() < 2 or x.shape[0] != rows.batch_size):
            if x.dim() >= 1 and x.shape[0] == 1 < rows.batch_size:  # one input for every row: nothing to route
                why = (f"an input of shape {tuple(x.shape)} that every row of the batch shares (such as DeBERTa-v2's "
                       "relative-position embeddings, which pos_key_proj / pos_query_proj project, and query_proj / "
                       "key_proj too with share_att_key), so it cannot apply a different adapter to each row. Run "
                       f"the rows of {', '.join(map(repr, held))} outside mixed_adapters, one adapter at a time "
                       "with set_adapter, or adapt other modules")
            else:
                why = (f"an input of shape {tuple(x.shape)} (its first dimension must be the batch); generation that "
                       "expands the batch (beam search, num_return_sequences > 1) cannot route rows")
            raise InvalidOptionError(
                f"{self.module_name}: a mixed-adapter batch names {rows.batch_size} rows but this layer got {why}"
            )
        if self.merged_adapters:
            raise RuntimeError(
                f"{self.module_name}: adapters {self.merged_adapters} are merged into the base weight, so every row "
                "would carry them; unmerge before running a mixed-adapter batch"
            )
        groups = rows.groups(x.device)
        for name, index in groups.items():
            if name not in self.bca_kernels:
                continue
            kernel = self.scaled_kernel(name)
            if len(groups) == 1:  # every row uses this adapter: no gather needed
                return result + block_circulant_matmul(x, kernel).to(result.dtype)
            delta = block_circulant_matmul(x.index_select(0, index), kernel)
            result = result.index_add(0, index, delta.to(result.dtype))
        return result

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(p={self.block_sizes[n]})" for n in self.bca_kernels)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}]"


def block_size_message(module_name: str, in_features: int, out_features: int, block_size: int) -> str:
    valid = valid_block_sizes(in_features, out_features)
    return (
        f"block size {block_size} does not divide module {module_name or '<module>'} "
        f"(in_features={in_features}, out_features={out_features}); "
        f"valid block sizes for it: {', '.join(map(str, valid))}"
    )
