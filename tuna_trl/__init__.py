"""tuna-trl: the Tuna method (instruction tuning with ranking feedback, arXiv 2310.13385) on Hugging Face TRL."""

import importlib


__version__ = "0.1.0"

# Lazy imports keep `import tuna_trl` (and the CLI) fast: torch and transformers load only when used.
_LAZY = {
    "ranking_loss": "tuna_trl.loss",
    "ranking_normalizer": "tuna_trl.loss",
    "pairwise_hinge": "tuna_trl.loss",
    "TunaConfig": "tuna_trl.config",
    "RankedCollator": "tuna_trl.collator",
    "TunaRankTrainer": "tuna_trl.trainer",
    "tokenize_row": "tuna_trl.tokenization",
    "sequence_logps": "tuna_trl.logps",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tuna_trl' has no attribute {name!r}")


def __dir__():
    return __all__
