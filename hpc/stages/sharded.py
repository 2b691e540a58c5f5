"""Sharded stages (``generate``, ``evaluate``, ``evaluate_base``): plan, array, merge, wait.

1. Validate the input fully (file:line errors) and the model folder, before submitting anything.
2. Write the plan once, or refuse a relaunch with another input or shard count.
3. Submit only the shards with no marker and no live job, as one array per ``MaxArraySize``,
   recording each array in ``launch.json`` as soon as it is submitted.
4. Merge after the shards have ended (``afterany``: the merge checks the completion markers
   itself, which are the truth), as a dependent job or in the launcher where the backend allows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cot.sources import QuestionIndex, scan_questions
from hpc import config as C
from hpc import runs
from hpc import shards as S
from hpc.backends import (
    FAILED_STATES,
    Backend,
    Call,
    DependencyFailed,
    DoneHandle,
    Failure,
    Handle,
    failure_text,
)
from hpc.errors import ConfigError, StageFailed
from hpc.layout import RunLayout, StageLayout, shard_name
from hpc.stages.base import Stage

log = logging.getLogger(__name__)


def describe(counts: dict[str, Any]) -> str:
    """Human summary of a merge, with kept/total per category."""
    lines = [f"merged {counts['kept']} of {counts['total']} records -> {counts['merged']}"]
    if counts.get("errors"):
        lines.append(
            f"  {counts['errors']} error records (the engine could not produce them; each "
            'keeps its reason in "error")'
        )
    if counts["keep"] != "all":
        for cat, (kept, total) in sorted(counts["per_category"].items()):
            lines.append(f"  {cat:<16} kept {kept:>6} of {total:>6}")
    if counts.get("majority"):
        from cot.evaluation import vote_text

        lines.append(f"  {vote_text(counts['majority'])}")
    for o in counts["outputs"]:
        lines.append(f"  copied to {o}")
    return "\n".join(lines)


def check_engine(cfg: C.ShardedFields, adapter: str | None = None) -> None:
    """Refuse engine settings that cannot work, before anything is submitted."""
    from cot.serving import server_argv

    server_only = {
        "--server-url": cfg.server_url,
        "--server-command": cfg.server_command,
    }
    if cfg.engine == "hf":
        given = [flag for flag, v in server_only.items() if v]
        if given:
            raise ConfigError(f"{given[0]} needs --engine server (the engine is hf)")
        return
    if cfg.server_url and cfg.server_command:
        raise ConfigError(
            "--server-url and --server-command exclude each other: the first uses a running "
            "server, the second starts one per task"
        )
    if cfg.server_url:
        if not cfg.server_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"--server-url {cfg.server_url!r} must start with http:// or https://"
            )
        return
    # Builds the command once with placeholder values: a bad template fails here, not per task.
    server_argv(cfg.server_command or cfg.server, model="MODEL", port=1, adapter=adapter)


def check_sampling(cfg: C.ShardedFields, keep: str = "all") -> None:
    """Refuse sampling settings that cannot give what they ask for."""
    k = cfg.samples_per_question
    if k > 1 and cfg.temperature == 0:
        raise ConfigError(
            f"--samples-per-question {k} at --temperature 0 would write {k} identical copies of "
            "each greedy answer; give --temperature > 0 (e.g. 0.7) or --samples-per-question 1"
        )
    if keep == "majority" and k < 2:
        raise ConfigError(
            "--keep majority votes among several samples of each question: give "
            "--samples-per-question 2 or more (with --temperature > 0)"
        )


def model_is_remote(cfg: C.ShardedFields, model: str) -> bool:
    """True when ``model`` names a model of a running server rather than a local folder."""
    return cfg.engine == "server" and bool(cfg.server_url) and not Path(model).exists()


class ShardedStage(Stage):
    """A model run over an input file as an array of shards, then a verified merge.

    Args:
        cfg: the stage's config (paths already absolute).
        worker: the submitit callable of one shard, called as ``worker(cfg, shard, name)``.
        name: the stage folder (``evaluate_base`` for the base student's scores).
        keep: ``all`` or ``correct`` (generate's filter).
        samples: traces per question.
    """

    def __init__(
        self,
        cfg: C.ShardedFields,
        worker: Any,
        *,
        name: str,
        keep: str = "all",
        samples: int = 1,
    ):
        super().__init__(RunLayout(Path(cfg.run_dir)))
        self.name, self.cfg, self.worker = name, cfg, worker
        self.keep, self.samples = keep, samples
        self.dir: StageLayout = self.layout.stage(name)
        self._fresh: S.Plan | None = None  # the plan this launch makes (validate)
        self._plan: S.Plan | None = None

    # ------------------------------------------------------------------ before submission
    def check_models(self, produced: set[Path]) -> None:
        """Check the model folders this stage loads (overridden per stage)."""

    def validate(self, produced: set[Path]) -> None:
        cfg = self.cfg
        # One streaming pass validates every record; nothing of them is kept but 16 bytes each.
        index = scan_questions(cfg.input, start_index=cfg.start_index, num_samples=cfg.num_samples)
        check_engine(cfg, adapter=getattr(cfg, "lora_model", None))
        check_sampling(cfg, self.keep)
        self.check_models(produced)
        if self.keep == "correct" and not index.has_answer:
            raise ConfigError(f"{cfg.input}: --keep correct needs an `answer` field in the input")
        self._fresh = self._new_plan(index)

    def _new_plan(self, index: QuestionIndex | None = None) -> S.Plan:
        if self._fresh is not None:
            return self._fresh
        cfg = self.cfg
        selection = {"start_index": cfg.start_index, "num_samples": cfg.num_samples}
        return S.make_plan(cfg.input, cfg.shards, self.samples, selection, index=index)

    def model_fields(self) -> dict[str, Any]:
        """The models of the stage, fingerprinted (overridden per stage)."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        if self._fp is None:
            cfg = self.cfg
            engine: dict[str, Any] = {
                "engine": cfg.engine,
                "prompt_format": cfg.prompt_format,
                "quant": cfg.quant,
            }
            if cfg.precision != "auto":  # run folders made before --precision pinned no key
                engine["precision"] = cfg.precision
            if cfg.engine == "server":
                engine.update(
                    server=cfg.server, server_command=cfg.server_command, server_url=cfg.server_url
                )
            self._fp = {
                "stage": self.name,
                **self.model_fields(),
                "engine": engine,
                "decoding": {
                    "max_new_tokens": cfg.max_new_tokens,
                    "temperature": float(cfg.temperature),
                    "top_p": float(cfg.top_p),
                    "seed": cfg.seed,
                    "samples": self.samples,
                },
                "keep": self.keep,
            }
        return self._fp

    def refuse_changes(self) -> None:
        super().refuse_changes()
        S.check_plan(self.dir.dir, self._new_plan())

    def plan(self) -> None:
        self._plan = S.write_or_check_plan(self.dir.dir, self._new_plan())
        self.pin()
        C.save_resolved(self.layout.root, self.name, self.cfg)

    # ------------------------------------------------------------------ state
    @property
    def planned(self) -> S.Plan:
        """The plan (from :meth:`plan`, or read back from the run folder)."""
        if self._plan is None:
            self._plan = S.load_plan(self.dir.dir)
        return self._plan

    def outputs(self) -> list[Path]:
        return [self.dir.merged] + ([Path(self.cfg.output)] if self.cfg.output else [])

    def is_complete(self) -> bool:
        if not self.dir.plan.exists() or not self.dir.merge_summary.exists():
            return False
        return not S.incomplete(self.dir.dir, self.planned)

    def _merge_call(self) -> Call:
        from hpc.stages.merge import MergeStage

        return MergeStage(self.layout.root, self.name, self.cfg.output, self.keep).call()

    # ------------------------------------------------------------------ submission
    def submit(self, backend: Backend, after: Sequence[Handle]) -> Handle:
        plan, name = self.planned, self.name
        todo = S.incomplete(self.dir.dir, plan)
        log.info(f"{name}: {plan.shards} shards, {len(todo)} to run, run folder {self.layout.root}")
        merge = self._merge_call()
        if not todo and self.dir.merge_summary.exists() and not self.cfg.output:
            log.info(f"{name}: already complete and merged")
            return DoneHandle([json.loads(self.dir.merge_summary.read_text())], ["merge"])
        earlier = runs.latest_jobs(self.layout.root, name)
        known, merge_id = earlier["shards"], earlier["merge"]
        ids = [known[i] for i in todo if i in known]
        alive = backend.live([*ids, merge_id] if merge_id else ids)
        live = {i: known[i] for i in todo if known.get(i) in alive}
        if merge_id in alive and len(live) == len(todo) and not any(h.new for h in after):
            # Every missing shard and the merge after them are still queued or running: a
            # second merge would be a second writer of merged.jsonl.
            log.info(
                f"{name}: {len(live)} shard(s) to go and merge job {merge_id} already queued "
                "or running; nothing resubmitted"
            )
            return backend.attach([merge_id], ["merge"])
        if not todo:  # every shard is done; the merge has not run, or must copy again
            summary = merge.fn(*merge.args)
            log.info(describe(summary))
            return DoneHandle([summary], ["merge"], fresh=True)
        if live:
            log.info(
                f"{name}: {len(live)} shard(s) already queued or running, not resubmitted: "
                + ", ".join(f"{shard_name(i)} (job {j})" for i, j in sorted(live.items()))
            )
        submit = [i for i in todo if i not in live]
        record = runs.Submission(self.layout.root, name, backend.kind)

        def recorded(indices: list[int], ids: list[str]) -> None:
            record.update(shards={submit[k]: j for k, j in zip(indices, ids, strict=True)})

        deps: list[Handle] = []
        if submit:
            calls = [
                Call(self.worker, (self.cfg, i, name), f"shard {shard_name(i)}") for i in submit
            ]
            deps.append(
                backend.submit(
                    calls,
                    cfg=self.cfg,
                    name=self.job_name,
                    after=after,
                    on_submit=recorded,
                    # Each task checks its inputs (the adapter a training wrote) and names what
                    # is missing: a training that dies after its marker must not cancel them.
                    after_any=bool(after),
                )
            )
            record.update(arrays=deps[0].arrays)
        if live:
            ids = sorted(set(live.values()))
            deps.append(backend.attach(ids, [f"job {j}" for j in ids]))
        try:
            handle = backend.submit(
                [merge],
                cfg=self.cfg,
                name=self.job_name,
                after=deps,
                inline=True,
                on_submit=lambda _, ids: record.update(merge=ids[0]),
                # The merge checks every marker itself and names what is missing: a task that
                # dies after its marker (a signal while the interpreter exits, an OOM kill at
                # teardown) leaves a complete shard, and must not cancel the merge.
                after_any=True,
            )
        except DependencyFailed as e:
            raise StageFailed(failure_text(name, e.failures)) from None
        if handle.dependency:
            arrays = ", ".join(deps[0].arrays if submit else []) or "none"
            log.info(
                f"{name}: submitted {len(submit)} shard(s) as array job(s) {arrays}; "
                f"merge job {handle.job_ids[0]} (after the shards)"
            )
            log.info(f"  status: python -m hpc.launch status {self.layout.root}")
        else:
            log.info(describe(handle.results()[0]))
        return handle

    # ------------------------------------------------------------------ waiting
    def wait(self, backend: Backend, handle: Handle) -> Any:
        """Block until the merge ends, printing shard progress; raise if a shard failed."""
        if not handle.dependency:
            return handle.results()[0]
        merge_id = handle.job_ids[0]
        last = -1
        while True:
            done = len(S.completed(self.dir.dir))
            if done != last:
                log.info(f"{self.name}: {done}/{self.planned.shards} shards complete")
                last = done
            info = runs.latest_jobs(self.layout.root, self.name)
            states = backend.states([*info["shards"].values(), merge_id]) or {}
            merge_state = states.get(merge_id, "UNKNOWN")
            if merge_state == "COMPLETED" and self.dir.merge_summary.exists():
                # The merge writes merge.json last; reading it serves a merge job submitted by
                # an earlier launch as well as this one's.
                summary: dict[str, Any] = json.loads(self.dir.merge_summary.read_text())
                log.info(describe(summary))
                return summary
            missing = S.incomplete(self.dir.dir, self.planned)
            dead = [
                Failure(
                    f"shard {shard_name(i)}",
                    jid,
                    states[jid],
                    self.layout.job_log(jid),
                    f"job {jid} {states[jid]}",
                )
                for i in missing
                if (jid := info["shards"].get(i, "")) and states.get(jid, "") in FAILED_STATES
            ]
            if not dead and merge_state in FAILED_STATES:
                # The merge ran after every shard ended (afterany) and found some incomplete:
                # name those shards with whatever state the accounting shows yet (it may lag
                # behind a task that just ended), then the merge.
                dead = [
                    Failure(
                        f"shard {shard_name(i)}",
                        jid,
                        states.get(jid, "UNKNOWN"),
                        self.layout.job_log(jid),
                        f"job {jid} {states.get(jid, 'UNKNOWN')}",
                    )
                    for i in missing
                    if (jid := info["shards"].get(i, ""))
                ]
                log_path = self.layout.job_log(merge_id)
                dead.append(
                    Failure("merge", merge_id, merge_state, log_path, f"merge {merge_state}")
                )
            if dead:
                raise StageFailed(failure_text(self.name, dead))
            time.sleep(backend.poll_s)

    # ------------------------------------------------------------------ status
    @classmethod
    def status(
        cls, layout: RunLayout, name: str, info: dict[str, Any], states: dict[str, str]
    ) -> dict[str, Any]:
        """The ``status`` row of a sharded stage: markers, counters and job states."""
        stage = layout.stage(name)
        plan = S.load_plan(stage.dir)
        done = S.completed(stage.dir)
        counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
        failed = []
        written = requeues = 0
        for i in range(plan.shards):
            # Markers and progress counters only: never a shard's contents (O(shards)).
            requeues += max(0, _starts(stage.attempts(i)) - 1)
            if i in done:
                counts["done"] += 1
                written += plan.slices[i][0] * plan.samples
                continue
            written += S.read_progress(stage.dir, i)
            jid = info["shards"].get(i, "")
            state = states.get(jid, "")
            if state == "RUNNING":
                counts["running"] += 1
            elif state in FAILED_STATES:
                counts["failed"] += 1
                failed.append(
                    {"shard": i, "job": jid, "state": state, "log": str(layout.job_log(jid))}
                )
            else:
                counts["pending"] += 1
        merge_state = states.get(info["merge"], "UNKNOWN") if info.get("merge") else None
        merged = stage.merge_summary
        if merged.exists():
            merge_state = "COMPLETED"
        return {
            "kind": info["kind"],
            "jobs": sorted(set(info["shards"].values())),
            "shards": plan.shards,
            **counts,
            "records": written,
            "total": plan.num_records * plan.samples,
            "requeues": requeues,
            "failed_shards": failed,
            "merge_job": info.get("merge"),
            "merge": merge_state,
            "merge_summary": json.loads(merged.read_text()) if merged.exists() else None,
        }


def _starts(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if '"start"' in line)


class GenerateStage(ShardedStage):
    """``generate``: the teacher writes traces for every question."""

    def __init__(self, cfg: C.GenerateConfig, worker: Any = None):
        from jobs.generate import GenerateShard

        super().__init__(
            cfg,
            worker or GenerateShard(),
            name="generate",
            keep=cfg.keep,
            samples=cfg.samples_per_question,
        )
        self.gen = cfg

    def model_fields(self) -> dict[str, Any]:
        from hpc import fingerprint

        return {
            "teacher": fingerprint.model(self.gen.teacher),
            "prompt_template": fingerprint.text_file(self.gen.prompt_template),
        }

    def check_models(self, produced: set[Path]) -> None:
        from cot.models import check_model_dir, check_remote_code
        from cot.prompts import load_template

        if not model_is_remote(self.gen, self.gen.teacher):
            check_remote_code(check_model_dir(self.gen.teacher), self.gen.trust_remote_code)
        load_template(self.gen.prompt_template)


class EvaluateStage(ShardedStage):
    """``evaluate`` (the student with its adapter), ``evaluate_base`` (without) or
    ``evaluate_teacher`` (the teacher, prompted as generation prompts it)."""

    def __init__(
        self,
        cfg: C.EvaluateConfig,
        *,
        name: str = "evaluate",
        after: tuple[str, ...] = ("train",),
        worker: Any = None,
    ):
        from jobs.evaluate import EvaluateShard

        teacher = name == "evaluate_teacher"
        super().__init__(
            cfg,
            worker or EvaluateShard(teacher=teacher),
            name=name,
            samples=cfg.samples_per_question,
        )
        self.ev, self.after, self.teacher = cfg, after, teacher

    def model_fields(self) -> dict[str, Any]:
        from hpc import fingerprint

        lora = self.ev.lora_model
        if self.teacher:
            return {
                "teacher": fingerprint.model(self.ev.base_model),
                "prompt_template": fingerprint.text_file(self.ev.teacher_prompt_template),
            }
        return {
            "base_model": fingerprint.model(self.ev.base_model),
            # An adapter this run trains is pinned by the train stage's own fingerprint.
            "adapter": (
                {"path": str(lora), "from": "this run folder"}
                if self.in_run(lora)
                else fingerprint.model(lora, full_weights=True)
            ),
        }

    def check_models(self, produced: set[Path]) -> None:
        from cot.models import check_adapter_dir, check_model_dir, check_remote_code

        if not model_is_remote(self.ev, self.ev.base_model):
            check_remote_code(check_model_dir(self.ev.base_model), self.ev.trust_remote_code)
        if self.ev.lora_model and Path(self.ev.lora_model) not in produced:
            check_adapter_dir(self.ev.lora_model)
        if self.teacher:
            from cot.prompts import load_template

            load_template(self.ev.teacher_prompt_template)
