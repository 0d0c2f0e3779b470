"""Entry points behind ``dmlgen train``, ``dmlgen embed`` and ``dmlgen evaluate --checkpoint``."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmlgen.engine.checkpoint import load_checkpoint
from dmlgen.engine.config import RunConfig, config_from_dict, load_config
from dmlgen.engine.config_schema import apply_overrides
from dmlgen.engine.distributed import requested_world_size
from dmlgen.engine.setup import build_run_model, build_splits, embed_dataset, resolve_device
from dmlgen.engine.trainer import Trainer, config_differences
from dmlgen.errors import CheckpointError, ConfigError, DataError
from dmlgen.models import EmbeddingModel
from dmlgen.reporting.html import write_reports

# The Omniglot baselines shipped in configs/omniglot/ (repository checkout or editable install).
BASELINES = ("triplet_semihard", "multi_similarity")
_CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"

# Model settings that change the architecture (weights, imagenet and freeze_bn only change training).
_ARCHITECTURE_KEYS = ("model.backbone", "model.embedding_size", "model.head_hidden", "model.normalize",
                      "data.channels")


def train(config: str | Path | RunConfig, overrides: Sequence[str] | None = None, *, out_dir: str | Path | None = None,
          resume: bool = False, overwrite: bool = False, progress: bool = True,
          resume_command: str | None = None, html_report: bool = True) -> dict[str, Any]:
    """Train from a YAML file (or a config object) and write the run folder.

    ``overrides`` are ``key=value`` strings (``--set``); ``out_dir`` replaces ``cfg.out_dir``. Returns the
    test result of the selected checkpoint (the content of ``test_metrics.json``); ``report.md`` and
    ``report.html`` are written next to it (``html_report=False``: report.md only, which saves the test
    embedding, neighbours and 2-D map of the HTML page; ``dmlgen report`` writes it later).
    A multi-stage method (``pipeline = True``, e.g. ``guided``) runs its stages with
    :func:`dmlgen.engine.pipeline.run_pipeline` instead.
    """
    if isinstance(config, RunConfig):
        cfg = config
        if overrides:
            cfg = config_from_dict(cfg.to_dict(), list(overrides))
    else:
        cfg = load_config(config, list(overrides or []))
    if out_dir is not None:
        cfg = copy.deepcopy(cfg)
        cfg.out_dir = str(out_dir)
    from dmlgen.engine.pipeline import is_pipeline, run_pipeline

    if is_pipeline(cfg):  # a multi-stage method (Guided DML, SLADE): its stages, each in a sub-folder
        if requested_world_size() > 1:  # its task stages would run, and write their files, in every process
            raise ConfigError(f"method.name {cfg.method.name!r} trains in several stages, which distributed "
                              "training does not support yet; train it in one process (without torchrun)")
        return run_pipeline(cfg, resume=resume, overwrite=overwrite, progress=progress,
                            resume_command=resume_command, html_report=html_report)
    trainer = Trainer(cfg, progress=progress, pretrained=not resume, resume_command=resume_command)
    result = trainer.fit(resume=resume, overwrite=overwrite)
    # report.md, then report.html (a failure of the latter is only a warning: the results are saved).
    if trainer.dist.is_main:  # distributed training: rank 0 alone writes files
        write_reports(cfg.out_dir, result, trainer.state.history, cfg.to_dict(), html=html_report,
                      device=cfg.train.device, progress=progress, strict=False)
    return result


def baseline_config(name: str) -> Path:
    """Path of a shipped Omniglot baseline config (``triplet_semihard`` or ``multi_similarity``)."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; choose {', '.join(BASELINES)}")
    for root in (_CONFIG_DIR, Path.cwd() / "configs"):
        path = root / "omniglot" / f"{name}.yaml"
        if path.is_file():
            return path
    raise ConfigError(f"configs/omniglot/{name}.yaml not found (run from the dmlgen repository checkout)")


def train_baseline(name: str, out_dir: str | Path, overrides: Sequence[str] = (), *, progress: bool = True,
                   overwrite: bool = True) -> dict[str, Any]:
    """Train one Omniglot baseline (for ``make demo``): ``baseline_config(name)`` with ``overrides``."""
    return train(baseline_config(name), overrides, out_dir=out_dir, progress=progress, overwrite=overwrite)


# --------------------------------------------------------------------------- trained models
SAFETENSORS_SIDECAR_FORMAT = "dmlgen-safetensors-1"


def safetensors_sidecar(path: str | Path) -> Path:
    """The JSON file next to ``weights.safetensors`` that holds its run config: ``weights.json``."""
    return Path(path).with_suffix(".json")


def _load_safetensors_checkpoint(path: Path) -> dict[str, Any]:
    """A ``.safetensors`` weights file plus its sidecar JSON (written by ``dmlgen export --format
    safetensors``) as a checkpoint dict with ``config``, ``model`` and ``model_description``. Neither file
    can hold code; the sidecar's SHA-256 of the weights ties the pair together."""
    sidecar = safetensors_sidecar(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint {path}: its sidecar {sidecar} (run config and model description) is "
                              "missing; dmlgen export --format safetensors writes both")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        data = path.read_bytes()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} or its sidecar {sidecar} cannot be read: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != SAFETENSORS_SIDECAR_FORMAT:
        raise CheckpointError(f"{sidecar} is not a dmlgen safetensors sidecar ({SAFETENSORS_SIDECAR_FORMAT})")
    if meta.get("weights_sha256") != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"checkpoint {path} does not match its sidecar {sidecar} (the weights' SHA-256 "
                              "differs): one of the two was replaced")
    try:
        from safetensors.torch import load as load_safetensors
    except ImportError:
        raise CheckpointError(f"checkpoint {path}: reading .safetensors needs the safetensors package: "
                              "pip install 'dmlgen[export]'") from None
    try:
        weights = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}".split("\n")[0]) from None
    missing = [k for k in ("config", "model_description") if not isinstance(meta.get(k), dict)]
    if missing:
        raise CheckpointError(f"sidecar {sidecar} lacks {', '.join(missing)}")
    return {"config": meta["config"], "model": weights, "model_description": meta["model_description"]}


