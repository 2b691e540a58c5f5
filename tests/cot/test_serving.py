"""cot.serving against a real child: a tiny http.server fake that also forks a grandchild.

The grandchild stands for vLLM's GPU workers: it shares the server's process group, and every
test that ends a server checks that it is gone too, not only the leader.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from cot.errors import InputError
from cot.serving import (
    PRESETS,
    REMOTE_CODE_FLAG,
    Server,
    ServerError,
    free_port,
    served_models,
    server_argv,
    wait_healthy_url,
)

FAKE_SERVER = textwrap.dedent(
    """
    import json, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    port, mode, delay, pidfile = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pidfile, "w") as f:
        f.write(str(worker.pid))
    print("fake-server starting on port", port, flush=True)
    if mode == "exit":
        print("FAKE-BOOM: cannot load the model", file=sys.stderr, flush=True)
        sys.exit(3)
    time.sleep(delay)

    class Handler(BaseHTTPRequestHandler):
        def log_request(self, code="-", size="-"):
            if self.path != "/health":  # keep the probes from pushing the log's last lines out
                super().log_request(code, size)

        def do_GET(self):
            if mode == "never" or (mode == "health503" and self.path == "/health"):
                code, body = 503, {"status": "loading"}
            elif mode == "nohealth" and self.path == "/health":
                code, body = 404, {"detail": "Not Found"}
            elif self.path == "/health":
                code, body = 200, {}
            elif self.path == "/v1/models":
                code, body = 200, {"object": "list", "data": [{"id": "fake/model"}]}
            else:
                code, body = 404, {}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs; a zombie nobody has reaped yet counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def wait_gone(*pids: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return all(gone(p) for p in pids)


def read_pid(path: Path, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.strip():
            return int(text)
        time.sleep(0.02)
    raise AssertionError(f"the fake server never wrote {path}")


class Fake:
    """Builds fake Servers in tmp_path and kills whatever a failing test leaves behind."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.script = tmp_path / "fake_server.py"
        self.script.write_text(FAKE_SERVER)
        self.pidfiles: list[Path] = []
        self.servers: list[Server] = []

    def server(
        self, mode: str = "ok", *, delay: float = 0.0, timeout_s: float = 10.0, tail: bool = True
    ) -> tuple[Server, Path]:
        n = len(self.servers)
        port = free_port()
        pidfile = self.tmp / f"worker{n}.pid"
        argv = [sys.executable, str(self.script), str(port), mode, str(delay), str(pidfile)]
        s = Server(
            argv,
            port=port,
            log_path=self.tmp / "logs" / f"server{n}.log",
            timeout_s=timeout_s,
            name="fake",
            poll_s=0.1,
            tail=tail,
        )
        self.pidfiles.append(pidfile)
        self.servers.append(s)
        return s, pidfile

    def cleanup(self) -> None:
        for s in self.servers:
            if s.pid is not None and not gone(s.pid):
                os.kill(s.pid, signal.SIGKILL)
            s.stop(grace_s=0.5)
        for p in self.pidfiles:
            if p.exists() and p.read_text().strip() and not gone(int(p.read_text())):
                os.kill(int(p.read_text()), signal.SIGKILL)


@pytest.fixture()
def fake(tmp_path: Path) -> Iterator[Fake]:
    f = Fake(tmp_path)
    yield f
    f.cleanup()


# --- server_argv ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "want"),
    [
        (
            "vllm",
            [
                *["vllm", "serve"],
                "/m/x y",
                *["--host", "127.0.0.1", "--port", "1234", "--tensor-parallel-size", "2"],
            ],
        ),
        (
            "sglang",
            [
                *["/py", "-m", "sglang.launch_server", "--model-path"],
                "/m/x y",
                *["--host", "127.0.0.1", "--port", "1234", "--tp-size", "2"],
            ],
        ),
        (
            "transformers",
            [
                *["/py", "-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1"],
                *["--port", "1234", "--continuous-batching", "--cb-max-memory-percent", "0.6"],
                "/m/x y",
            ],
        ),
    ],
)
def test_server_argv_presets(preset: str, want: list[str]) -> None:
    def argv(trust: bool) -> list[str]:
        return server_argv(
            preset, model="/m/x y", port=1234, gpus=2, trust_remote_code=trust, python="/py"
        )

    assert argv(False) == want
    assert argv(True) == [*want, "--trust-remote-code"]
    assert REMOTE_CODE_FLAG[preset] == "--trust-remote-code"


def test_server_argv_user_template_quotes_values() -> None:
    argv = server_argv(
        "{python} -m my.server --model={model} -p {port} --tp {gpus} --name 'a b'",
        model="/m/it's here",
        port=9,
        gpus=0,
        trust_remote_code=True,  # a user template writes its own flags
        python="/opt/py 3/bin/python",
    )
    assert argv == [
        "/opt/py 3/bin/python",
        "-m",
        "my.server",
        "--model=/m/it's here",
        "-p",
        "9",
        "--tp",
        "1",
        "--name",
        "a b",
    ]
    assert server_argv("{model} {port}", model="m", port=1)[0] == "m"
    assert set(PRESETS) == {"vllm", "sglang", "transformers"}


def test_server_argv_serves_a_lora_adapter_as_student() -> None:
    def argv(preset: str) -> list[str]:
        return server_argv(preset, model="/m/base", port=7, adapter="/r/lora dir", python="/py")

    assert argv("vllm")[-3:] == ["--enable-lora", "--lora-modules", "student=/r/lora dir"]
    assert argv("sglang")[-2:] == ["--lora-paths", "student=/r/lora dir"]
    with pytest.raises(InputError, match="transformers server preset cannot serve a LoRA"):
        argv("transformers")
    tpl = "srv {model} {port} --adapter {lora}"
    assert server_argv(tpl, model="m", port=1, adapter="/a")[-1] == "/a"
    with pytest.raises(InputError, match=r"no \{lora\} placeholder"):
        server_argv("srv {model} {port}", model="m", port=1, adapter="/a")
    with pytest.raises(InputError, match="no LoRA adapter"):
        server_argv(tpl, model="m", port=1)


@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("myserve {model}", "{port}"),
        ("myserve --port {port}", "{model}"),
        ("myserve {model} {port} {foo}", "{foo}"),
        ("myserve {model} {port} {}", "{}"),
        ("myserve {model {port}", "malformed"),
    ],
)
def test_server_argv_rejects_bad_templates(template: str, named: str) -> None:
    with pytest.raises(InputError) as err:
        server_argv(template, model="m", port=1)
    assert named in str(err.value)
    assert template in str(err.value)


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 1024 <= port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# --- the server's life ----------------------------------------------------------------------


def test_healthy_start_serves_and_kills_the_whole_group(fake: Fake) -> None:
    server, pidfile = fake.server(delay=0.3)
    with server as s:
        assert s.alive()
        assert s.url == f"http://127.0.0.1:{s.port}"
        assert served_models(s.url) == ["fake/model"]
        s.check_alive()
        pid, worker = s.pid, read_pid(pidfile)
        assert pid is not None and os.getpgid(worker) == pid
        assert str(pid) in s.describe() and str(s.log_path) in s.describe()
    assert wait_gone(pid, worker), "the leader or its worker survived stop()"
    assert not s.alive()
    s.stop()  # idempotent


def test_no_health_endpoint_falls_back_to_models(fake: Fake) -> None:
    server, _ = fake.server("nohealth")
    with server as s:
        assert served_models(s.url + "/") == ["fake/model"]


def test_health_503_is_unhealthy_even_if_models_answers(fake: Fake) -> None:
    server, _ = fake.server("health503", timeout_s=0.5)
    with pytest.raises(ServerError, match="HTTP 503"), server:
        pass


def test_never_healthy_times_out_and_kills_the_group(fake: Fake) -> None:
    server, pidfile = fake.server("never", timeout_s=0.8)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as err, server:
        pytest.fail("the block must not run")
    took = time.monotonic() - t0
    msg = str(err.value)
    assert took < 0.8 + 5.0, f"took {took:.1f}s"
    assert took >= 0.8
    assert "not healthy after 0.8s" in msg
    assert str(server.log_path) in msg
    assert server.command in msg and str(fake.script) in msg
    assert "fake-server starting" in msg  # the log's last lines
    assert wait_gone(server.pid or 0, read_pid(pidfile))


def test_exits_at_once_reports_code_and_log_and_kills_the_orphan(fake: Fake) -> None:
    server, pidfile = fake.server("exit")
    with pytest.raises(ServerError) as err, server:
        pytest.fail("the block must not run")
    msg = str(err.value)
    assert "exit code 3" in msg
    assert "FAKE-BOOM: cannot load the model" in msg
    assert str(server.log_path) in msg and f"pid: {server.pid}" in msg
    # The leader is gone; its worker outlived it and must still have been killed.
    assert wait_gone(read_pid(pidfile))


def test_missing_executable_is_a_server_error(tmp_path: Path) -> None:
    s = Server(["/no/such/engine", "serve"], port=free_port(), log_path=tmp_path / "s.log")
    with pytest.raises(ServerError, match="could not be started") as err, s:
        pass
    assert "/no/such/engine" in str(err.value)


def test_log_tail_forwards_lines_to_the_logger(
    fake: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("cot.serving")
    logger.addHandler(caplog.handler)  # hpc.logs turns propagation off for cot.*
    caplog.set_level(logging.INFO, logger="cot.serving")
    try:
        server, _ = fake.server()
        with server as s:
            served_models(s.url)
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.name == "cot.serving"]
    assert any(line.startswith("fake: fake-server starting on port") for line in lines), lines
    assert any(line.startswith("fake: ") and "GET /v1/models" in line for line in lines), lines


def test_log_is_appended_and_errors_show_only_this_start(fake: Fake) -> None:
    server, _ = fake.server("exit", tail=False)
    server.log_path.parent.mkdir(parents=True)
    server.log_path.write_text("OLD ATTEMPT LINE\n")
    with pytest.raises(ServerError) as err, server:
        pass
    assert "OLD ATTEMPT LINE" in server.log_path.read_text()
    assert "OLD ATTEMPT LINE" not in str(err.value)


def test_killed_mid_use_is_caught_by_check_alive(fake: Fake) -> None:
    server, pidfile = fake.server()
    with server as s:
        pid = s.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while s.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not s.alive()
        with pytest.raises(ServerError) as err:
            s.check_alive()
        msg = str(err.value)
        assert str(pid) in msg and str(s.log_path) in msg and "SIGKILL" in msg
    assert wait_gone(read_pid(pidfile))


def test_stop_from_finally_during_signal_exit(fake: Fake) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    server, pidfile = fake.server()
    old = signal.signal(signal.SIGUSR1, handler)
    try:
        with pytest.raises(SystemExit), server as s:
            pid, worker = s.pid, read_pid(pidfile)
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)  # the handler interrupts this
            pytest.fail("the signal did not arrive")
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert pid is not None
    assert wait_gone(pid, worker)


def test_stop_all_stops_every_live_server(fake: Fake) -> None:
    from cot.serving import stop_all

    server, pidfile = fake.server()
    with server as s:
        pid, worker = s.pid, read_pid(pidfile)
        stop_all()
        assert not s.alive()
        assert pid is not None and wait_gone(pid, worker, timeout_s=0.5)
    stop_all()  # nothing left: a no-op


# --- a server the user runs ---------------------------------------------------------------


def test_wait_healthy_url_against_a_running_server(fake: Fake) -> None:
    server, _ = fake.server()
    with server as s:
        wait_healthy_url(s.url, timeout_s=5)
        wait_healthy_url(s.url + "/", timeout_s=5)


def test_wait_healthy_url_against_a_closed_port() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ServerError) as err:
        wait_healthy_url(url, timeout_s=0.3)
    assert time.monotonic() - t0 < 0.3 + 3
    assert f"server at {url} not reachable/healthy after 0.3s" in str(err.value)
    with pytest.raises(ServerError, match="v1/models"):
        served_models(url, timeout_s=1)
    with pytest.raises(InputError):
        wait_healthy_url("127.0.0.1:8000", timeout_s=1)


def test_kv_fraction_shares_a_cpu_node_and_leaves_gpus_headroom() -> None:
    import os

    from cot.serving import kv_fraction

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert kv_fraction(1, None, 1) == 0.8
    assert kv_fraction(0, total / 4, 1) == pytest.approx(0.125)  # half of a quarter of the RAM
    assert kv_fraction(0, total * 4, 1) == 0.25  # tasks side by side that each think they
    assert kv_fraction(0, None, os.cpu_count() or 1) == 0.25  # have the node still fit
    argv = server_argv("transformers", model="m", port=1, kv_fraction=0.125)
    assert argv[argv.index("--cb-max-memory-percent") + 1] == "0.125"
