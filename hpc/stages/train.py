"""The ``train`` stage: ONE job of nodes x tasks_per_node processes, each running ``Train``.

1. Validate the data (file:line errors), the student folder, the DeepSpeed config and the
   package ``--report-to`` needs before anything is submitted; a bad input exits non-zero with
   nothing queued.
2. Skip a training that is already complete, and one whose job is still queued or running.
3. Submit one job; on the local backend the same world size runs as processes on this machine.
4. While waiting, print progress from metrics.jsonl; at the end, the summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpc import config as C
from hpc import runs
from hpc.backends import Backend, Call, DoneHandle, Handle, Resources
from hpc.errors import ConfigError, StageFailed
from hpc.layout import RunLayout
from hpc.stages.base import Stage

log = logging.getLogger(__name__)


def resolve(cfg: C.TrainConfig) -> C.TrainConfig:
    """Absolute paths; out_dir defaults to RUN_DIR/train, data to generate's merge."""
    cfg = C.resolve_paths(cfg)
    layout = RunLayout(Path(cfg.run_dir))
    return dataclasses.replace(
        cfg,
        out_dir=cfg.out_dir or str(layout.train_dir),
        data=cfg.data or str(layout.train_data),
    )


def job_shape(cfg: C.TrainConfig) -> Resources:
    """Nodes, processes per node and GPUs per node: one process per GPU, else one per node."""
    gpus = cfg.gpus_per_node if cfg.gpus_per_node is not None else cfg.gpus_per_task
    tasks = cfg.tasks_per_node or (gpus if gpus > 0 else 1)
    if tasks < 1:
        raise ConfigError(f"--tasks-per-node must be >= 1, got {tasks}")
    if gpus and tasks > gpus:
        raise ConfigError(
            f"--tasks-per-node {tasks} exceeds --gpus-per-node {gpus}: "
            "training runs one process per GPU"
        )
    return Resources(nodes=cfg.nodes, tasks_per_node=tasks, gpus_per_node=gpus)


# The packages each --report-to needs (any one of them): HF's callbacks import them.
REPORTER_PACKAGES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
}


def check_reporter(report_to: str) -> None:
    """Refuse a ``--report-to`` whose package is not installed (looked up, not imported)."""
    import importlib.util

    packages = REPORTER_PACKAGES.get(report_to, ())
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        raise ConfigError(
            f"--report-to {report_to} needs the {packages[0]} package, which is not installed: "
            f"pip install {packages[0]} (or --report-to none)"
        )


def validate_config(cfg: C.TrainConfig, *, check_data: bool = True) -> int:
    """Check everything a training job would trip over; returns the number of records."""
    from cot.models import check_model_dir, check_remote_code
    from cot.training import (
        TrainOutputs,
        load_deepspeed_config,
        read_training_records,
        started_from,
    )

    assert cfg.data is not None
    n = len(read_training_records(cfg.data)) if check_data else 0
    check_remote_code(check_model_dir(cfg.student), cfg.trust_remote_code)
    load_deepspeed_config(cfg.deepspeed)
    start = cfg.resume_from_checkpoint
    if start and not Path(start).is_dir():
        # A relaunch may go on from what its line of training saved after rotation removed the
        # start itself; any other missing start is refused here.
        done = cfg.out_dir and started_from(TrainOutputs(Path(cfg.out_dir)).checkpoints, start)
        if not done:
            raise ConfigError(f"--resume-from-checkpoint {start}: no such folder")
    job_shape(cfg)
    check_reporter(cfg.report_to)
    return n


