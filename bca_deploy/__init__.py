"""bca-deploy: block-circulant adapters from training to production.

Public API (stable):

- :func:`block_circulant_matmul` — the op, ``y = ΔW x`` through rfft/irfft, exact FFT backward.
- :func:`materialize` — the dense ``(d_out, d_in)`` ΔW of a kernel tensor, by index gather.
- :func:`inject` — add a BCA adapter to a model's Linear/Conv1D modules.
- :func:`save_adapter` / :func:`load_adapter` — adapter directories (bca-deploy or PEFT C3A).
- :func:`mixed_adapters` — run each row of a batch through its own adapter (multi-adapter serving).
- :func:`check_adapter` — the one check of an adapter against a target (model, checkpoint, bank graph).

Names are imported on first use (PEP 562), so ``import bca_deploy`` (and the CLI's ``--help``) does not
import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import keep_exports, lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "block_circulant_matmul": ".ops",
    "materialize": ".ops",
    "flip_circulant_layout": ".ops",
    "inject": ".inject",
    "adapter_configs": ".inject",
    "adapters_disabled": ".inject",
    "bca_layers": ".inject",
    "disable_adapters": ".inject",
    "enable_adapters": ".inject",
    "remove_adapters": ".inject",
    "mixed_adapters": ".inject",
    "set_adapter": ".inject",
    "trainable_parameters": ".inject",
    "save_adapter": ".adapter_io",
    "load_adapter": ".adapter_io",
    "read_adapter": ".adapter_io",
    "check_adapter": ".fit",
    "BCALinear": ".layers",
    "AdapterConfig": ".config",
    "ModuleSpec": ".config",
    "BCAError": ".errors",
    "BlockSizeError": ".errors",
    "TargetModuleError": ".errors",
    "AdapterFormatError": ".errors",
    "AdapterMismatchError": ".errors",
    "OutputExistsError": ".errors",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
keep_exports(__name__, _EXPORTS)  # bca_deploy.inject stays the function when the module is imported




if TYPE_CHECKING:  # for type checkers and IDEs; not executed
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
    from .fit import check_adapter
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
