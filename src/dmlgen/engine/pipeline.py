"""Multi-stage runs: the engine side of :mod:`dmlgen.methods.stages` (Guided DML, SLADE, ...).

A method declares itself a pipeline with ``pipeline = True`` and ``stages(config) -> list[Stage]``
(see :mod:`dmlgen.methods.stages` for the :class:`~dmlgen.methods.stages.Stage` and
:class:`~dmlgen.methods.stages.StageContext` contract). :func:`dmlgen.engine.run.train` hands such a config to
:func:`run_pipeline`, so ``dmlgen train CONFIG`` (with ``--resume``, ``--overwrite``, ``--out``, ``--set``)
works as for a single run. Other code can call :func:`run_stages` with any list of stages.

Run folder layout::

    <out_dir>/config.yaml          the pipeline's run config
    <out_dir>/pipeline.json        stage list, status, seconds and output of each stage
    <out_dir>/<stage>/stage.json   the stage's record: status, config hash, input hashes, output + SHA-256
    <out_dir>/<stage>/...          a train stage: a run folder (best.ckpt, last.ckpt, report.md; the last stage
                                   also report.html, ...);
                                   a task stage: whatever it saves (its output file, its last.ckpt)
    <out_dir>/test_metrics.json    the last (train) stage's test result, plus ``pipeline`` (stages, seconds)
    <out_dir>/report.md            stage table and test metrics; the full report is <last stage>/report.html
    <out_dir>/best.ckpt            the deployed model: a hard link (or copy) of <last stage>/best.ckpt

Semantics (make-like):

- A stage is *up to date* when its ``stage.json`` says complete, the SHA-256 of its ``config`` is unchanged,
  and each input stage is up to date and has the output hash recorded when this stage ran. Up-to-date stages
  are skipped. An input's output file must exist only when a dependent has to run (then a missing or
  modified file makes the input run again), so a derived artefact stays usable after its producer is gone.
- A stage that was interrupted (``stage.json`` says running, same config and inputs) is resumed: a train
  stage from its ``last.ckpt`` (exactly, by the Trainer), a task stage by its own code (``ctx.resumed``,
  ``ctx.load("last.ckpt")``). A stage whose config or inputs changed is cleared and run from scratch (a
  notice is printed), and so, through the output hash, is everything that depends on it.
- A fresh start (no ``resume``) refuses a folder that already holds a run, unless ``overwrite``, which removes
  the pipeline's files and stage folders first. Ctrl-C is deferred to a safe point of the stage in progress,
  which saves its state; the message names the command that continues.
- The last stage must be a train stage; its test result is the pipeline's result. Each stage's wall time
  (summed over interrupted parts) is in ``pipeline.json`` and ``test_metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from dmlgen.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save, load_checkpoint
from dmlgen.engine.config import RunConfig, config_from_dict
from dmlgen.engine.logging import RunLogger
from dmlgen.engine.setup import DataSplits, build_method_from_config, build_splits, resolve_device
from dmlgen.errors import CheckpointError, ConfigError
from dmlgen.methods.stages import Stage, check_stages

PIPELINE_FILE = "pipeline.json"
STAGE_FILE = "stage.json"
#: Top-level files a pipeline run writes; ``overwrite`` removes exactly these and the stage folders.
PIPELINE_FILES = (PIPELINE_FILE, "config.yaml", "test_metrics.json", "report.md", "best.ckpt")


# --------------------------------------------------------------------------- helpers
def is_pipeline(cfg: RunConfig) -> bool:
    """Whether ``cfg.method`` is a multi-stage method (its class sets ``pipeline = True``)."""
    from dmlgen.methods import METHODS

    entry = METHODS.get(cfg.method.name)
    return bool(entry is not None and getattr(entry[0], "pipeline", False))


def pipeline_stages(cfg: RunConfig) -> list[Stage]:
    """The stages the configured method declares for ``cfg`` (validated: unique names, earlier inputs)."""
    method = build_method_from_config(cfg.method)
    stages = list(method.stages(cfg))  # type: ignore[attr-defined]
    check_stages(stages)
    return stages


def config_sha256(data: Any) -> str:
    """SHA-256 of plain data (key order does not matter; tuples hash like lists)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    """Atomic: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); remove the stage folder or use --overwrite") from None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- the stage context
class _Context:
    """:class:`dmlgen.methods.stages.StageContext` for one stage."""

    def __init__(self, runner: _Runner, stage: Stage, resumed: bool) -> None:
        self._runner = runner
        self._stage = stage
        self.name = stage.name
        self.folder = runner.out_dir / stage.name
        self.config = runner.cfg
        self.device = runner.device
        self.progress = runner.progress
        self.resumed = resumed
        self._logger: RunLogger | None = None

    @property
    def splits(self) -> DataSplits:
        return self._runner.splits

    def _check_input(self, stage: str) -> None:
        if stage not in self._stage.inputs:
            raise ConfigError(f"stage {self.name!r} reads stage {stage!r}, which is not among its inputs "
                              f"({', '.join(self._stage.inputs) or 'none'})")

    def input_path(self, stage: str) -> Path:
        self._check_input(stage)
        return self._runner.output_path(stage)

    def input_sha256(self, stage: str) -> str:
        self._check_input(stage)
        return str(self._runner.record(stage)["output_sha256"])  # type: ignore[index]

    def save(self, obj: dict[str, Any], name: str) -> Path:
        path = self.folder / name
        try:
            atomic_save({"format": CHECKPOINT_FORMAT, **obj}, path)
        except OSError as exc:
            raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}; the previous file (if any) is "
                                  "intact") from None
        return path

    def load(self, name: str) -> dict[str, Any] | None:
        path = self.folder / name
        return load_checkpoint(path) if path.is_file() else None

    def load_file(self, path: Path) -> dict[str, Any]:
        return load_checkpoint(path)

    def load_model(self, path: Path) -> Any:
        from dmlgen.engine.run import load_trained_model

        model, _ = load_trained_model(path, device=str(self.device))
        return model

    def embed(self, model: Any, dataset: Any, desc: str = "embedding") -> tuple[Any, Any]:
        from dmlgen.engine.setup import embed_dataset

        return embed_dataset(model, dataset, batch_size=self.config.eval.batch_size, device=self.device,
                             num_workers=self.config.data.num_workers, progress=self.progress, desc=desc,
                             should_stop=self.interrupted)

    def log(self, event: str, **fields: Any) -> None:
        if self._logger is None:
            self._logger = RunLogger(self.folder, tensorboard=False)
        self._logger.event(event, stage=self.name, **fields)

    def interrupted(self) -> bool:
        return self._runner.guard.requested

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()
            self._logger = None


# --------------------------------------------------------------------------- the runner
class _Runner:
    def __init__(self, cfg: RunConfig, stages: list[Stage], *, progress: bool, resume_command: str,
                 html_report: bool = True, validation_as_test: bool = False) -> None:
        from dmlgen.engine.trainer import _DeferredInterrupt

        self.cfg = cfg
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.out_dir = Path(cfg.out_dir)
        self.progress = progress
        self.resume_command = resume_command
        self.html_report = html_report
        self.validation_as_test = validation_as_test
        self.device = resolve_device(cfg.train.device)
        self.guard = _DeferredInterrupt(verbose=progress)
        self.ran: list[str] = []
        self._splits: DataSplits | None = None
        self._hashes: dict[Path, tuple[float, int, str]] = {}

    # ----------------------------------------------------------------- records
    @property
    def splits(self) -> DataSplits:
        if self._splits is None:
            self._splits = build_splits(self.cfg.data)
        return self._splits

    def record(self, name: str) -> dict[str, Any] | None:
        return _read_json(self.out_dir / name / STAGE_FILE)

    def _output_file(self, name: str) -> Path | None:
        rec = self.record(name)
        if not rec or rec.get("status") != "complete":
            return None
        return self.out_dir / name / str(rec["output"])

    def _sha(self, path: Path) -> str:
        stat = path.stat()
        cached = self._hashes.get(path)
        if cached is not None and cached[:2] == (stat.st_mtime, stat.st_size):
            return cached[2]
        digest = file_sha256(path)
        self._hashes[path] = (stat.st_mtime, stat.st_size, digest)
        return digest

    def fresh(self, name: str) -> str | None:
        """Why stage ``name`` must run (None when it is up to date; its output file may be absent)."""
        stage, rec = self.stages[name], self.record(name)
        if rec is None:
            return "not run yet"
        if rec.get("status") != "complete":
            return "interrupted"
        if rec.get("config_sha256") != config_sha256(stage.config):
            return "its configuration changed"
        for inp in stage.inputs:
            if self.fresh(inp) is not None:
                return f"its input {inp!r} must run again"
            if rec.get("inputs", {}).get(inp) != self.record(inp)["output_sha256"]:  # type: ignore[index]
                return f"its input {inp!r} changed"
        return None

    def available(self, name: str) -> str | None:
        """Why stage ``name``'s output cannot be used now (None: up to date and its file intact)."""
        why = self.fresh(name)
        if why is not None:
            return why
        path = self._output_file(name)
        if path is None or not path.is_file():
            return f"its output {path} is missing"
        if self._sha(path) != self.record(name)["output_sha256"]:  # type: ignore[index]
            return f"its output {path} was modified"
        return None

    def output_path(self, name: str) -> Path:
        path = self._output_file(name)
        if path is None or self.available(name) is not None:
            raise CheckpointError(f"the output of stage {name!r} is not available ({self.available(name)})")
        return path

    # ----------------------------------------------------------------- running
    def ensure(self, name: str) -> None:
        """Make stage ``name``'s output available, running it (and what it needs) when it is not."""
        why = self.available(name)
        if why is None:
            return
        self.execute(name, why)

    def execute(self, name: str, why: str) -> None:
        stage = self.stages[name]
        for inp in stage.inputs:
            self.ensure(inp)
        folder = self.out_dir / name
        rec = self.record(name)
        chash = config_sha256(stage.config)
        inputs = {inp: self.record(inp)["output_sha256"] for inp in stage.inputs}  # type: ignore[index]
        resumable = (rec is not None and rec.get("status") == "running" and rec.get("config_sha256") == chash
                     and rec.get("inputs") == inputs)
        if not resumable and folder.exists():
            if rec is not None and self.progress:
                print(f"stage {name}: {why}; running it again from scratch", flush=True)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        seconds = float(rec.get("seconds", 0.0)) if resumable and rec else 0.0
        running = {"name": name, "kind": stage.kind, "status": "running", "config_sha256": chash,
                   "inputs": inputs, "seconds": seconds, "description": stage.description}
        _write_json(folder / STAGE_FILE, running)
        if self.progress:
            print(f"stage {name} ({stage.kind}{', resumed' if resumable else ''}): {stage.description or why}",
                  flush=True)
        ctx = _Context(self, stage, resumed=resumable)
        start = time.perf_counter()
        result: dict[str, Any] | None = None
        try:
            if stage.kind == "task":
                assert stage.run is not None
                output = Path(stage.run(ctx))
            else:
                result = self._train(stage, ctx, resume=resumable)
                output = folder / "best.ckpt"
        except BaseException:
            running["seconds"] = seconds + time.perf_counter() - start
            _write_json(folder / STAGE_FILE, running)
            raise
        finally:
            ctx.close()
        output = output.resolve()
        if not output.is_file() or folder.resolve() not in output.parents:
            raise ConfigError(f"stage {name!r} returned {output}, which is not a file inside {folder}")
        done = {**running, "status": "complete", "seconds": seconds + time.perf_counter() - start,
                "output": str(output.relative_to(folder.resolve())), "output_sha256": self._sha(output),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if result is not None:
            done["result"] = result
        _write_json(folder / STAGE_FILE, done)
        self.ran.append(name)
        if self.progress:
            print(f"stage {name}: done in {done['seconds']:.1f} s", flush=True)

    def _train(self, stage: Stage, ctx: _Context, *, resume: bool) -> dict[str, Any]:
        """An engine training run of the stage's run config in its folder (resumed from its last.ckpt)."""
        from dmlgen.engine.trainer import LAST, Trainer
        from dmlgen.reporting.html import write_reports

        assert stage.run_config is not None
        raw = stage.run_config(ctx)
        raw = {**raw, "out_dir": str(ctx.folder)}
        try:
            cfg = config_from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"stage {stage.name!r}: {exc}") from None
        resume = resume and (ctx.folder / LAST).is_file()
        # The stage trains on the pipeline's data: reuse the splits already loaded (same data config only).
        splits = self.splits if cfg.data == self.cfg.data else build_splits(cfg.data)
        if self.validation_as_test:  # a cross-validation fold: "test" scores the validation classes
            splits = splits.validation_as_test(f"stage {stage.name!r} (validation_as_test)")
        trainer = Trainer(cfg, progress=self.progress, splits=splits, pretrained=not resume,
                          resume_command=self.resume_command)
        result = trainer.fit(resume=resume)
        # The HTML page (test embedding, neighbours, 2-D map) only for the deployed model: the last stage.
        html = self.html_report and stage.name == self.order[-1]
        write_reports(cfg.out_dir, result, trainer.state.history, cfg.to_dict(), html=html,
                      device=cfg.train.device, progress=self.progress, strict=False)
        return result

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.order:
            rec = self.record(name) or {}
            rows.append({"name": name, "kind": self.stages[name].kind, "status": rec.get("status", "pending"),
                         "seconds": rec.get("seconds"), "output": rec.get("output"),
                         "output_sha256": rec.get("output_sha256"), "ran_now": name in self.ran,
                         "description": self.stages[name].description})
        return rows


