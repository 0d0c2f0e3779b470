"""TransformConfig validation and the train/eval pipelines on PIL images and tensors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from dmlgen.data.datasets import ArrayImageDataset
from dmlgen.data.transforms import TransformConfig, build_transforms, transform_config_from_dict
from dmlgen.errors import ConfigError


def _pil(width: int = 60, height: int = 40, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": 2.5}, "image_size"),
        ({"resize_to": -1}, "resize_to"),
        ({"horizontal_flip": "yes"}, "horizontal_flip"),
        ({"rotation_degrees": -5}, "rotation_degrees"),
        ({"rotation_degrees": float("nan")}, "rotation_degrees"),
        ({"translate": 1.0}, "translate"),
        ({"color_jitter": 2}, "color_jitter"),
        ({"image_size": 8, "random_resized_crop_scale": (0.5, 0.1)}, "random_resized_crop_scale"),
        ({"image_size": 8, "random_resized_crop_scale": (0.5,)}, "random_resized_crop_scale"),
        ({"random_resized_crop_scale": (0.5, 1.0)}, "image_size"),
        ({"normalize_mean": (0.5,)}, "normalize_mean / normalize_std"),
        ({"normalize_mean": (0.5, 0.5), "normalize_std": (1.0, 1.0)}, "normalize_mean"),
        ({"normalize_mean": (0.5,), "normalize_std": (0.0,)}, "normalize_std"),
        ({"normalize_mean": (0.5,), "normalize_std": (0.2, 0.2, 0.2)}, "normalize_std"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"transforms.{field}"):
        TransformConfig(**kwargs)


def test_from_dict_rejects_unknown_keys_and_converts_lists() -> None:
    with pytest.raises(ConfigError, match="unknown config key data.train_transforms.flip; accepted keys"):
        transform_config_from_dict({"flip": True}, prefix="data.train_transforms")
    with pytest.raises(ConfigError, match="data.eval_transforms.image_size"):
        transform_config_from_dict({"image_size": -3}, prefix="data.eval_transforms")
    cfg = transform_config_from_dict({"image_size": 8, "random_resized_crop_scale": [0.2, 1], "rotation_degrees": 10})
    assert cfg.random_resized_crop_scale == (0.2, 1) and cfg.rotation_degrees == 10
    assert transform_config_from_dict(None) == TransformConfig()
    assert dataclasses.asdict(TransformConfig())["image_size"] is None


def test_mlrc_preset_shapes_on_pil_images() -> None:
    cfg = TransformConfig(image_size=227, resize_to=256, random_resized_crop_scale=(0.16, 1.0), horizontal_flip=True,
                          normalize_mean=(0.485, 0.456, 0.406), normalize_std=(0.229, 0.224, 0.225))
    image = _pil(400, 300)
    for train in (True, False):
        out = build_transforms(cfg, train=train)(image)
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 227, 227)
    eval_tf = build_transforms(cfg, train=False)
    assert torch.equal(eval_tf(image), eval_tf(image)), "eval is deterministic"


def test_train_pipeline_is_random_but_reproducible_under_a_seed() -> None:
    cfg = TransformConfig(image_size=24, random_resized_crop_scale=(0.3, 1.0), horizontal_flip=True,
                          rotation_degrees=15, translate=0.1, color_jitter=0.3)
    tf = build_transforms(cfg, train=True)
    image = _pil(32, 32)
    torch.manual_seed(0)
    a = tf(image)
    torch.manual_seed(0)
    assert torch.equal(a, tf(image))
    assert not torch.equal(a, tf(image))


def test_tensor_input_from_array_dataset_and_greyscale_pil() -> None:
    cfg = TransformConfig(image_size=20, random_resized_crop_scale=(0.5, 1.0), color_jitter=0.2,
                          normalize_mean=(0.5,), normalize_std=(0.5,))
    images = np.random.default_rng(1).random((3, 28, 28), dtype=np.float32)
    ds = ArrayImageDataset(images, [0, 1, 2], transform=build_transforms(cfg, train=True))
    x, _, _ = ds[0]
    assert x.shape == (1, 20, 20) and x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0
    eval_ds = ArrayImageDataset(images, [0, 1, 2], transform=build_transforms(TransformConfig(image_size=28), False))
    assert torch.allclose(eval_ds[1][0][0], torch.from_numpy(images[1])), "same-size eval leaves pixels alone"
    grey = build_transforms(cfg, train=True)(_pil(mode="L"))
    assert grey.shape == (1, 20, 20)
    uint8 = build_transforms(None, train=False)(torch.full((3, 4, 4), 255, dtype=torch.uint8))
    assert uint8.dtype == torch.float32 and torch.allclose(uint8, torch.ones(3, 4, 4))


def test_default_config_only_converts() -> None:
    image = _pil(10, 6)
    out = build_transforms(TransformConfig(), train=True)(image)
    assert out.shape == (3, 6, 10)
    assert torch.allclose(out, torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    with pytest.raises(ConfigError, match="TransformConfig"):
        build_transforms({"image_size": 3}, train=True)  # type: ignore[arg-type]
