"""Export a trained embedding model: TorchScript, ONNX, and its weights as safetensors.

TorchScript and ONNX files hold the eval-mode model ``images (N, C, H, W) float32 -> embeddings (N, D)``
(the checkpoint's eval transforms are not part of them: feed images resized, scaled to [0, 1] and
normalised as the index's ``preprocessing`` says). Each export is written to a temporary file, loaded
back, and compared with the PyTorch model on seeded random images of two batch sizes other than the
traced one; it is renamed into place only when the largest absolute difference is at most ``atol``,
otherwise :class:`ExportError` is raised and no file is left.

safetensors: the state dict in a ``.safetensors`` file plus a sidecar JSON (same name, ``.json``) with the
run config and model description; :func:`dmlgen.engine.run.load_trained_model` reads the pair. Neither
file can hold code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dmlgen
from dmlgen.errors import ConfigError, DmlgenError

__all__ = ["ExportError", "export_onnx", "export_torchscript", "save_weights_safetensors"]

DEFAULT_ATOL = 1e-4
_CHECK_BATCHES = (1, 3)  # verified batch sizes; the example traced / exported has 2 rows


class ExportError(DmlgenError):
    """An export that cannot be made or does not reproduce the PyTorch model."""


def _load(checkpoint: str | Path) -> tuple[Any, Any]:
    from dmlgen.engine.run import load_trained_model

    return load_trained_model(checkpoint, "cpu")


def _input_shape(cfg: Any, example_size: int | None) -> tuple[int, int, int]:
    """(C, H, W) of the model's input: ``example_size`` or the size the eval transforms produce."""
    from dmlgen.deploy.index import _preprocessing

    prep = _preprocessing(cfg)
    if example_size is None:
        example_size = prep["eval_transforms"]["image_size"]
    if isinstance(example_size, bool) or not isinstance(example_size, int) or example_size < 1:
        raise ConfigError(f"example_size: must be a positive integer, got {example_size!r}")
    return prep["channels"], example_size, example_size


def _random_images(shape: tuple[int, int, int], batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *shape), generator=gen)


