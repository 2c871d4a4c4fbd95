"""`specmatch container check`: validate Apptainer definition files before a build.

spython parses definition files but does not validate them: a misspelled section parses
silently and is then ignored by the build (as measured with Apptainer 1.3). So the file is parsed twice: by
spython (what the ecosystem reads: its recipe must have the base image we read) and by the
section grammar of Apptainer's definition files, on which our own rules run:

- header: `Bootstrap:` of a known agent and `From:`;
- base image pinned: a digest (`@sha256:...`), or a tag carrying a version number (not
  `latest`, not missing);
- sections: only Apptainer's own (a misspelling is named), and the ones a pipeline image
  needs: %post, %environment, %labels, %runscript, %test;
- %labels carries a version equal to the package's;
- %post installs the pinned requirements (requirements/lock.txt);
- no network at run time: %runscript, %startscript, %environment and %test may not download
  (curl, wget, pip install, git clone, apt-get, model-hub downloads, URLs), and %environment
  sets HF_HUB_OFFLINE=1 so that no library tries a model hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import SpecmatchError

BOOTSTRAP_AGENTS = {"docker", "docker-daemon", "docker-archive", "library", "localimage", "oras", "shub",
                    "debootstrap", "yum", "zypper", "busybox", "scratch"}
# Apptainer's definition-file sections (the %app* ones belong to SCIF apps).
SECTIONS = {"setup", "files", "post", "environment", "runscript", "startscript", "test", "labels", "help",
            "arguments", "appfiles", "appinstall", "appenv", "apprun", "applabels", "apptest", "apphelp",
            "appstart"}
REQUIRED = ("post", "environment", "labels", "runscript", "test")
RUNTIME = ("runscript", "startscript", "environment", "test")
NETWORK = [
    (re.compile(r"\bcurl\b"), "curl"), (re.compile(r"\bwget\b"), "wget"),
    (re.compile(r"\bpip3?(\.\d+)?\s+(install|download)\b|-m\s+pip\s+(install|download)\b"), "pip install"),
    (re.compile(r"\bgit\s+(clone|fetch|pull)\b"), "git clone/fetch"), (re.compile(r"\bapt(-get)?\s+install\b"), "apt"),
    (re.compile(r"huggingface-cli\s+download|hf_hub_download|snapshot_download|torch\.hub\.load"), "a model-hub download"),
    (re.compile(r"https?://"), "a URL"),
]
VERSION_LABELS = ("org.opencontainers.image.version", "version", "Version")


@dataclass
class Definition:
    path: Path
    header: dict[str, str] = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)


def parse(path: str | Path) -> Definition:
    """Header keys and section bodies of a definition file (Apptainer's grammar: `Key: value`
    lines before the first `%section` line; a section runs to the next one)."""
    path = Path(path)
    if not path.is_file():
        raise SpecmatchError(f"{path}: no such definition file")
    d = Definition(path)
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        m = re.match(r"^%(\w+)\b(.*)$", line)
        if m:
            current = m.group(1)
            d.order.append(current)
            d.sections.setdefault(current, "")
            continue
        if current is None:
            if line and not line.startswith("#"):
                key, sep, value = line.partition(":")
                if sep:
                    d.header[key.strip().lower()] = value.strip()
            continue
        d.sections[current] += raw + "\n"
    return d


def _pinned(image: str) -> str | None:
    """Why a base image reference is not pinned, or None."""
    if "@sha256:" in image:
        return None if re.search(r"@sha256:[0-9a-f]{64}$", image) else f"malformed digest in {image!r}"
    name = image.split("/")[-1]
    if ":" not in name:
        return f"{image!r} has no tag (it would float to :latest)"
    tag = name.rsplit(":", 1)[1]
    if tag in ("latest", "stable", "main", "master", "nightly") or not re.search(r"\d", tag):
        return f"{image!r}: tag {tag!r} is not a version"
    return None


def _labels(body: str) -> dict[str, str]:
    out = {}
    for line in body.splitlines():
        parts = line.strip().split(None, 1)
        if parts and not parts[0].startswith("#"):
            out[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    return out


def _code_lines(body: str) -> list[str]:
    return [ln for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def check(path: str | Path, version: str = __version__) -> list[str]:
    """Every problem of a definition file (empty when it passes)."""
    d = parse(path)
    problems: list[str] = []
    agent = d.header.get("bootstrap")
    if agent is None:
        problems.append("header: no `Bootstrap:` line")
    elif agent not in BOOTSTRAP_AGENTS:
        problems.append(f"header: unknown bootstrap agent {agent!r}")
    base = d.header.get("from")
    if base is None:
        problems.append("header: no `From:` line (the base image)")
    elif agent in ("docker", "library", "oras", "shub"):
        why = _pinned(base)
        if why:
            problems.append(f"header: base image not pinned: {why}")
    for name in d.order:
        if name not in SECTIONS:
            close = [s for s in SECTIONS if _similar(name, s)]
            problems.append(f"section %{name} is not an Apptainer section (it would be ignored)"
                            + (f"; did you mean %{close[0]}?" if close else ""))
    for name in {n for n in d.order if d.order.count(n) > 1}:
        problems.append(f"section %{name} appears {d.order.count(name)} times")
    for name in REQUIRED:
        if name not in d.sections:
            problems.append(f"section %{name} is missing")
        elif not _code_lines(d.sections[name]):
            problems.append(f"section %{name} is empty")
    labels = _labels(d.sections.get("labels", ""))
    found = [labels[k] for k in VERSION_LABELS if k in labels]
    if "labels" in d.sections and not found:
        problems.append(f"%labels: no version label (one of {', '.join(VERSION_LABELS)})")
    elif found and found[0] != version:
        problems.append(f"%labels: version {found[0]!r} differs from the package's {version!r}")
    if "post" in d.sections and not re.search(r"pip\s+install\b[^\n]*-r\s+\S*requirements/lock[\w.-]*\.txt",
                                              d.sections["post"]):
        problems.append("%post does not install the pinned requirements (requirements/lock.txt)")
    for name in RUNTIME:
        for line in _code_lines(d.sections.get(name, "")):
            for rx, what in NETWORK:
                if rx.search(line):
                    problems.append(f"%{name} uses the network at run time ({what}): {line.strip()}")
    env = d.sections.get("environment", "")
    if "environment" in d.sections and not re.search(r"\bHF_HUB_OFFLINE=1\b", env):
        problems.append("%environment does not set HF_HUB_OFFLINE=1")
    problems += _spython_view(d)
    return problems


def _similar(a: str, b: str) -> bool:
    """One edit apart, or a transposition (what a typo looks like)."""
    if a == b:
        return False
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def _spython_view(d: Definition) -> list[str]:
    """What spython (the ecosystem's parser) reads must agree with our reading."""
    try:
        from spython.main.parse.parsers import SingularityParser
    except ImportError as e:  # pragma: no cover - spython is a pinned dependency
        return [f"spython is not installed ({e}); install the pinned requirements"]
    try:
        recipes = SingularityParser(str(d.path)).recipe  # {stage name: Recipe}
    except Exception as e:  # spython raises bare exceptions on malformed files
        return [f"spython cannot parse the file: {e}"]
    if not recipes:
        return ["spython finds no recipe in the file"]
    recipe = list(recipes.values())[-1]
    problems = []
    base = d.header.get("from")
    if base is not None and recipe.fromHeader != base:
        problems.append(f"spython reads the base image as {recipe.fromHeader!r}, not {base!r}")
    if "test" in d.sections and _code_lines(d.sections["test"]) and not recipe.test:
        problems.append("spython reads no %test section")
    return problems


# The folders a rule reads and writes besides the code: on a cluster they are often symlinks to
# shared storage outside the repository, which the container does not see unless bound.
BIND_FOLDERS = ("data", "resources", "results")


def binds(root: str | Path = ".", folders: tuple[str, ...] = BIND_FOLDERS) -> list[str]:
    """Apptainer bind specifications for the folders of `root` that exist: `real:path` where the
    folder resolves elsewhere (a symlink to shared storage), else the path itself. The
    repository is the working directory of every rule, so each is bound at the path the rules
    use."""
    root = Path(root).absolute()
    out = []
    for name in folders:
        path = root / name
        if not path.exists():
            continue
        real = path.resolve()
        out.append(str(path) if real == path else f"{real}:{path}")
    return out