def _load_run_checkpoint(path: str | Path) -> tuple[dict[str, Any], RunConfig]:
    if Path(path).suffix.lower() == ".safetensors":
        ckpt = _load_safetensors_checkpoint(Path(path))
    else:
        ckpt = load_checkpoint(path, map_location="cpu")
    missing = [k for k in ("config", "model", "model_description") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it was not written by dmlgen train")
    try:
        cfg = config_from_dict(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: its stored config is invalid: {exc}") from None
    return ckpt, cfg


def load_trained_model(path: str | Path, device: str = "cpu") -> tuple[EmbeddingModel, RunConfig]:
    """Rebuild the model stored in a checkpoint (``best.ckpt`` or ``last.ckpt``, or a ``.safetensors`` export
    with its sidecar JSON) and return it in eval mode with its run config.

    The architecture comes from the checkpoint's own config; no pretrained weights are read or downloaded
    (every weight comes from the checkpoint). Weights of another architecture are a CheckpointError naming
    the file.
    """
    ckpt, cfg = _load_run_checkpoint(path)
    try:
        model = build_run_model(cfg.model, cfg.method, cfg.data.channels, pretrained=False)
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot rebuild its model: {exc}") from None
    mine, theirs = model.describe(), ckpt["model_description"]
    if theirs != mine:
        diff = [f"{k} {theirs.get(k)!r} != {mine.get(k)!r}" for k in sorted(set(theirs) | set(mine))
                if theirs.get(k) != mine.get(k)]
        raise CheckpointError(
            f"checkpoint {path}: its weights are for another model than its config ({'; '.join(diff[:4])})"
        )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the model: {exc}".split("\n")[0]) from None
    return model.to(resolve_device(device)).eval(), cfg


def evaluation_config(checkpoint: str | Path, *, config: str | Path | None = None, dataset: str | None = None,
                      data_path: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config to embed or evaluate a checkpoint with.

    Default: the checkpoint's own config (same dataset, splits and eval transforms as in training).
    ``config``: another run config's data and eval settings (its model must be the checkpoint's). ``dataset``
    / ``data_path`` replace ``data.dataset`` / ``data.path``; ``overrides`` are ``key=value`` strings.
    """
    _, ckpt_cfg = _load_run_checkpoint(checkpoint)
    extra = list(overrides)
    if dataset is not None:
        extra.append(f"data.dataset={dataset}")
    if data_path is not None:
        extra.append(f"data.path={data_path}")
    if config is not None:
        cfg = load_config(config, extra)
        diffs = [d for d in config_differences(ckpt_cfg.to_dict(), cfg.to_dict()) if d[0] in _ARCHITECTURE_KEYS]
        if diffs:
            shown = "; ".join(f"{k} {a!r} in the checkpoint, {b!r} in the config" for k, a, b in diffs)
            raise CheckpointError(f"checkpoint {checkpoint} is from another model than config {config}: {shown}")
        return cfg
    data = ckpt_cfg.to_dict()
    try:
        return config_from_dict(apply_overrides(data, extra))
    except ConfigError as exc:
        raise ConfigError(f"--set: {exc}") from None


def embed_split(checkpoint: str | Path, split: str = "test", *, config: RunConfig | None = None,
                device: str = "cpu", batch_size: int | None = None,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Embed one split (``train``, ``val`` or ``test``) with a trained checkpoint.

    ``config`` gives the data settings (default: the checkpoint's own, see :func:`evaluation_config`).
    Returns embeddings ``(N, D)`` float32, labels ``(N,)`` int64 (``0..C-1`` within the split) and the
    original class id or name of every row ``(N,)``. The train split is embedded without augmentation.
    """
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got {split!r}")
    model, ckpt_cfg = load_trained_model(checkpoint, device)
    cfg = config if config is not None else ckpt_cfg
    data_cfg = copy.deepcopy(cfg.data)
    if split == "train":
        # Embeddings describe the images, not random augmentations of them.
        data_cfg.train_transforms = data_cfg.eval_transforms
    splits = build_splits(data_cfg)
    dataset = getattr(splits, split)
    if dataset is None:
        raise DataError(f"the {split} split is empty with this data config (data.val_alphabets / "
                        "data.val_class_fraction is 0)")
    emb, labels = embed_dataset(model, dataset, batch_size=batch_size or cfg.eval.batch_size,
                                device=resolve_device(device), num_workers=cfg.data.num_workers,
                                progress=progress, desc=f"embedding {split}")
    return emb, labels, np.asarray(dataset.classes)[labels.numpy()]


def save_embeddings(path: str | Path, embeddings: torch.Tensor, labels: torch.Tensor,
                    classes: np.ndarray | None = None) -> Path:
    """``.npz`` with ``embeddings`` (N, D) float32, ``labels`` (N,) int64 and optionally ``classes`` (N,),
    the original class id (int64) or name (str) of each row. No pickled objects."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {
        "embeddings": embeddings.numpy().astype(np.float32),
        "labels": labels.numpy().astype(np.int64),
    }
    if classes is not None:
        arr = np.asarray(classes)
        arrays["classes"] = arr.astype(np.int64) if arr.dtype.kind in "iu" else arr.astype(str)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:  # a file handle: np.savez would append .npz to other suffixes
            np.savez(handle, **arrays)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
