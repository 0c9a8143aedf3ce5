"""Object detectors behind one protocol (``base``), by kind (``detector.kind`` in a config):

``torchvision``
    torchvision models built from named presets (``models``), trained by ``training``,
    adapted by ``torchvision_detector``.
``predictions``
    your own model, trained anywhere: mgral reads its COCO results files, one per cycle
    (``predictions``).

Pool predictions are cached per cycle by ``cache``. Kinds are imported when first used, so
that naming one does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from mgral.registry import Registry

KINDS: Registry[str] = Registry("detector kind")
KINDS.add(
    "torchvision",
    "mgral.detectors.torchvision_detector:TorchvisionDetector",
    "torchvision models from a preset (the default)",
)
KINDS.add(
    "predictions",
    "mgral.detectors.predictions:PredictionsDetector",
    "your own model's COCO results files, one per cycle (README: Use your own model)",
)


def detector_class(kind: str) -> Any:
    """The class implementing detector kind ``kind``.

    Raises:
        ConfigError: an unknown kind, naming the valid ones.
    """
    module, name = KINDS.get(kind).split(":")
    return getattr(importlib.import_module(module), name)
