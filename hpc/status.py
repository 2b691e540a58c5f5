"""``status RUN_DIR``: one table per stage from the run folder plus at most one ``sacct`` call.

Imports nothing heavy: it reads plans, markers, shard files, attempt logs and ``launch.json``,
and asks each stage class (:data:`hpc.stages.STATUS`) for its row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpc import runs
from hpc.backends import FAILED_STATES, for_kind
from hpc.layout import SHARDED_STAGES, RunLayout, shard_name


def collect(run_dir: Path) -> dict[str, Any]:
    """Everything ``status`` shows, as data (tests and the pipeline read it too)."""
    from hpc.stages import STATUS, Stage

    layout = RunLayout(Path(run_dir))
    launch = runs.read_launch(layout.root)
    stages = list(launch.get("stages", {}))
    for st in SHARDED_STAGES:
        if layout.stage(st).plan.exists() and st not in stages:
            stages.append(st)
    infos = {st: runs.latest_jobs(layout.root, st) for st in stages}
    by_kind: dict[str | None, list[str]] = {}
    for info in infos.values():
        ids = [*info["shards"].values(), *(j for j in (info["merge"], info["job"]) if j)]
        by_kind.setdefault(info["kind"], []).extend(ids)
    states: dict[str, str] = {}
    answered = True
    for kind, ids in by_kind.items():  # one scheduler call per backend that ran something
        got = for_kind(kind, layout).states(ids) if ids else {}
        answered = answered and got is not None
        states.update(got or {})
    out: dict[str, Any] = {"run_dir": str(layout.root), "sacct": answered, "stages": {}}
    for st in stages:
        reader = STATUS.get(st, Stage)
        if st in SHARDED_STAGES and not layout.stage(st).plan.exists():
            reader = Stage  # launched, but no plan yet: a plain job row
        out["stages"][st] = reader.status(layout, st, infos[st], states)
    return out


def render(data: dict[str, Any]) -> str:
    """The human table."""
    layout = RunLayout(Path(data["run_dir"]))
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
        if row["merge"] in FAILED_STATES:
            log = layout.job_log(row["merge_job"])
            # A merge cancelled because a shard failed never ran, so it has no log.
            where = f"log {log}" if log.exists() else "(never ran: no log)"
            lines.append(f"{'':<10} merge job {row['merge']}  {where}")
        for f in row["failed_shards"]:
            lines.append(
                f"{'':<10} FAILED shard {shard_name(f['shard'])} job {f['job']} "
                f"{f['state']}  log {f['log']}"
            )
    return "\n".join(lines)
