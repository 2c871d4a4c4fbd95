"""A real one-node SLURM cluster for the tests, started from Debian's slurm-wlm and munge
packages (CI installs them; see .ci/run) and torn down afterwards.

Everything lives in a temporary folder: munged runs as the munge user with its socket, key, log
and pid there; slurmctld and slurmd use a slurm.conf there, linked from /etc/slurm/slurm.conf
because the job-step plugin clears SLURM_CONF inside jobs. The node has `cpus` CPUs and two
fake GPUs (character devices standing in for /dev/nvidia*), so `--gpus=1` is scheduled and sets
CUDA_VISIBLE_DEVICES as on a GPU node. No accounting daemon: status comes from squeue, which
keeps finished jobs for MinJobAge seconds.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

PARTITION = "gpu"  # the partition name slurm/config.yaml submits to
DAEMONS = ("munged", "slurmctld", "slurmd")
ETC = Path("/etc/slurm")
# One test cluster per machine at a time (the daemons' ports and /etc/slurm are global): held
# from start to stop, so a second test session skips instead of breaking the first one's jobs.
LOCK = Path(tempfile.gettempdir()) / "specmatch-slurm.lock"


def unavailable() -> str | None:
    """Why no cluster can be started here, or None."""
    missing = [b for b in (*DAEMONS, "mungekey", "sbatch", "squeue", "scontrol") if shutil.which(b) is None]
    if missing:
        return f"SLURM/munge binaries not installed ({', '.join(missing)}; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    if (ETC / "slurm.conf").exists() and not (ETC / "slurm.conf").is_symlink():
        return "/etc/slurm/slurm.conf exists: this machine has its own SLURM configuration"
    running = subprocess.run(["pgrep", "-x", "slurmctld|slurmd"], capture_output=True, text=True).stdout.split()
    if running:
        return f"SLURM daemons already run on this machine (pids {' '.join(running)})"
    return None


def orphan() -> Path | None:
    """The folder of a test cluster left running by a test session that was killed (its
    daemons run, per the pid files in the folder /etc/slurm/slurm.conf links to, while no
    session holds LOCK), or None. A session attaches to it instead of starting its own."""
    link = ETC / "slurm.conf"
    if not link.is_symlink():
        return None
    d = Path(os.readlink(link)).parent
    if not d.name.startswith("specmatch-slurm-"):
        return None
    for name in ("slurmctld.pid", "slurmd.pid"):
        try:
            os.kill(int((d / name).read_text().split()[0]), 0)
        except (OSError, ValueError, IndexError):
            return None
    with open(LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a live session owns it
    return d


class Busy(RuntimeError):
    """Another test session holds the machine's test cluster."""


def _conf(d: Path, cpus: int, mem_mb: int, munge_socket: Path) -> str:
    return "\n".join([
        "ClusterName=specmatch-test",
        "SlurmctldHost=localhost",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={d}/state",
        f"SlurmdSpoolDir={d}/spool",
        f"SlurmctldPidFile={d}/slurmctld.pid",
        f"SlurmdPidFile={d}/slurmd.pid",
        f"SlurmctldLogFile={d}/slurmctld.log",
        f"SlurmdLogFile={d}/slurmd.log",
        "SlurmctldPort=6817",
        "SlurmdPort=6818",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "MpiDefault=none",
        "ReturnToService=2",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        # Finished jobs stay visible to squeue (the profile's status command) and scontrol.
        "MinJobAge=7200",
        "KillWait=30",
        "GresTypes=gpu",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} Gres=gpu:2",
        f"PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


class LocalSlurm:
    def __init__(self, cpus: int | None = None, mem_mb: int | None = None) -> None:
        self.cpus = cpus or os.cpu_count() or 2
        # slurmd drains a node that claims more memory than it has.
        total = next(int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:"))
        self.mem_mb = mem_mb or min(16000, int(total * 0.8))
        self.dir: Path | None = None
        self._links: list[Path] = []
        self._lock = None
        self._controller = False
        self.attached: Path | None = None

    def _run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60, **kw)

    def _take_lock(self) -> None:
        """Hold the machine-wide lock of the test cluster, or raise Busy."""
        self._lock = open(LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise Busy(f"another test session runs the local SLURM cluster ({LOCK} is locked)") from None

    def start(self) -> "LocalSlurm":
        self._take_lock()
        d = self.dir = Path(tempfile.mkdtemp(prefix="specmatch-slurm-"))
        d.chmod(0o755)  # the munge user must traverse it
        try:
            for sub in ("state", "spool", "dev"):
                (d / sub).mkdir()
            munge = d / "munge"
            munge.mkdir(mode=0o700)
            key = munge / "munge.key"
            self._run("mungekey", "-c", "-k", str(key))
            shutil.chown(munge, "munge", "munge")
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
            self.munge_socket = munge / "munge.socket"
            self._run("runuser", "-u", "munge", "--", "munged", f"--socket={self.munge_socket}",
                      f"--key-file={key}", f"--log-file={munge}/munged.log", f"--pid-file={munge}/munged.pid",
                      f"--seed-file={munge}/munged.seed", "--force")
            for i in range(2):
                os.mknod(d / "dev" / f"nvidia{i}", 0o666 | 0o020000, os.makedev(1, 3))
            (d / "slurm.conf").write_text(_conf(d, self.cpus, self.mem_mb, self.munge_socket))
            (d / "gres.conf").write_text(f"AutoDetect=off\nNodeName=localhost Name=gpu File={d}/dev/nvidia[0-1]\n")
            ETC.mkdir(parents=True, exist_ok=True)
            for name in ("slurm.conf", "gres.conf"):
                link = ETC / name
                if link.is_symlink():
                    link.unlink()
                link.symlink_to(d / name)
                self._links.append(link)
            self._run("slurmctld")
            self._controller = True
            self._run("slurmd", "-N", "localhost")
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def attach(self, folder: Path) -> "LocalSlurm":
        """Use the orphaned test cluster in `folder` (see `orphan`) for this session, holding the
        lock; `stop` then releases the lock and leaves its daemons as they were found."""
        self._take_lock()
        self.attached = folder
        self._wait_idle()
        return self

    def _wait_idle(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        state = ""
        while time.monotonic() < end:
            p = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
            state = p.stdout.strip()
            if p.returncode == 0 and state == "idle":
                return
            time.sleep(0.5)
        folder = self.dir or self.attached
        logs = "".join(f"\n--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(folder.glob("*.log")))
        raise RuntimeError(f"the SLURM node did not become idle (state {state!r}){logs}")

    def stop(self) -> None:
        if self.attached is not None:  # not ours: only the lock is released
            self.attached = None
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            return
        if self.dir is None:
            return
        if self._controller:  # never cancel jobs of a controller this instance did not start
            subprocess.run(["scancel", "--full", "--user=root"], capture_output=True)
        for pid_file in (self.dir / "slurmd.pid", self.dir / "slurmctld.pid", self.dir / "munge" / "munged.pid"):
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, 15)
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for link in self._links:
            if link.is_symlink() and Path(os.readlink(link)).parent == self.dir:
                link.unlink()
        self._links = []
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
        self._controller = False
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (finished ones for MinJobAge), as `scontrol show job`
        fields."""
        p = self._run("scontrol", "show", "job", "--oneliner")
        out = []
        for line in p.stdout.splitlines():
            if not line.strip() or line.startswith("No jobs"):
                continue
            fields = {}
            for tok in line.split():
                k, _, v = tok.partition("=")
                fields[k] = v
            out.append(fields)
        return out
