"""Image pipelines (torchvision.transforms.v2) built from a small validated :class:`TransformConfig`.

The pipelines accept a PIL image (FileImageDataset) or a tensor ``(C, H, W)``, uint8 or float in
[0, 1] (ArrayImageDataset), and return a plain float32 tensor ``(C, H, W)``.

Train: ``[Resize(resize_to)] -> RandomResizedCrop(image_size, scale) | Resize+CenterCrop(image_size)
-> [flip] -> [RandomAffine(rotation, translate)] -> [ColorJitter] -> float -> [Normalize]``.
Eval:  ``[Resize(resize_to or image_size) -> CenterCrop(image_size)] -> float -> [Normalize]``.
The MLRC preset (methods.md §1.3) is ``resize_to=256, image_size=227,
random_resized_crop_scale=(0.16, 1.0), horizontal_flip=True``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2

from dmlgen.errors import ConfigError

__all__ = ["TransformConfig", "build_transforms", "transform_config_from_dict"]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TransformConfig:
    """Augmentation and resizing settings; every field is checked on construction.

    Attributes:
        image_size: output side in pixels (None: keep the input size; then no crop may be asked for).
        resize_to: shorter side to resize to before cropping (eval: Resize then CenterCrop image_size).
        random_resized_crop_scale: ``(min, max)`` area fraction of RandomResizedCrop (train only).
        horizontal_flip: random left-right flip with probability 0.5 (train only).
        rotation_degrees: random rotation in ``[-d, d]`` (train only).
        translate: random shift as a fraction of the image side, in [0, 1) (train only).
        color_jitter: brightness / contrast / saturation jitter strength in [0, 1] (train only).
        normalize_mean, normalize_std: per-channel Normalize after scaling to [0, 1]; both or neither,
            1 or 3 values (match the images' channels).
    """

    image_size: int | None = None
    resize_to: int | None = None
    random_resized_crop_scale: tuple[float, float] | None = None
    horizontal_flip: bool = False
    rotation_degrees: float = 0.0
    translate: float = 0.0
    color_jitter: float = 0.0
    normalize_mean: tuple[float, ...] | None = None
    normalize_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # YAML gives lists; keep tuples so configs compare and hash alike.
        for name in ("random_resized_crop_scale", "normalize_mean", "normalize_std"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        for name in ("image_size", "resize_to"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"transforms.{name}: must be a positive integer or null, got {value!r}")
        if not isinstance(self.horizontal_flip, bool):
            raise ConfigError(f"transforms.horizontal_flip: must be true or false, got {self.horizontal_flip!r}")
        if not _number(self.rotation_degrees) or not 0 <= self.rotation_degrees <= 180:
            raise ConfigError(
                f"transforms.rotation_degrees: must be a number in [0, 180], got {self.rotation_degrees!r}"
            )
        if not _number(self.translate) or not 0 <= self.translate < 1:
            raise ConfigError(f"transforms.translate: must be a number in [0, 1), got {self.translate!r}")
        if not _number(self.color_jitter) or not 0 <= self.color_jitter <= 1:
            raise ConfigError(f"transforms.color_jitter: must be a number in [0, 1], got {self.color_jitter!r}")
        scale = self.random_resized_crop_scale
        if scale is not None:
            if (
                not isinstance(scale, tuple)
                or len(scale) != 2
                or not all(_number(v) for v in scale)
                or not 0 < scale[0] <= scale[1] <= 1
            ):
                raise ConfigError(
                    f"transforms.random_resized_crop_scale: must be [min, max] with 0 < min <= max <= 1, got {scale!r}"
                )
            if self.image_size is None:
                raise ConfigError("transforms.image_size: required when random_resized_crop_scale is set")
        mean, std = self.normalize_mean, self.normalize_std
        if (mean is None) != (std is None):
            raise ConfigError("transforms.normalize_mean / normalize_std: give both or neither")
        if mean is not None and std is not None:
            for name, values in (("normalize_mean", mean), ("normalize_std", std)):
                if not isinstance(values, tuple) or len(values) not in (1, 3) or not all(_number(v) for v in values):
                    raise ConfigError(f"transforms.{name}: must be 1 or 3 numbers, got {values!r}")
            if len(mean) != len(std):
                raise ConfigError(
                    f"transforms.normalize_std: has {len(std)} values but normalize_mean has {len(mean)}"
                )
            if any(v <= 0 for v in std):
                raise ConfigError(f"transforms.normalize_std: values must be > 0, got {std!r}")


def transform_config_from_dict(data: dict[str, Any] | None, prefix: str = "transforms") -> TransformConfig:
    """A :class:`TransformConfig` from plain data; unknown keys are a ConfigError naming them."""
    if data is None:
        return TransformConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(TransformConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}.{unknown[0]}; accepted keys: {', '.join(sorted(fields))}")
    try:
        return TransformConfig(**data)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("transforms.", f"{prefix}.", 1)) from None


def build_transforms(cfg: TransformConfig | None, train: bool) -> v2.Compose:
    """The train (augmenting) or eval (deterministic) pipeline of ``cfg``; None gives float conversion only.

    Input: PIL image or tensor ``(C, H, W)``; output: plain float32 tensor ``(C, H, W)``.
    """
    if cfg is None:
        cfg = TransformConfig()
    if not isinstance(cfg, TransformConfig):
        raise ConfigError(f"build_transforms: expected a TransformConfig, got {type(cfg).__name__}")
    cfg.validate()
    steps: list[Any] = [v2.ToImage()]
    if train:
        if cfg.resize_to is not None:
            steps.append(v2.Resize(cfg.resize_to, antialias=True))
        if cfg.random_resized_crop_scale is not None:
            assert cfg.image_size is not None  # validate()
            steps.append(v2.RandomResizedCrop(cfg.image_size, scale=cfg.random_resized_crop_scale, antialias=True))
        elif cfg.image_size is not None:
            steps += [v2.Resize(cfg.image_size, antialias=True), v2.CenterCrop(cfg.image_size)]
        if cfg.horizontal_flip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        if cfg.rotation_degrees > 0 or cfg.translate > 0:
            translate = (cfg.translate, cfg.translate) if cfg.translate > 0 else None
            steps.append(v2.RandomAffine(degrees=cfg.rotation_degrees, translate=translate))
        if cfg.color_jitter > 0:
            j = cfg.color_jitter
            steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    elif cfg.image_size is not None or cfg.resize_to is not None:
        steps.append(v2.Resize(cfg.resize_to or cfg.image_size, antialias=True))
        if cfg.image_size is not None:
            steps.append(v2.CenterCrop(cfg.image_size))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if cfg.normalize_mean is not None and cfg.normalize_std is not None:
        steps.append(v2.Normalize(mean=list(cfg.normalize_mean), std=list(cfg.normalize_std)))
    # Plain tensors collate and print like any other; tv_tensors.Image would leak into user code.
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)
