"""bca-deploy: block-circulant adapters from training to production.

Public API (stable):

- :func:`block_circulant_matmul` — the op, ``y = ΔW x`` through rfft/irfft, exact FFT backward.
- :func:`materialize` — the dense ``(d_out, d_in)`` ΔW of a kernel tensor, by index gather.
- :func:`inject` — add a BCA adapter to a model's Linear/Conv1D modules.
- :func:`save_adapter` / :func:`load_adapter` — adapter directories (bca-deploy or PEFT C3A).
- :func:`mixed_adapters` — run each row of a batch through its own adapter (multi-adapter serving).
"""

from .adapter_io import load_adapter, read_adapter, save_adapter
from .config import AdapterConfig, ModuleSpec
from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    BCAError,
    BlockSizeError,
    OutputExistsError,
    TargetModuleError,
)
from .inject import (
    adapter_configs,
    adapters_disabled,
    bca_layers,
    disable_adapters,
    enable_adapters,
    inject,
    mixed_adapters,
    remove_adapters,
    set_adapter,
    trainable_parameters,
)
from .layers import BCALinear
from .ops import block_circulant_matmul, flip_circulant_layout, materialize

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "block_circulant_matmul",
    "materialize",
    "flip_circulant_layout",
    "inject",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "BCALinear",
    "AdapterConfig",
    "ModuleSpec",
    "adapter_configs",
    "adapters_disabled",
    "bca_layers",
    "disable_adapters",
    "enable_adapters",
    "remove_adapters",
    "mixed_adapters",
    "set_adapter",
    "trainable_parameters",
    "BCAError",
    "BlockSizeError",
    "TargetModuleError",
    "AdapterFormatError",
    "AdapterMismatchError",
    "OutputExistsError",
]