# --------------------------------------------------------------------------- entry points
def _clear(out_dir: Path, names: list[str]) -> None:
    from dmlgen.engine.trainer import RUN_FILES

    old = _read_json(out_dir / PIPELINE_FILE) or {}
    recorded = [s.get("name") for s in old.get("stages", []) if isinstance(s, dict)]
    # Declared stage folders, and folders of stages an older version of the pipeline recorded.
    old_stages = [n for n in recorded if isinstance(n, str) and n and (out_dir / n / STAGE_FILE).is_file()]
    for name in {*names, *old_stages}:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in (*PIPELINE_FILES, *RUN_FILES):
        (out_dir / name).unlink(missing_ok=True)


def _link_best(source: Path, target: Path) -> None:
    """``target`` becomes a hard link to ``source`` (a copy where links are not possible), atomically."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def _write_report(out_dir: Path, cfg: RunConfig, rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
    last = rows[-1]["name"]
    lines = [f"# {cfg.name} (method {cfg.method.name}, {len(rows)} stages)", "",
             "| stage | kind | status | seconds | output |", "|---|---|---|---:|---|"]
    for r in rows:
        secs = f"{r['seconds']:.1f}" if isinstance(r["seconds"], (int, float)) else "-"
        lines.append(f"| {r['name']} | {r['kind']} | {r['status']} | {secs} | {r['name']}/{r['output']} |")
    lines += ["", f"Test ({result.get('selection', '')}, epoch {result.get('selected_epoch')} of stage {last}):", "",
              "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result.get("test", {}).items() if isinstance(v, (int, float))]
    lines += ["", f"Full report of the deployed model: [{last}/report.html]({last}/report.html) "
              f"([{last}/report.md]({last}/report.md)).", ""]
    (out_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")


def run_stages(cfg: RunConfig, stages: list[Stage], *, resume: bool = False, overwrite: bool = False,
               progress: bool = True, resume_command: str | None = None, html_report: bool = True,
               validation_as_test: bool = False) -> dict[str, Any]:
    """Run ``stages`` for ``cfg`` into ``cfg.out_dir`` (see the module docstring); returns the last stage's test
    result (the content of the top-level ``test_metrics.json``) with ``pipeline`` added: one entry per stage
    with ``seconds`` (wall time, summed over interrupted parts), ``status``, ``output`` and ``ran_now``.

    Train stages write report.md; the last one also report.html (``html_report=False``: not even that one).
    ``validation_as_test``: train stages test on the validation classes instead of the test split (a search's
    cross-validation fold, which must never touch the test classes); the stage's checkpoint selection still
    uses the validation score."""
    from dmlgen.engine.trainer import LAST, TrainingInterrupted

    check_stages(stages)
    if stages[-1].kind != "train":
        raise ConfigError(f"the last stage ({stages[-1].name!r}) must be a train stage: its test result is the "
                          "pipeline's")
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other")
    out_dir = Path(cfg.out_dir)
    command = resume_command or f"dmlgen train CONFIG --out {out_dir} --resume"
    names = [s.name for s in stages]
    holds_run = (out_dir / PIPELINE_FILE).is_file() or (out_dir / LAST).is_file()
    if resume and not (out_dir / PIPELINE_FILE).is_file():
        raise CheckpointError(f"nothing to resume: {out_dir / PIPELINE_FILE} does not exist; start the run without "
                              "--resume")
    if holds_run and not resume:
        if not overwrite:
            raise ConfigError(f"{out_dir} already holds a run; continue it with --resume, or start over with "
                              "--overwrite, or choose another folder with --out")
    if overwrite:
        _clear(out_dir, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    runner = _Runner(cfg, stages, progress=progress, resume_command=command, html_report=html_report,
                     validation_as_test=validation_as_test)
    _write_json(out_dir / PIPELINE_FILE, {"method": cfg.method.name, "stages": runner.summary()})
    try:
        with runner.guard:
            for name in names:
                # Intermediate stages only need to be up to date; the last one's output must be there too.
                why = runner.available(name) if name == names[-1] else runner.fresh(name)
                if why is None:
                    if progress:
                        print(f"stage {name}: up to date, skipped", flush=True)
                    continue
                runner.execute(name, why)
                runner.guard.check()  # Ctrl-C during a stage that does not poll: stop before the next one
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            f"interrupted in a stage of {out_dir}; its state up to the last safe point is saved; continue with: "
            f"{command}") from None
    finally:
        _write_json(out_dir / PIPELINE_FILE, {"method": cfg.method.name, "stages": runner.summary()})
    last = runner.record(names[-1]) or {}
    result = dict(last.get("result") or {})
    rows = runner.summary()
    result["pipeline"] = {"stages": rows, "deployed": f"{names[-1]}/best.ckpt"}
    (out_dir / "test_metrics.json").write_text(json.dumps(result, indent=2, default=str))
    _link_best(out_dir / names[-1] / "best.ckpt", out_dir / "best.ckpt")
    _write_report(out_dir, cfg, rows, result)
    return result


def run_pipeline(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                 resume_command: str | None = None, html_report: bool = True,
                 validation_as_test: bool = False) -> dict[str, Any]:
    """:func:`run_stages` with the stages ``cfg.method`` declares (``dmlgen train`` on a pipeline method)."""
    return run_stages(cfg, pipeline_stages(cfg), resume=resume, overwrite=overwrite, progress=progress,
                      resume_command=resume_command, html_report=html_report,
                      validation_as_test=validation_as_test)


def stage_record(run_dir: str | Path, stage: str) -> dict[str, Any]:
    """The ``stage.json`` record of one stage of a pipeline run folder (for scripts and reports)."""
    rec = _read_json(Path(run_dir) / stage / STAGE_FILE)
    if rec is None:
        raise CheckpointError(f"{Path(run_dir) / stage / STAGE_FILE} does not exist: stage {stage!r} has not run")
    return rec


__all__ = ["PIPELINE_FILE", "STAGE_FILE", "config_sha256", "file_sha256", "is_pipeline", "pipeline_stages",
           "run_pipeline", "run_stages", "stage_record"]
