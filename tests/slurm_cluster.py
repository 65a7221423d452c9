"""A private one-node Slurm cluster for the tests: Debian's slurmctld, slurmd and munge, started as root
from a configuration in a temporary folder (the node's CPUs oversubscribed so several tasks fit on
a small machine), on ports of its own, and shut down afterwards. ``make test`` installs the packages."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers import free_port

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "sinfo", "scontrol")


def unavailable_reason() -> str | None:
    missing = [d for d in DAEMONS if not shutil.which(d) and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; `make test` installs it as root)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    return None


def _config(root: Path, host: str) -> str:
    return "\n".join([
        "ClusterName=megolmo-test", f"SlurmctldHost={host}", f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
        "AuthInfo=cred_expire=5",  # a requeued job waits out the credential lifetime (default 120 s)
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "ReturnToService=2", "SlurmdParameters=config_overrides", "MpiDefault=none",
        f"NodeName={host} CPUs=8 State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8", ""])


def _ensure_munge() -> None:
    """munged must run for Slurm's authentication; the Debian package's key is used as it is."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    subprocess.run(["/usr/sbin/munged", "--force"], check=True, capture_output=True)


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        for sub in ("state", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.conf = root / "slurm.conf"
        self.conf.write_text(_config(root, socket.gethostname()))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> "SlurmCluster":
        _ensure_munge()
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([f"/usr/sbin/{daemon}"], env=self.env, check=True, capture_output=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the test Slurm node never became idle; see {self.root}/slurmctld.log")

    def stop(self) -> None:
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True)
        for pid_file in ("slurmctld.pid", "slurmd.pid"):
            path = self.root / pid_file
            deadline = time.monotonic() + 20
            while path.exists() and time.monotonic() < deadline:
                try:
                    os.kill(int(path.read_text()), 0)
                except (OSError, ValueError):
                    break
                time.sleep(0.2)