def _temp_path(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    from dmlgen.deploy.index import permissions

    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    os.chmod(name, permissions())
    return Path(name)


def _verify(model: torch.nn.Module, run: Callable[[torch.Tensor], np.ndarray], shape: tuple[int, int, int],
            seed: int, atol: float, what: str) -> float:
    """Largest |exported - PyTorch| over seeded random batches; ExportError above ``atol``."""
    worst = 0.0
    for i, batch in enumerate(_CHECK_BATCHES):
        images = _random_images(shape, batch, seed + 1 + i)
        with torch.no_grad():
            expected = model(images).numpy()
        got = np.asarray(run(images))
        if got.shape != expected.shape:
            raise ExportError(f"{what}: output shape {got.shape} for a batch of {batch}, PyTorch gives {expected.shape}")
        diff = float(np.abs(got.astype(np.float64) - expected).max()) if got.size else 0.0
        if not np.isfinite(diff) or diff > atol:
            raise ExportError(f"{what}: differs from the PyTorch model by {diff:.3g} (> atol {atol:g}) on a "
                              f"batch of {batch} random images; not written")
        worst = max(worst, diff)
    return worst


def _report(fmt: str, out: Path, shape: tuple[int, int, int], diff: float, atol: float,
            identity: dict[str, Any]) -> dict[str, Any]:
    return {"format": fmt, "path": str(out), "input_shape": ["N", *shape], "output_shape": ["N",
            identity["embedding_size"]], "max_abs_diff": diff, "atol": atol, "model_hash": identity["hash"]}


def export_torchscript(checkpoint: str | Path, out_path: str | Path, example_size: int | None = None, *,
                       atol: float = DEFAULT_ATOL, seed: int = 0) -> dict[str, Any]:
    """Trace the eval-mode model of ``checkpoint`` with ``torch.jit.trace`` and save it to ``out_path``.

    ``example_size``: side of the square example images (default: the eval transforms' output size); the
    traced model accepts any batch size. Returns ``{"format", "path", "input_shape", "output_shape",
    "max_abs_diff", "atol", "model_hash"}``.
    """
    from dmlgen.deploy.index import model_identity

    out = Path(out_path)
    model, cfg = _load(checkpoint)
    shape = _input_shape(cfg, example_size)
    example = _random_images(shape, 2, seed)
    with warnings.catch_warnings():
        # torch 2.14 marks jit as deprecated, and the backbone's input-shape check becomes a constant in
        # the trace (a TracerWarning); the numerical check below is what guarantees the result.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
    tmp = _temp_path(out)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit.save / jit.load are deprecated in torch 2.14
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu")
        diff = _verify(model, lambda x: loaded(x).detach().numpy(), shape, seed, atol, f"TorchScript export {out}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return _report("torchscript", out, shape, diff, atol, model_identity(model))


def _onnx_runner(path: Path) -> tuple[str, Callable[[torch.Tensor], np.ndarray]]:
    """(name, run) of the best available ONNX evaluator: onnxruntime, else onnx's reference evaluator."""
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return "onnxruntime", lambda x: session.run(None, {"images": x.numpy()})[0]
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    return "onnx.reference", lambda x: evaluator.run(None, {"images": x.numpy()})[0]


def export_onnx(checkpoint: str | Path, out_path: str | Path, example_size: int | None = None, *,
                opset: int | None = None, atol: float = DEFAULT_ATOL, seed: int = 0) -> dict[str, Any]:
    """Export the eval-mode model of ``checkpoint`` to ONNX (input ``images`` (N, C, H, W), output
    ``embeddings`` (N, D), N dynamic) with torch's dynamo exporter, and check it with onnxruntime (or
    onnx's reference evaluator when onnxruntime is missing).

    ``opset``: ONNX opset (default: the exporter's). The model hash is stored in the file's metadata
    (``dmlgen.model_hash``). Returns the same fields as :func:`export_torchscript` plus ``checked_with``.
    """
    from dmlgen.deploy.index import model_identity

    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise ExportError("ONNX export needs the onnx and onnxscript packages: pip install 'dmlgen[export]'") from None
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 1):
        raise ConfigError(f"opset: must be a positive integer, got {opset!r}")
    out = Path(out_path)
    model, cfg = _load(checkpoint)
    identity = model_identity(model)
    shape = _input_shape(cfg, example_size)
    example = _random_images(shape, 2, seed)
    kwargs: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model, (example,), input_names=["images"], output_names=["embeddings"], dynamo=True,
                dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, verbose=False, **kwargs,
            )
        except Exception as exc:  # the exporter raises many types; the first line says what failed
            raise ExportError(f"ONNX export of {checkpoint} failed: {str(exc).strip().splitlines()[0]}") from None
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {"dmlgen.model_hash": identity["hash"],
                                        "dmlgen.version": dmlgen.__version__})
    tmp = _temp_path(out)
    try:
        with open(tmp, "wb") as handle:
            handle.write(proto.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())
        checker, run = _onnx_runner(tmp)
        diff = _verify(model, run, shape, seed, atol, f"ONNX export {out} (checked with {checker})")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {**_report("onnx", out, shape, diff, atol, identity), "checked_with": checker}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_weights_safetensors(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the model weights of ``checkpoint`` to ``out`` (``.safetensors``) and the sidecar JSON
    ``out.with_suffix(".json")`` (format, weights SHA-256, run config, model description, model hash).

    The pair loads with :func:`dmlgen.engine.run.load_trained_model` into the same model (same model hash);
    this is checked before returning. Returns ``{"format", "path", "sidecar", "model_hash", "num_tensors"}``.
    """
    from dmlgen.deploy.index import model_identity
    from dmlgen.engine.run import SAFETENSORS_SIDECAR_FORMAT, safetensors_sidecar

    try:
        from safetensors.torch import save as save_safetensors
    except ImportError:
        raise ExportError("safetensors export needs the safetensors package: pip install 'dmlgen[export]'") from None
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise ConfigError(f"safetensors output: the file name must end in .safetensors, got {out}")
    model, cfg = _load(checkpoint)
    identity = model_identity(model)
    # Clones: safetensors refuses tensors that share storage.
    state = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
    data = save_safetensors(state, metadata={"format": "dmlgen", "model_hash": identity["hash"]})
    sidecar = safetensors_sidecar(out)
    meta = {
        "format": SAFETENSORS_SIDECAR_FORMAT,
        "dmlgen_version": dmlgen.__version__,
        "weights_file": out.name,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "model_hash": identity["hash"],
        "model_description": identity["description"],
        "config": cfg.to_dict(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, data)
    _write_atomic(sidecar, (json.dumps(meta, indent=1) + "\n").encode())
    reloaded, _ = _load(out)
    if model_identity(reloaded)["hash"] != identity["hash"]:
        raise ExportError(f"safetensors export {out} does not load back into the same model")
    return {"format": "safetensors", "path": str(out), "sidecar": str(sidecar), "model_hash": identity["hash"],
            "num_tensors": len(state)}
