"""Opening the engine of one shard task: the model in-process, or an inference server.

``--engine hf`` loads the model into the task. ``--engine server`` starts the server the config
names (a preset or ``--server-command``) as a child process group on a free port, waits until
it is healthy, and kills the whole group when the task ends, fails or is preempted; or, with
``--server-url``, it talks to a server the user runs. Either way the shard loop sees one
:class:`cot.engines.Engine`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import submitit

from cot.engines import Decoding, Engine, HFEngine, PromptLimit, ServerEngine
from cot.serving import ADAPTER_NAME
from hpc.config import ShardedFields
from hpc.layout import RunLayout

log = logging.getLogger(__name__)

# How often a server that lost the race for its port is started again on another one.
PORT_RETRIES = 3


class ServerCheckpointable(submitit.helpers.Checkpointable):
    """A shard callable whose preemption stops the task's inference server first.

    submitit's USR2 handler calls :meth:`checkpoint` and then requeues the job; stopping the
    server here means it is gone before the requeue instead of being left to Slurm's kill, and
    the ``finally:`` that the handler's exit unwinds through then finds nothing left to stop.
    """

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        from cot.serving import stop_all

        stop_all()
        return super().checkpoint(*args, **kwargs)


def max_positions(model_dir: str) -> int | None:
    """The model's context length from its config.json (None when it does not say)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = cfg.get("max_position_embeddings") or cfg.get("seq_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def decoding_of(cfg: ShardedFields) -> Decoding:
    """The decoding settings of a stage (greedy at temperature 0)."""
    return Decoding(
        max_new_tokens=cfg.max_new_tokens,
        temperature=float(cfg.temperature),
        top_p=float(cfg.top_p),
    )


def stop_at_next_turn(engine: Engine, template: str, fmt: str) -> None:
    """Raw prompts stop where the model would start the next question (the template's marker);
    a chat turn already ends at the model's end-of-turn token."""
    from dataclasses import replace

    from cot.prompts import next_turn_stop

    stop = next_turn_stop(template) if fmt == "raw" else None
    decoding = getattr(engine, "decoding", None)
    if stop and isinstance(decoding, Decoding):
        engine.decoding = replace(decoding, stop=(stop,))  # type: ignore[attr-defined]


def local_tokenizer(cfg: ShardedFields, model_dir: str) -> Any | None:
    """The model's tokenizer when the model is a local folder (None for a remote-only name)."""
    from cot.models import load_tokenizer

    if not Path(model_dir, "config.json").is_file():
        return None
    return load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)


def server_env(cfg: ShardedFields) -> dict[str, str]:
    """The server's environment: the task's, offline, with the task's CPU count for threads."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.cpus_per_task))))
    return env


def task_memory(cfg: ShardedFields) -> float | None:
    """The task's memory in bytes: Slurm's allocation where it says, else ``--mem-gb``."""
    for var in ("SLURM_MEM_PER_NODE",):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value) * 2**20  # Slurm gives MB
    return cfg.mem_gb * 1e9 if cfg.mem_gb else None


def request_model(served: list[str], model_dir: str, adapter: str | None, url: str) -> str:
    """The ``model`` a request names: the adapter, the model folder, or the one model served."""
    if adapter:
        if ADAPTER_NAME in served:
            return ADAPTER_NAME
        from cot.engines import EngineError

        raise EngineError(
            f"the server at {url} serves {served}, not the adapter '{ADAPTER_NAME}' "
            f"(serve it with --lora-modules {ADAPTER_NAME}=ADAPTER_DIR)"
        )
    for name in (model_dir, str(Path(model_dir).resolve()), Path(model_dir).name):
        if name in served:
            return name
    if len(served) == 1:
        return served[0]
    from cot.engines import EngineError

    raise EngineError(
        f"the server at {url} serves {served}; none is {model_dir} (name it with --teacher)"
    )


@contextlib.contextmanager
def open_engine(
    cfg: ShardedFields,
    model_dir: str,
    stage: str,
    shard: int,
    *,
    load_model: Callable[[], Any],
) -> Iterator[tuple[Engine, Any]]:
    """Yield (engine, tokenizer or None) for one shard task; ``load_model`` is the hf loader."""
    tok = local_tokenizer(cfg, model_dir)
    decoding = decoding_of(cfg)
    positions = max_positions(model_dir)
    limit = PromptLimit(tok, positions, cfg.max_new_tokens) if tok else None
    if cfg.engine == "hf":
        if tok is None:
            from cot.models import check_model_dir

            check_model_dir(model_dir)
        yield (
            HFEngine(
                load_model(),
                tok,
                decoding,
                batch_size=cfg.batch_size,
                max_positions=positions,
            ),
            tok,
        )
        return
    from cot import serving

    adapter = getattr(cfg, "lora_model", None)
    if cfg.server_url:
        serving.wait_healthy_url(cfg.server_url, timeout_s=cfg.server_timeout_s)
        served = serving.served_models(cfg.server_url)
        engine = ServerEngine(
            cfg.server_url,
            request_model(served, model_dir, adapter, cfg.server_url),
            decoding,
            concurrency=cfg.concurrency,
            limit=limit,
        )
        yield engine, tok
        return
    log_path = RunLayout(Path(cfg.run_dir)).stage(stage).server_log(shard)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(PORT_RETRIES):
        port = serving.free_port()
        argv = serving.server_argv(
            cfg.server_command or cfg.server,
            model=model_dir,
            port=port,
            gpus=max(1, cfg.gpus_per_task),
            trust_remote_code=cfg.trust_remote_code,
            adapter=adapter,
            kv_fraction=serving.kv_fraction(cfg.gpus_per_task, task_memory(cfg), cfg.cpus_per_task),
        )
        server = serving.Server(
            argv,
            port=port,
            log_path=log_path,
            timeout_s=cfg.server_timeout_s,
            env=server_env(cfg),
            name=f"server (shard {shard})",
        )
        try:
            server.__enter__()
        except serving.ServerError as e:
            if "address already in use" in str(e).lower() and attempt + 1 < PORT_RETRIES:
                log.warning(f"shard {shard}: port {port} was taken, starting on another one")
                continue
            raise
        break
    try:
        log.info(f"shard {shard}: {server.describe()}")
        engine = ServerEngine(
            server.url,
            request_model(serving.served_models(server.url), model_dir, adapter, server.url),
            decoding,
            concurrency=cfg.concurrency,
            check_server=server.check_alive,
            limit=limit,
            describe=server.describe(),
        )
        yield engine, tok
    finally:
        server.stop()
