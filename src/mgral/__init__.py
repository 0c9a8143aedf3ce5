"""mgral: active learning for object detection.

Importing the package is cheap and silent: no logging set-up, no device probe, no heavy
imports. Public names are re-exported lazily from their modules.
"""

from mgral.errors import ConfigError, DatasetError, MgralError

__version__ = "0.1.0"

# Public name -> the module it lives in, imported on first use (PEP 562) so that
# ``import mgral`` stays cheap: what a user with their own training loop needs.
_LAZY = {
    "read_dataset": "mgral.data.formats",
    "write_dataset": "mgral.data.formats",
    "Dataset": "mgral.data.records",
    "Detections": "mgral.data.records",
    "read_id_list": "mgral.data.records",
    "read_predictions": "mgral.evaluation",
    "write_predictions": "mgral.evaluation",
    "evaluate": "mgral.evaluation",
    "build_strategy": "mgral.strategies",
    "Selection": "mgral.strategies",
    "read_embeddings": "mgral.selection",
    "select_batch": "mgral.selection",
    "write_id_list": "mgral.selection",
}

__all__ = ["ConfigError", "DatasetError", "MgralError", "__version__", *_LAZY]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mgral' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
