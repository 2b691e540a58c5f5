"""An OpenAI-compatible inference server (vLLM, SGLang, ``transformers serve``) as a child.

One array task starts its own server on a free local port, waits until it answers, sends it
work and kills it on the way out. The server runs in a process group of its own
(``start_new_session=True``): vLLM and SGLang fork GPU workers that outlive a killed leader, so
:meth:`Server.stop` signals the whole group, never the leader alone. Its output goes to a log
file (appended, so a requeued task keeps the earlier attempt's lines), which a thread follows
and forwards to the ``cot.serving`` logger so that it also shows in the SLURM log.

Standard library only: no torch, no HTTP client package. No signal handlers are installed here;
:meth:`Server.stop` is safe to call from the ``finally:`` that a handler's ``SystemExit``
unwinds through.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shlex
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

from cot.errors import CotError, InputError

log = logging.getLogger(__name__)

PRESETS: dict[str, str] = {
    "vllm": "vllm serve {model} --host 127.0.0.1 --port {port} --tensor-parallel-size {gpus}",
    "sglang": (
        "{python} -m sglang.launch_server --model-path {model} --host 127.0.0.1 --port {port}"
        " --tp-size {gpus}"
    ),
    # `transformers serve` has no tensor parallelism; it places the model with device="auto".
    # Its KV cache takes a fixed share of the device's memory (60% of the node's RAM on CPU by
    # default), so two tasks on one node would each take 60%: {kv_fraction} sizes it per task.
    "transformers": (
        "{python} -m transformers.cli.transformers serve --host 127.0.0.1 --port {port}"
        " --continuous-batching --cb-max-memory-percent {kv_fraction} {model}"
    ),
}
REMOTE_CODE_FLAG: dict[str, str] = {name: "--trust-remote-code" for name in PRESETS}
# How a preset serves a LoRA adapter next to its base model, under the name ADAPTER_NAME;
# `transformers serve` cannot.
ADAPTER_NAME = "student"
ADAPTER_FLAGS: dict[str, str] = {
    "vllm": "--enable-lora --lora-modules " + ADAPTER_NAME + "={lora}",
    "sglang": "--lora-paths " + ADAPTER_NAME + "={lora}",
}
PLACEHOLDERS = ("python", "model", "port", "gpus", "lora", "kv_fraction")
REQUIRED_PLACEHOLDERS = ("model", "port")
LOG_TAIL_LINES = 20
TAIL_INTERVAL_S = 0.2
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# Every started server whose group is not yet known to be gone, for :func:`stop_all`.
_LIVE: set[Server] = set()
_LIVE_LOCK = threading.Lock()


def stop_all() -> None:
    """Stop every server this process started and has not stopped: the preemption handler's
    first step, so that a server is gone before the task is requeued, not after."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for server in live:
        server.stop()


class ServerError(CotError):
    """The inference server would not start, never became healthy or died while in use."""

    exit_code = 1


