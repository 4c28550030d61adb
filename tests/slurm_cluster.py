"""A single-node SLURM on localhost for the tests: munged, slurmctld and slurmd with a generated config in a temp
folder. Every daemon this starts is stopped by its pid; a munged that already ran is left running."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_KEY = Path("/etc/munge/munge.key")
START_SECONDS = 60  # liveness bound for a daemon to come up on a loaded machine


def missing_reason() -> str | None:
    """Why a local SLURM cannot start here (None when it can)."""
    tools = ["slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol"]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"needs SLURM and munge ({', '.join(missing)} not found; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a local SLURM needs root (munged runs as the munge user, slurmd as root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no munge user (install the munge package)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_conf(folder: Path, host: str, cpus: int) -> str:
    """One node (this host) with ``cpus`` CPUs; spool, state, pids and logs under ``folder``."""
    return f"""\
ClusterName=xlbaketest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=120
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@contextmanager
def munge() -> Iterator[None]:
    """munged as the munge user (its key made if missing), unless one already answers; stopped if started here."""
    if MUNGE_SOCKET.exists() and subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        yield
        return
    user = pwd.getpwnam("munge")
    for folder in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge")):
        folder.mkdir(parents=True, exist_ok=True)
        os.chown(folder, user.pw_uid, user.pw_gid)
    if not MUNGE_KEY.exists():
        keygen = shutil.which("mungekey")
        command = [keygen, "--create"] if keygen else [shutil.which("create-munge-key") or "create-munge-key"]
        subprocess.run(command, check=True, capture_output=True)
        os.chown(MUNGE_KEY, user.pw_uid, user.pw_gid)
    pid_file = Path("/run/munge/munged.pid")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, capture_output=True)  # forks itself
    try:
        _wait_for(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, "munged")
        yield
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


@contextmanager
def slurm_cluster(folder: Path) -> Iterator[dict[str, str]]:
    """A running one-node SLURM; yields the environment (SLURM_CONF) its clients need."""
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, host, os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen] = []
    with munge():
        try:
            for command in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", host]):
                daemons.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_for(lambda: _node_state(env) == "idle", f"the node {host} (see {folder}/*.log)")
            yield {"SLURM_CONF": str(conf)}
        finally:
            for daemon in reversed(daemons):
                daemon.terminate()
            for daemon in reversed(daemons):
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()


def _node_state(env: dict[str, str]) -> str:
    done = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def _wait_for(ready, what: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {START_SECONDS} s")
        time.sleep(0.5)
