"""Hard limits of the serving runtime that more than one module checks: one definition each.

Kept free of imports so that :mod:`bca_deploy.serving.options` (read by the CLI's ``--help``) and the
runtime (:mod:`bca_deploy.serving.decoding`) share them without the options importing the runtime.
"""

from __future__ import annotations

__all__ = ["MAX_NEW_TOKENS"]

#: The most new tokens one row may generate (:class:`~bca_deploy.serving.decoding.SamplingParams`); the
#: graph's positions limit it further, and ``--max-new-tokens`` may not be set above it.
MAX_NEW_TOKENS = 4096
