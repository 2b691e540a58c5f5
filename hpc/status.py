"""``status RUN_DIR``: one table per stage from the run folder plus at most one ``sacct`` call.

Imports nothing heavy: it reads plans, markers, shard files, attempt logs and ``launch.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpc import executor as E
from hpc import runs
from hpc import shards as S

SHARDED = ("generate", "evaluate")


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.endswith(b"\n"))


def _starts(stage_dir: Path, shard: int) -> int:
    path = stage_dir / "attempts" / S.shard_name(shard)
    if not path.exists():
        return 0
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if '"start"' in line)


def collect(run_dir: Path) -> dict[str, Any]:
    """Everything ``status`` shows, as data (tests and the pipeline read it too)."""
    run_dir = Path(run_dir)
    launch = runs.read_launch(run_dir)
    stages = list(launch.get("stages", {}))
    for st in SHARDED:
        if (run_dir / st / "plan.json").exists() and st not in stages:
            stages.append(st)
    infos = {st: runs.latest_jobs(run_dir, st) for st in stages}
    ids: list[str] = []
    for info in infos.values():
        ids += list(info["shards"].values())
        ids += [j for j in (info["merge"], info["job"]) if j]
    slurm = any(i["kind"] == "slurm" for i in infos.values())
    states = E.job_states(ids) if slurm and ids else {}
    out: dict[str, Any] = {"run_dir": str(run_dir), "sacct": states is not None, "stages": {}}
    for st in stages:
        out["stages"][st] = _stage(run_dir, st, infos[st], states or {})
    return out


def _stage(
    run_dir: Path, stage: str, info: dict[str, Any], states: dict[str, str]
) -> dict[str, Any]:
    stage_dir = run_dir / stage
    row: dict[str, Any] = {"kind": info["kind"], "jobs": sorted(set(info["shards"].values()))}
    if not (stage_dir / "plan.json").exists():
        jid = info.get("job")
        state = states.get(jid or "", "UNKNOWN" if info["kind"] == "slurm" else "-")
        if stage == "train" and (run_dir / "train" / "COMPLETE").exists():
            state = "COMPLETED"
        if stage == "report" and (run_dir / "results" / "report.json").exists():
            state = "COMPLETED"
        row.update(state=state, job=jid, log=str(run_dir / "logs" / f"{jid}_0_log.err"))
        row["failed"] = int(state in E.FAILED_STATES)
        return row
    plan = S.load_plan(stage_dir)
    done = S.completed(stage_dir)
    counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
    failed = []
    written = requeues = 0
    for i in range(plan.shards):
        written += _count_lines(S.shard_path(stage_dir, i))
        requeues += max(0, _starts(stage_dir, i) - 1)
        if i in done:
            counts["done"] += 1
            continue
        state = states.get(info["shards"].get(i, ""), "")
        if state == "RUNNING":
            counts["running"] += 1
        elif state in E.FAILED_STATES:
            counts["failed"] += 1
            failed.append(
                {
                    "shard": i,
                    "job": info["shards"][i],
                    "state": state,
                    "log": str(run_dir / "logs" / f"{info['shards'][i]}_0_log.err"),
                }
            )
        else:
            counts["pending"] += 1
    merge_state = None
    if info.get("merge"):
        merge_state = states.get(info["merge"], "UNKNOWN")
    merged = stage_dir / "merge.json"
    if merged.exists():
        merge_state = "COMPLETED"
    row.update(
        shards=plan.shards,
        **counts,
        records=written,
        total=plan.num_records * plan.samples,
        requeues=requeues,
        failed_shards=failed,
        merge_job=info.get("merge"),
        merge=merge_state,
        merge_summary=json.loads(merged.read_text()) if merged.exists() else None,
    )
    return row


def render(data: dict[str, Any]) -> str:
    """The human table."""
    lines = [f"run {data['run_dir']}"]
    if not data["sacct"]:
        lines.append("  (sacct unavailable: job states unknown; markers are still exact)")
    if not data["stages"]:
        lines.append("  nothing launched yet")
    for st, row in data["stages"].items():
        lines.append("")
        if "shards" not in row:
            lines.append(f"{st:<10} job {row.get('job') or '-'}  {row.get('state')}")
            if row["failed"]:
                lines.append(f"{'':<10} FAILED  log {row['log']}")
            continue
        lines.append(
            f"{st:<10} shards {row['done']}/{row['shards']} done  {row['running']} running  "
            f"{row['pending']} pending  {row['failed']} failed"
        )
        lines.append(
            f"{'':<10} records {row['records']}/{row['total']}  requeues {row['requeues']}  "
            f"merge {row['merge'] or '-'}"
        )
        jobs = ", ".join(sorted({j.split("_")[0] for j in row["jobs"]})) or "-"
        lines.append(f"{'':<10} jobs {jobs} ({row['kind']})  merge job {row['merge_job'] or '-'}")
        if row["merge"] in E.FAILED_STATES:
            log = Path(data["run_dir"]) / "logs" / f"{row['merge_job']}_0_log.err"
            # A merge cancelled because a shard failed never ran, so it has no log.
            where = f"log {log}" if log.exists() else "(never ran: no log)"
            lines.append(f"{'':<10} merge job {row['merge']}  {where}")
        for f in row["failed_shards"]:
            lines.append(
                f"{'':<10} FAILED shard {S.shard_name(f['shard'])} job {f['job']} "
                f"{f['state']}  log {f['log']}"
            )
    return "\n".join(lines)