def server_argv(
    template_or_preset: str,
    *,
    model: str,
    port: int,
    gpus: int = 1,
    trust_remote_code: bool = False,
    adapter: str | None = None,
    python: str = sys.executable,
    kv_fraction: float = 0.6,
) -> list[str]:
    """Build the server's argv from a preset name or a user template.

    Values are shell-quoted before they are put in and the result is split as a shell would,
    so a model path with spaces stays one argument.

    Args:
        template_or_preset: A key of :data:`PRESETS`, or a command with ``{model}``, ``{port}``
            and optionally ``{gpus}`` and ``{python}`` placeholders.
        model: The model folder (or name) to serve.
        port: The port the server listens on.
        gpus: Tensor-parallel size; below 1 is taken as 1.
        trust_remote_code: Append the preset's flag; a user template writes it itself.
        adapter: A LoRA adapter folder to serve as ``student`` next to the base model: the
            preset's flag (vllm, sglang), or a template's ``{lora}`` placeholder.
        python: The interpreter for ``{python}``.
        kv_fraction: For ``{kv_fraction}``: the share of the device's memory the server's KV
            cache may take (see :func:`kv_fraction`).

    Returns:
        The argv list, ready for :class:`Server`.

    Raises:
        InputError: The template lacks ``{model}`` or ``{port}``, has an unknown placeholder or
            is malformed; or an adapter is asked of a server that cannot serve one.
    """
    preset = template_or_preset if template_or_preset in PRESETS else None
    template = PRESETS[preset] if preset else template_or_preset
    if adapter is not None and preset:
        if preset not in ADAPTER_FLAGS:
            raise InputError(
                f"the {preset} server preset cannot serve a LoRA adapter; use --server "
                f"{' or '.join(ADAPTER_FLAGS)}, a --server-command with {{lora}}, or --engine hf"
            )
        template = f"{template} {ADAPTER_FLAGS[preset]}"
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise InputError(f"server command template {template!r} is malformed: {e}") from None
    unknown = sorted(fields - set(PLACEHOLDERS))
    if unknown:
        known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
        raise InputError(
            f"server command template {template!r} has unknown placeholder "
            f"{{{unknown[0]}}} (known: {known})"
        )
    for need in REQUIRED_PLACEHOLDERS:
        if need not in fields:
            raise InputError(
                f"server command template {template!r} is missing the {{{need}}} placeholder"
            )
    if adapter is not None and "lora" not in fields:
        raise InputError(
            f"server command template {template!r} has no {{lora}} placeholder for the LoRA "
            "adapter being evaluated"
        )
    if adapter is None and "lora" in fields:
        raise InputError(
            f"server command template {template!r} has a {{lora}} placeholder but there is no "
            "LoRA adapter (--lora-model) to put in it"
        )
    values = {
        "python": python,
        "model": model,
        "port": int(port),
        "gpus": max(1, int(gpus)),
        "lora": adapter or "",
        "kv_fraction": f"{float(kv_fraction):.3g}",
    }
    try:
        text = template.format(**{k: shlex.quote(str(v)) for k, v in values.items()})
        argv = shlex.split(text)
    except ValueError as e:  # a format spec such as {port:d} on a quoted string, or a bad quote
        raise InputError(f"server command template {template!r} is malformed: {e}") from None
    if trust_remote_code and preset:
        argv.append(REMOTE_CODE_FLAG[preset])
    return argv