class TrainStage(Stage):
    """Multi-node LoRA training into ``out_dir`` (default ``RUN_DIR/train``)."""

    name = "train"
    after = ("generate",)

    def __init__(self, cfg: C.TrainConfig):
        self.cfg = resolve(cfg)
        super().__init__(RunLayout(Path(self.cfg.run_dir)))
        from cot.training import TrainOutputs

        self.out = TrainOutputs(Path(str(self.cfg.out_dir)))

    def validate(self, produced: set[Path]) -> None:
        data = Path(str(self.cfg.data))
        # After an earlier stage of this command, the data may be written by a job this one
        # waits for; the job then checks it (file:line errors) when it starts.
        check = data.exists() or not produced
        n = validate_config(self.cfg, check_data=check)
        runs.check_out_dir(self.out.dir)
        if check:
            log.info(f"train: {n} training records in {data}")

    def fingerprint(self) -> dict[str, Any]:
        if self._fp is None:
            from hpc import fingerprint

            cfg = self.cfg
            data = str(cfg.data)
            hyper = {
                k: getattr(cfg, k)
                for k in (
                    "epochs", "max_steps", "lr", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "r", "lora_alpha", "lora_dropout",
                    "max_length", "overlong", "optim", "quant", "seed",
                )
            }  # fmt: skip
            if cfg.precision != "auto":  # run folders made before --precision pinned no key
                hyper["precision"] = cfg.precision
            self._fp = {
                "stage": self.name,
                "student": fingerprint.model(cfg.student),
                # Data this run generates is pinned by the generate stage's fingerprint.
                "data": (
                    {"path": data, "from": "this run folder"}
                    if self.in_run(data)
                    else {"path": data, "sha256": fingerprint.text_file(data)}
                    if Path(data).exists()
                    else {"path": data}
                ),
                "deepspeed": fingerprint.text_file(cfg.deepspeed),
                "out_dir": str(cfg.out_dir),
                "hyperparameters": hyper,
            }
        return self._fp

    def plan(self) -> None:
        import yaml

        from cot.records import atomic_write_text

        self.pin()
        C.save_resolved(self.layout.root, self.name, self.cfg)
        runs.make_out_dir(self.out.dir)
        text = yaml.safe_dump(C.to_dict(self.cfg), sort_keys=False)
        atomic_write_text(self.out.config, text)

    def finished(self) -> dict[str, Any] | None:
        """The completion record when this run already trained into ``out_dir``."""
        from jobs.train import finished

        return finished(self.layout.root, self.out.dir)

    def is_complete(self) -> bool:
        return self.finished() is not None

    def make_job(self) -> Any:
        """The callable each process runs (tests swap in one that fails on purpose)."""
        from jobs.train import Train

        return Train()

    def outputs(self) -> list[Path]:
        return [self.out.adapter, self.layout.train_marker]

    def submit(self, backend: Backend, after: Sequence[Handle]) -> Handle:

        done = self.finished()
        if done is not None:
            log.info(
                f"train: already complete ({done.get('global_step')} steps), adapter in "
                f"{done.get('adapter')}"
            )
            return DoneHandle([{**done, "status": "already complete"}], ["train"])
        jid = runs.latest_jobs(self.layout.root, self.name).get("job")
        if jid and not any(h.new for h in after) and jid in backend.live([jid]):
            log.info(
                f"train: job {jid} is already queued or running for {self.layout.root}; "
                "not resubmitted"
            )
            return backend.attach([jid], ["train"])
        shape = backend.placement(job_shape(self.cfg))
        record = runs.Submission(
            self.layout.root,
            self.name,
            backend.kind,
            nodes=shape.nodes,
            tasks_per_node=shape.tasks_per_node,
        )
        handle = backend.submit(
            [Call(self.make_job(), (self.cfg,), "train")],
            cfg=self.cfg,
            name=self.job_name,
            resources=shape,
            after=after,
            on_submit=lambda _, ids: record.update(job=ids[0]),
            # The job checks its data itself (it names the merge that did not write it): a
            # merge that dies after its output is written must not cancel the training.
            after_any=True,
        )
        deps = [d for h in after for d in h.dependency]
        when = f" (after {', '.join(deps)})" if deps else ""
        log.info(
            f"train: job {', '.join(handle.job_ids)} on {backend.kind}{when}: {shape.nodes} "
            f"node(s) x {shape.tasks_per_node} process(es), out {self.out.dir}, "
            f"logs {self.layout.logs}"
        )
        return handle

    def _progress(self) -> str | None:
        path = self.out.metrics
        if not path.exists():
            return None
        lines = path.read_text(encoding="utf-8").strip().splitlines()
        try:
            row = json.loads(lines[-1]) if lines else None
        except ValueError:
            return None
        if not row:
            return None
        return f"train: step {row['step']}  loss {row['loss']:.4f}  {row['tokens_per_s']:.0f} tok/s"

    def wait(self, backend: Backend, handle: Handle) -> Any:
        """Block until the job ends; print progress; raise StageFailed with the logs."""
        if not handle.job_ids:
            return handle.results()[0]
        last: list[str | None] = [None]
        t0 = time.time()

        def progress() -> None:
            line = self._progress()
            if line and line != last[0]:
                log.info(line)
                last[0] = line

        handle.wait(progress)
        jid = handle.job_ids[0]
        try:
            result: dict[str, Any] = handle.results()[0]  # rank 0's result carries the summary
        except StageFailed as e:
            done = self.finished()  # a job of an earlier launch: its marker is the result
            if done is not None:
                return done
            raise StageFailed(
                f"train: job {jid} failed: {e}\n"
                f"  log: {self.layout.job_log(jid)} (every rank: {jid}_*_log.err)"
            ) from None
        data = result.get("data", {})
        over = sum(data.get(k, 0) for k in ("truncated", "dropped_overlong", "dropped_no_answer"))
        log.info(
            f"train: complete in {time.time() - t0:.0f}s: {result.get('global_step')} steps, "
            f"final loss {result.get('final_loss')}, ZeRO stage "
            f"{result.get('engine', {}).get('zero_stage')}"
            f"\n  data:    {data.get('kept')} of {data.get('records')} records trained on, "
            f"{over} over --max-length ({data.get('truncated', 0)} truncated, "
            f"{data.get('dropped_overlong', 0) + data.get('dropped_no_answer', 0)} dropped)"
            f"\n  adapter: {result.get('adapter')}\n  metrics: {self.out.metrics}"
            f"\n  plot:    {self.out.loss_plot}"
        )
        return result

    @classmethod
    def done_marker(cls, layout: RunLayout) -> Path | None:
        return layout.train_marker
