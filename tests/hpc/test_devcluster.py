"""The test cluster's safety on a shared host (hpc/devcluster): what up.sh refuses to reuse,
where its daemons listen, how /etc/hosts is edited and that policy-rc.d never stays behind.

The refusals run the real up.sh on planted state folders (it stops before starting anything).
The /etc/hosts and policy-rc.d tests drive the same shell code on a temp file, with `mv`,
`dpkg-query` and `apt-get` replaced by fakes where a failure must be forced."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.slurm_cluster import DEVCLUSTER, SlurmCluster, _skip_reason

needs_root = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _up(state: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEVCLUSTER / "up.sh"), str(state)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _foreign_owner(state: Path) -> str:
    os.chown(state, 65534, 65534)
    return "owned by uid 65534, not root"


def _symlinked_log(state: Path) -> str:
    (state / "log").mkdir()
    (state / "log" / "slurmctld.log").symlink_to(state.parent / "elsewhere")
    return "contains a symlink"


def _foreign_file(state: Path) -> str:
    (state / "run").mkdir()
    (state / "run" / "slurmctld.pid").write_text("1\n")
    os.chown(state / "run" / "slurmctld.pid", 65534, 65534)
    return "contains a file root does not own"


def _world_writable(state: Path) -> str:
    state.chmod(0o777)
    return "others may write to it"


def _planted_key(state: Path) -> str:
    (state / "munge").mkdir()
    (state / "munge" / "munge.key").write_bytes(b"k" * 1024)
    return "munge.key was not created by up.sh"


@needs_root
@pytest.mark.parametrize(
    "plant", [_foreign_owner, _symlinked_log, _foreign_file, _world_writable, _planted_key]
)
def test_up_refuses_a_state_folder_it_did_not_make_before_starting_anything(
    tmp_path: Path, plant: Callable[[Path], str]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    needle = plant(state)
    before = sorted(p.relative_to(state) for p in state.rglob("*"))
    hosts = Path("/etc/hosts").read_bytes()
    key = state / "munge" / "munge.key"
    key_bytes = key.read_bytes() if key.exists() else None
    proc = _up(state)
    assert proc.returncode == 1, proc.stderr
    assert f"refusing STATE_DIR {state}" in proc.stderr and needle in proc.stderr, proc.stderr
    assert sorted(p.relative_to(state) for p in state.rglob("*")) == before  # nothing written
    assert Path("/etc/hosts").read_bytes() == hosts
    if key_bytes is not None:
        assert key.read_bytes() == key_bytes


@needs_root
def test_up_refuses_a_state_folder_that_is_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "state").symlink_to(tmp_path / "real")
    proc = _up(tmp_path / "state")
    assert proc.returncode == 1 and "it is a symlink" in proc.stderr, proc.stderr
    assert list((tmp_path / "real").iterdir()) == []


@pytest.mark.slurm
def test_every_daemon_listens_on_loopback_only_and_the_key_is_our_own(
    slurm_cluster: SlurmCluster,
) -> None:
    conf = slurm_cluster.conf.read_text()
    ports = [line.split("=")[1] for line in conf.splitlines() if line.startswith("SlurmctldPort")]
    ports += [w.split("=")[1] for w in conf.split() if w.startswith("Port=")]
    dbd = (slurm_cluster.state_dir / "slurmdbd.conf").read_text()
    ports += [line.split("=")[1] for line in dbd.splitlines() if line.startswith("DbdPort")]
    ports += [line.split("=")[1] for line in dbd.splitlines() if line.startswith("StoragePort")]
    assert len(ports) == 5
    out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    listening = {
        (a.rsplit(":", 1)[0], a.rsplit(":", 1)[1])
        for a in (ln.split()[3] for ln in out.splitlines())
    }
    for port in ports:
        addrs = {addr for addr, p in listening if p == port}
        assert addrs == {"127.0.0.1"}, (port, addrs)
    key = slurm_cluster.state_dir / "munge" / "munge.key"
    digest = subprocess.run(
        ["sha256sum"], stdin=key.open("rb"), capture_output=True, text=True, check=True
    ).stdout
    assert (key.parent / "munge.key.cot-hpc-sha256").read_text() == digest
    assert (key.stat().st_mode & 0o777) == 0o600


# --------------------------------------------------------------------------- /etc/hosts


def _hosts(tmp_path: Path, script: str, fake_mv: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COT_HPC_HOSTS_FILE": str(tmp_path / "hosts")}
    if fake_mv:  # a bind-mounted /etc/hosts: rename(2) over it fails with EBUSY
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "mv").write_text("#!/bin/sh\necho 'mv: Device or resource busy' >&2\nexit 1\n")
        (bin_dir / "mv").chmod(0o755)
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail; source "{DEVCLUSTER}/lib.sh"; {script}'],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )


OURS = "127.0.0.1 n1 n2 # cot-hpc-devcluster:/tmp/a"
LONGER = "127.0.0.1 n1 n2 # cot-hpc-devcluster:/tmp/ab"  # another cluster's: never touched


@pytest.mark.parametrize("bind_mount", [False, True])
def test_hosts_lines_are_added_and_removed_whole_and_exactly(
    tmp_path: Path, bind_mount: bool
) -> None:
    hosts = tmp_path / "hosts"
    base = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n" + LONGER + "\n"
    hosts.write_text(base.rstrip("\n"))  # no final newline: the added line still starts its own
    inode = hosts.stat().st_ino
    _hosts(tmp_path, f'hosts_add "{OURS}"; hosts_add "{OURS}"', bind_mount)
    assert hosts.read_text() == base + OURS + "\n"  # once, whole
    # A rename is one step: the file is replaced, never truncated (a bind mount: appended to).
    assert (hosts.stat().st_ino == inode) is bind_mount
    inode = hosts.stat().st_ino
    _hosts(tmp_path, f'hosts_remove "{OURS}"', bind_mount)
    assert hosts.read_text() == base  # the longer tag of /tmp/ab stays
    assert (hosts.stat().st_ino == inode) is bind_mount
    assert not [p.name for p in tmp_path.iterdir() if p.name not in {"hosts", "bin"}]


def test_hosts_remove_on_a_bind_mount_keeps_lines_added_after_ours(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{OURS}\n10.0.0.5 added-later\n")
    _hosts(tmp_path, f'hosts_remove "{OURS}"', fake_mv=True)
    assert hosts.read_text() == "127.0.0.1 localhost\n10.0.0.5 added-later\n"
    assert not (tmp_path / "hosts.cot-hpc.bak").exists()


# --------------------------------------------------------------------------- policy-rc.d


def _fake_apt(tmp_path: Path, apt_body: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")  # nothing is installed
    (bin_dir / "apt-get").write_text(
        f'#!/bin/sh\n[ -x "$COT_HPC_POLICY_RC_D" ] && echo "$1" >> "{tmp_path}/seen"\n' + apt_body
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "COT_HPC_POLICY_RC_D": str(tmp_path / "p")}


@needs_root
def test_policy_rc_d_is_removed_when_the_install_fails(tmp_path: Path) -> None:
    env = _fake_apt(tmp_path, "exit 100\n")
    proc = _up(tmp_path / "state", env)
    assert proc.returncode == 1 and "apt-get install failed" in proc.stderr, proc.stderr
    assert (tmp_path / "seen").read_text() == "update\n"  # it was in place during apt-get
    assert not (tmp_path / "p").exists()


@needs_root
def test_policy_rc_d_is_removed_when_up_is_killed_during_the_install(tmp_path: Path) -> None:
    env = _fake_apt(tmp_path, 'touch "$COT_HPC_POLICY_RC_D.running"; sleep 60\n')
    proc = subprocess.Popen(
        ["bash", str(DEVCLUSTER / "up.sh"), str(tmp_path / "state")],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        start_new_session=True,  # as Ctrl-C or timeout(1) signal the whole group
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "p.running").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    assert (tmp_path / "p").exists()
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert not (tmp_path / "p").exists()


@needs_root
def test_a_policy_rc_d_that_was_there_before_is_left_alone(tmp_path: Path) -> None:
    env = _fake_apt(tmp_path, "exit 100\n")
    (tmp_path / "p").write_text("#!/bin/sh\nexit 0\n")
    assert _up(tmp_path / "state", env).returncode == 1
    assert (tmp_path / "p").read_text() == "#!/bin/sh\nexit 0\n"