def kv_fraction(gpus: int, task_mem_bytes: float | None, cpus: int) -> float:
    """The share of the device's memory one task's server may give its KV cache.

    A task with GPUs owns them: 0.8, leaving room for activations. A CPU-only task shares the
    node's RAM: half of the task's memory (``task_mem_bytes``, or the node's RAM in proportion
    to the task's ``cpus`` when unknown) over the node's RAM, and never more than 0.25, so that
    a few tasks (or local runs side by side) that each believe they have the node still fit.
    """
    if gpus > 0:
        return 0.8
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    mine = task_mem_bytes if task_mem_bytes else total * min(1.0, cpus / (os.cpu_count() or 1))
    return max(0.01, min(0.25, 0.5 * mine / total))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """An inference server child: start it, wait until healthy, always kill its whole group.

    Use it as a context manager::

        with Server(argv, port=port, log_path=log_path) as server:
            ...  # send requests to server.url

    Args:
        argv: The command, e.g. from :func:`server_argv`.
        port: The port the command makes the server listen on.
        log_path: The file the server's stdout and stderr are appended to.
        timeout_s: How long :meth:`wait_healthy` waits (model loading can take minutes).
        env: The child's environment; a copy of ``os.environ`` when None.
        name: What log lines and errors call the server.
        poll_s: Seconds between health checks.
        tail: Forward the log's new lines to the ``cot.serving`` logger.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        port: int,
        log_path: Path,
        timeout_s: float = 600.0,
        env: dict[str, str] | None = None,
        name: str = "server",
        poll_s: float = 0.5,
        tail: bool = True,
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.timeout_s = timeout_s
        self.env = env
        self.name = name
        self.poll_s = poll_s
        self.tail = tail
        self.command = shlex.join(self.argv)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_start = 0
        self._group_gone = False
        self._tail_stop = threading.Event()
        self._tail_thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid, which is also its process-group id; None before :meth:`start`."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the child in a new session, its output appended to :attr:`log_path`."""
        if self._proc is not None:
            raise ServerError(f"{self.describe()} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        self._log_file.write(f"# cot-hpc: starting {self.name}: {self.command}\n".encode())
        self._log_file.flush()
        self._log_start = self._log_file.tell()
        env = dict(os.environ if self.env is None else self.env)
        # Python servers block-buffer a redirected stdout; unbuffered, a crash's last words
        # reach the log.
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            self._close_log()
            raise ServerError(
                f"{self.name} could not be started ({e}); is the engine installed in this "
                f"environment?\n  command: {self.command}\n  log: {self.log_path}"
            ) from None
        with _LIVE_LOCK:
            _LIVE.add(self)
        log.info(
            "%s: started pid %d: %s (log %s)",
            self.name,
            self._proc.pid,
            self.command,
            self.log_path,
        )
        if self.tail:
            self._tail_stop.clear()
            self._tail_thread = threading.Thread(
                target=self._follow_log, name=f"{self.name}-log-tail", daemon=True
            )
            self._tail_thread.start()

    def wait_healthy(self) -> None:
        """Poll ``/health`` (``/v1/models`` where there is none) until it answers 200.

        Raises:
            ServerError: The child exited first, or ``timeout_s`` passed (the group is killed).
        """
        proc = self._require_proc()
        deadline = time.monotonic() + self.timeout_s
        while True:
            rc = proc.poll()
            if rc is not None:
                self.stop(grace_s=2.0)  # its workers may have outlived it
                raise ServerError(
                    f"{self.name} exited with {_exit_text(rc)} before it became healthy"
                    + self._details()
                )
            remaining = deadline - time.monotonic()
            why = _unhealthy_reason(self.url, max(0.1, min(5.0, remaining)))
            if why is None:
                log.info("%s: healthy at %s", self.name, self.url)
                return
            if time.monotonic() >= deadline:
                # Not serving anything yet, so nothing is lost by a short grace.
                self.stop(grace_s=2.0)
                raise ServerError(
                    f"{self.name} not healthy after {self.timeout_s:g}s (last check: {why}); "
                    "killed it" + self._details()
                )
            time.sleep(max(0.0, min(self.poll_s, deadline - time.monotonic())))

    def alive(self) -> bool:
        """Whether the child has been started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def check_alive(self) -> None:
        """Raise ServerError, with the log's last lines, if the child has exited."""
        rc = self._require_proc().poll()
        if rc is not None:
            raise ServerError(f"{self.name} died: {_exit_text(rc)}" + self._details())

    def describe(self) -> str:
        """One line naming the server: name, pid, url and log file."""
        return f"{self.name} (pid {self.pid}, {self.url}, log {self.log_path})"

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``grace_s``; idempotent.

        The group is signalled even when the leader has already exited, since its workers may
        have survived it.
        """
        proc = self._proc
        try:
            if proc is not None and not self._group_gone:
                pgid = proc.pid
                if _group_members(pgid):
                    _killpg(pgid, signal.SIGTERM)
                    if not _wait_group(proc, grace_s):
                        log.warning(
                            "%s: still running %gs after SIGTERM; sending SIGKILL",
                            self.name,
                            grace_s,
                        )
                        _killpg(pgid, signal.SIGKILL)
                        _wait_group(proc, 5.0)
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    log.warning("%s: pid %d did not exit after SIGKILL", self.name, pgid)
                else:
                    self._group_gone = not _group_members(pgid)
                    if self._group_gone:
                        log.info("%s: stopped, process group %d gone", self.name, pgid)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(self)
            self._stop_tail()
            self._close_log()

    def __enter__(self) -> Server:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise ServerError(f"{self.describe()} was never started")
        return self._proc

    def _details(self) -> str:
        lines = self._last_log_lines()
        shown = "\n".join(f"    {line}" for line in lines) if lines else "    (empty)"
        return (
            f"\n  command: {self.command}\n  pid: {self.pid}\n  log: {self.log_path}"
            f"\n  last log lines:\n{shown}"
        )

    def _last_log_lines(self, n: int = LOG_TAIL_LINES) -> list[str]:
        """The last ``n`` lines this start wrote to the log (earlier attempts left out)."""
        try:
            with open(self.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(self._log_start, size - 64 * 1024))
                data = f.read()
        except OSError:
            return []
        lines = [_clean(raw) for raw in data.split(b"\n")]
        return [line for line in lines if line][-n:]

    def _follow_log(self) -> None:
        """Forward each new log line to the logger until :meth:`stop` (then flush the rest)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                partial = b""
                while True:
                    stopping = self._tail_stop.wait(TAIL_INTERVAL_S)
                    partial += f.read()
                    *complete, partial = partial.split(b"\n")
                    if stopping and partial:
                        complete.append(partial)
                    for raw in complete:
                        line = _clean(raw)
                        if line:
                            log.info("%s: %s", self.name, line)
                    if stopping:
                        return
        except OSError as e:
            log.warning("%s: stopped following %s: %s", self.name, self.log_path, e)

    def _stop_tail(self) -> None:
        thread = self._tail_thread
        if thread is not None:
            self._tail_stop.set()
            if thread is not threading.current_thread():
                thread.join(timeout=5.0)
            self._tail_thread = None

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def served_models(url: str, timeout_s: float = 10.0) -> list[str]:
    """The model ids a server lists at ``GET {url}/v1/models``.

    Raises:
        ServerError: The server did not answer, or answered something that is not a model list.
    """
    base = _base(url)
    try:
        status, body = _get(base + "/v1/models", timeout_s)
    except (OSError, http.client.HTTPException) as e:
        raise ServerError(f"GET {base}/v1/models failed: {_reason(e)}") from None
    if status != 200:
        raise ServerError(f"GET {base}/v1/models answered HTTP {status}")
    try:
        return [str(m["id"]) for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ServerError(
            f"GET {base}/v1/models did not return an OpenAI model list ({e!r}): {body[:200]!r}"
        ) from None


def wait_healthy_url(url: str, timeout_s: float) -> None:
    """Wait for a server the user runs themselves (``--server-url``) to answer as healthy.

    Raises:
        InputError: ``url`` is not an http(s) URL.
        ServerError: It did not answer 200 within ``timeout_s``.
    """
    base = _base(url)
    deadline = time.monotonic() + timeout_s
    while True:
        why = _unhealthy_reason(base, max(0.1, min(5.0, deadline - time.monotonic())))
        if why is None:
            return
        if time.monotonic() >= deadline:
            raise ServerError(f"server at {base} not reachable/healthy after {timeout_s:g}s: {why}")
        time.sleep(max(0.0, min(0.5, deadline - time.monotonic())))


def _base(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"server URL {url!r} is not an http:// or https:// URL")
    return url.rstrip("/")


# Clusters often set http_proxy for the login nodes; a local server must never go through it.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout_s: float) -> tuple[int, bytes]:
    """``GET url`` -> (status, body); an HTTP error status is returned, not raised."""
    host = urllib.parse.urlsplit(url).hostname or ""
    opener = _DIRECT if host in LOOPBACK else urllib.request.build_opener()
    try:
        with opener.open(url, timeout=timeout_s) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        e.close()
        return int(e.code), b""


def _unhealthy_reason(base: str, timeout_s: float) -> str | None:
    """None if the server is healthy, else why not (for the error message)."""
    try:
        status, _ = _get(base + "/health", timeout_s)
        if status == 200:
            return None
        if status not in (404, 405):
            # A server that has /health and says no (503 while loading, or a dead worker) is
            # not healthy, whatever /v1/models says.
            return f"GET /health answered HTTP {status}"
        status, _ = _get(base + "/v1/models", timeout_s)
    except (OSError, http.client.HTTPException) as e:
        return _reason(e)
    return None if status == 200 else f"no /health, and GET /v1/models answered HTTP {status}"


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


def _clean(raw: bytes) -> str:
    """One log line as text; of a progress bar's ``\\r`` redraws only the last is kept."""
    return raw.decode("utf-8", errors="replace").rstrip("\r").rsplit("\r", 1)[-1].rstrip()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of group ``pgid``.

    Orphaned workers are re-parented to a PID 1 that, in a container, may never reap them; a
    zombie holds no GPU memory, so it counts as gone.
    """
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # not Linux: signal 0 reaches zombies too, the best there is
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which may itself hold spaces and parentheses.
        fields = stat.rpartition(")")[2].split()
        if len(fields) >= 3 and fields[0] != "Z" and fields[2] == str(pgid):
            members.append(int(entry.name))
    return members


def _wait_group(proc: subprocess.Popen[Any], timeout_s: float) -> bool:
    """Reap the leader and wait until no live process is left in its group; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc.poll()
        if not _group_members(proc.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
