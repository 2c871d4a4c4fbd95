"""Build an Apptainer definition's root file system the way `apptainer build` does, without
Apptainer (none can be installed here): the base root, the %files copied, %post run in a chroot,
the %environment / %runscript / %test scripts written where Apptainer puts them
(`/.singularity.d/`), then %test and a stage run in that root as `apptainer test` / `run` would.

What differs from a real `apptainer build` (docs/cluster.md repeats it):
- The base root. A `Bootstrap: docker` base `debian:<N>...` is built by Debian's `debootstrap
  --variant=minbase` of release N from Debian's archive, not pulled from Docker Hub: the Docker
  image is made from the same archive (debuerreotype, a minbase debootstrap; `-slim` also drops
  documentation), so the packages and Python are Debian's, possibly at a newer point release
  than the tag's. `Bootstrap: debootstrap` is exactly this step. Like Apptainer's cache of pulled
  layers, the base root is kept (as a tarball, per release, in ~/.cache/specmatch/chroot-base).
- pip. %post runs with this machine's pip configuration and local package folders offered
  (bound read-only at their paths, its certificate authority for PyPI), as `make` installs the
  lock here; a real build downloads every wheel from PyPI. The wheels are the same files.
- Isolation. %post runs as root in a chroot inside a private mount namespace (`unshare -m`)
  with /proc, /sys and /dev mounted and the host's resolv.conf, not in Apptainer's container;
  no SIF is written (squashfs) and nothing is signed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from specmatch.ops import container

DEBIAN_RELEASES = {"10": "buster", "11": "bullseye", "12": "bookworm", "13": "trixie"}
MIRROR = "http://deb.debian.org/debian"
BASE_CACHE = Path.home() / ".cache" / "specmatch" / "chroot-base"
# What this machine's pip reads and where its local package folders are.
PIP_CONFIGS = ("/etc/pip.conf", "/etc/xdg/pip", "/root/.config/pip")
PACKAGE_FOLDERS = ("/opt/wheels", "/opt/pypi", "/opt/pypi-more")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> str | None:
    """Why no root file system can be built here, or None."""
    if os.geteuid() != 0:
        return "building a root file system in a chroot needs root"
    missing = [b for b in ("debootstrap", "chroot", "unshare", "mount") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install debootstrap)"
    return None


def release_of(d: container.Definition) -> str:
    """The Debian release a definition's base comes from."""
    if d.header.get("bootstrap") == "debootstrap":
        return d.header["osversion"]
    tag = d.header.get("from", "").split("@")[0].rpartition(":")[2]
    if not d.header.get("from", "").split(":")[0].endswith("debian"):
        raise ValueError(f"{d.path}: the chroot build knows Debian bases only, not {d.header.get('from')!r}")
    number = tag.split("-")[0].split(".")[0]
    return DEBIAN_RELEASES.get(number, number)


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.times: dict[str, float] = {}

    def run(self, what: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        t0 = time.perf_counter()
        with open(self.path, "a") as f:
            f.write(f"\n=== {what}: {' '.join(cmd)[:300]}\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
        self.times[what] = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = self.path.read_text()[-5000:]
            raise AssertionError(f"{what} failed ({proc.returncode}):\n{tail}")
        return proc

    def output(self, what: str) -> str:
        text = self.path.read_text()
        return text[text.rindex(f"=== {what}:"):]


def base_root(release: str, root: Path, log: Log) -> None:
    """Debian `release` (minbase) at `root`, from the kept tarball or debootstrap."""
    tarball = BASE_CACHE / f"{release}-minbase.tar"
    if not tarball.is_file():
        build = root.with_name(root.name + "-debootstrap")
        log.run("debootstrap", ["debootstrap", "--variant=minbase", release, str(build), MIRROR])
        BASE_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = tarball.with_suffix(f".{os.getpid()}.tmp")
        log.run("keep the base", ["tar", "-C", str(build), "-cf", str(tmp), "."])
        os.replace(tmp, tarball)
        shutil.rmtree(build)
    root.mkdir(parents=True)
    log.run("unpack the base", ["tar", "-C", str(root), "-xpf", str(tarball)])


def copy_files(d: container.Definition, context: Path, root: Path) -> None:
    """%files: each `src dst` line, src relative to the build context (the repository root)."""
    for line in container._code_lines(d.sections.get("files", "")):
        src, dst = line.split()[:2]
        target = root / dst.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if (context / src).is_dir():
            shutil.copytree(context / src, target, symlinks=True)
        else:
            shutil.copy2(context / src, target)


def _in_root(root: Path, script: str, env: dict[str, str], binds: tuple[str, ...] = (), cwd: str = "/",
             writable: tuple[str, ...] = ()) -> list[str]:
    """A command running `script` with `/bin/sh -e` in the chroot `root` with exactly the
    environment `env`, inside a private mount namespace (the mounts vanish with it) with /proc,
    /sys, /dev and the given host folders mounted at their own paths (`binds` read-only,
    `writable` as they are)."""
    import shlex

    steps = root / ".build"
    steps.mkdir(exist_ok=True)
    name = f"step-{len(list(steps.iterdir())):02d}.sh"
    (steps / name).write_text(f"cd {shlex.quote(cwd)}\n{script}")
    r = shlex.quote(str(root))
    mounts = [f"mount -t proc proc {r}/proc", f"mount --rbind /sys {r}/sys", f"mount --rbind /dev {r}/dev"]
    for b in binds + writable:
        rb = shlex.quote(f"{root}{b}")
        mounts += [f"mkdir -p {rb}", f"mount --bind {shlex.quote(b)} {rb}"]
        if b in binds:
            mounts.append(f"mount -o remount,ro,bind {rb}")
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-e", "-c",
            "; ".join(mounts) + '; exec chroot "$0" /usr/bin/env -i "$@"', str(root),
            *[f"{k}={v}" for k, v in env.items()], "/bin/sh", "-e", f"/.build/{name}"]


def build(definition: Path, context: Path, root: Path, log: Log,
          build_args: dict[str, str] | None = None) -> container.Definition:
    """The root file system of `definition` at `root` (see the module's note for what differs
    from `apptainer build`). Returns the rendered definition."""
    d = container.render(container.parse(definition), build_args)
    base_root(release_of(d), root, log)
    for f in ("/etc/resolv.conf", "/etc/hosts"):  # the build's network, as Apptainer binds them
        shutil.copy2(f, root / f.lstrip("/"))
    for c in PIP_CONFIGS:
        if Path(c).is_dir():
            shutil.copytree(c, root / c.lstrip("/"), dirs_exist_ok=True)
        elif Path(c).is_file():
            (root / c.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(c, root / c.lstrip("/"))
    # This machine reaches PyPI through its own certificate authority (the host's bundle, which
    # pip's `cert` names): %post's `apt-get install ca-certificates` rewrites the root's bundle,
    # so pip is pointed at a copy of the host's.
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_ca.is_file():
        shutil.copy2(host_ca, root / "etc" / "host-ca-certificates.crt")
        for conf in [root / c.lstrip("/") for c in PIP_CONFIGS]:
            for f in ([conf] if conf.is_file() else sorted(conf.glob("*.conf")) if conf.is_dir() else []):
                f.write_text(re.sub(r"(?m)^(\s*cert\s*=).*$", r"\1 /etc/host-ca-certificates.crt", f.read_text()))
    copy_files(d, context, root)
    env_dir = root / ".singularity.d" / "env"
    env_dir.mkdir(parents=True)
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "APPTAINER_ROOTFS": "/",
           "APPTAINER_ENVIRONMENT": "/.singularity.d/env/91-environment.sh"}
    binds = tuple(p for p in PACKAGE_FOLDERS if Path(p).is_dir())
    log.run("%post", _in_root(root, d.sections["post"], env, binds))
    (env_dir / "90-environment.sh").write_text("#!/bin/sh\n" + d.sections.get("environment", ""))
    for name in ("runscript", "test"):
        path = root / ".singularity.d" / name
        path.write_text("#!/bin/sh\n" + d.sections.get(name, ""))
        path.chmod(0o755)
    return d


def container_env(host: dict[str, str], root: Path, image: str) -> dict[str, str]:
    """The environment Apptainer gives a container process (emptied, %environment sourced, the
    host's variables restored where the image set none), computed in the root."""
    out = subprocess.run(["chroot", str(root), "/usr/bin/env", "-i", f"PATH={DEFAULT_PATH}",
                          f"HOME={host.get('HOME', '/root')}", "/bin/sh", "-c",
                          ". /.singularity.d/env/90-environment.sh && env"], capture_output=True, text=True,
                         check=True)
    env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    for k in ("PWD", "SHLVL", "_"):
        env.pop(k, None)
    for k, v in host.items():
        if k not in env and k not in ("PATH", "LD_LIBRARY_PATH"):
            env[k] = v
    env.update(APPTAINER_CONTAINER=image, APPTAINER_NAME=Path(image).name)
    return env


def run_in_root(root: Path, script: str, env: dict[str, str], log: Log, what: str, binds: tuple[str, ...] = (),
                cwd: str = "/", writable: tuple[str, ...] = ()) -> str:
    log.run(what, _in_root(root, script, env, binds, cwd, writable))
    return log.output(what)
