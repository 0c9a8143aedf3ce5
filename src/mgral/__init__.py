"""mgral: active learning for object detection.

Importing the package is cheap and silent: no logging set-up, no device probe, no heavy
imports. Public names are re-exported lazily from their modules.
"""

from mgral.errors import ConfigError, DatasetError, MgralError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DatasetError", "MgralError", "__version__"]
