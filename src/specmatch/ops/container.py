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
  sets HF_HUB_OFFLINE=1 so that no library tries a model hub;
- the base provides the lock's Python: the Python of the base's release (Debian, Ubuntu, the
  official python images; `BASE_PYTHON`) and the `python3.X` that %post installs must satisfy
  pyproject's `requires-python`, which CI tests (an Ubuntu 24.04 base offers 3.12 only);
- %environment overrides nothing the host or the binds provide: Apptainer builds a container's
  environment by emptying it, sourcing %environment, and only then restoring the host variables
  the image did not set ("Environment Variable Precedence" in Apptainer's user guide), so a value
  set there (even `${VAR:-default}`, whose `$VAR` is never the host's) wins over the job's. It
  may not set the package's settings (`SPECMATCH_*`, other than the image's own code version)
  or the folders the host decides (`HOST_VARIABLES`), and may not read a variable it has not
  set itself (other than PATH, LD_LIBRARY_PATH and HOME, which Apptainer sets first);
- every template variable (`{{ NAME }}`) has a default in %arguments, so a build without
  `--build-arg` works (and `render` substitutes them as `apptainer build` does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import SpecmatchError

# The Python 3 of each distribution release a base image can come from (its `python3` package).
BASE_PYTHON = {
    ("debian", "10"): "3.7", ("debian", "buster"): "3.7", ("debian", "11"): "3.9", ("debian", "bullseye"): "3.9",
    ("debian", "12"): "3.11", ("debian", "bookworm"): "3.11", ("debian", "13"): "3.13", ("debian", "trixie"): "3.13",
    ("ubuntu", "20.04"): "3.8", ("ubuntu", "focal"): "3.8", ("ubuntu", "22.04"): "3.10", ("ubuntu", "jammy"): "3.10",
    ("ubuntu", "24.04"): "3.12", ("ubuntu", "noble"): "3.12",
}
# Variables naming what the host or the job decides: the image must not set them (see above).
HOST_VARIABLES = {"HOME", "TMPDIR", "TORCH_HOME", "HF_HOME", "XDG_CACHE_HOME", "CUDA_VISIBLE_DEVICES"}
# The image's own identity, which only the image knows (provenance reads them there).
IMAGE_VARIABLES = {"SPECMATCH_GIT_COMMIT", "SPECMATCH_GIT_DIRTY"}
SET_BEFORE_ENVIRONMENT = {"PATH", "LD_LIBRARY_PATH", "HOME"}

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


def arguments(d: Definition) -> dict[str, str]:
    """The build arguments' defaults of the %arguments section (`NAME=value` lines)."""
    out = {}
    for line in _code_lines(d.sections.get("arguments", "")):
        name, sep, value = line.strip().partition("=")
        if sep:
            out[name.strip()] = value.strip()
    return out


_TEMPLATE = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def render(d: Definition, build_args: dict[str, str] | None = None) -> Definition:
    """The definition as `apptainer build` sees it: every `{{ NAME }}` replaced by its build
    argument (`--build-arg`), else its %arguments default."""
    values = {**arguments(d), **(build_args or {})}
    missing = sorted({m for body in d.sections.values() for m in _TEMPLATE.findall(body)} - set(values))
    if missing:
        raise SpecmatchError(f"{d.path}: template variables {missing} have no value (no %arguments default, no "
                             "build argument)")
    out = Definition(d.path, dict(d.header), {}, list(d.order))
    for name, body in d.sections.items():
        out.sections[name] = _TEMPLATE.sub(lambda m: values[m.group(1)], body)
    return out


def base_python(d: Definition) -> tuple[str | None, str]:
    """(Python version X.Y the base offers, what the base is) for a Debian, Ubuntu or official
    python base, by image name or debootstrap release; (None, why) when it cannot be told."""
    agent, base = d.header.get("bootstrap"), d.header.get("from", "")
    if agent == "debootstrap":
        release = d.header.get("osversion", "")
        for (dist, rel), py in BASE_PYTHON.items():
            if rel == release:
                return py, f"{dist} {release} (debootstrap)"
        return None, f"debootstrap release {release!r} is not one whose Python is known ({sorted(BASE_PYTHON)})"
    name = base.split("@")[0]
    repo, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "")
    short = repo.split("/")[-1]
    if short == "python":
        m = re.match(r"(\d+\.\d+)", tag)
        if m:
            return m.group(1), f"the official python image {base}"
    if short in ("debian", "ubuntu"):
        m = re.match(r"(\d+\.\d+|\d+|[a-z]+)", tag)
        key = m.group(1) if m else ""
        if short == "debian":
            key = key.split(".")[0]
        if (short, key) in BASE_PYTHON:
            return BASE_PYTHON[(short, key)], f"{short} {key}"
    m = re.search(r"(ubuntu|debian)(\d+\.\d+|\d+)", tag)  # e.g. nvidia/cuda:12.8.1-...-ubuntu24.04
    if m and (m.group(1), m.group(2)) in BASE_PYTHON:
        return BASE_PYTHON[(m.group(1), m.group(2))], f"{m.group(1)} {m.group(2)}"
    return None, f"cannot tell which Python the base {base!r} offers (a Debian, Ubuntu or python image is known)"


def required_python(root: Path | None = None) -> str:
    """pyproject's `requires-python` (the lock's Python, which CI tests)."""
    if root is not None and (root / "pyproject.toml").is_file():
        import tomllib

        spec = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {}).get("requires-python")
        if spec:
            return spec
    from importlib.metadata import metadata

    return metadata("specmatch")["Requires-Python"]


def _python_problems(d: Definition) -> list[str]:
    from packaging.specifiers import SpecifierSet

    spec = required_python(d.path.resolve().parent.parent)
    offered, what = base_python(d)
    if offered is None:
        return [f"base image: {what}"]
    problems = []
    if not SpecifierSet(spec).contains(f"{offered}.0"):
        problems.append(f"base image: {what} offers Python {offered}; the lock needs requires-python {spec!r}")
    for used in sorted(set(re.findall(r"\bpython(3\.\d+)\b", d.sections.get("post", "")))):
        if used != offered:
            problems.append(f"%post uses python{used}, which {what} does not offer (its Python is {offered})")
        elif not SpecifierSet(spec).contains(f"{used}.0"):
            problems.append(f"%post uses python{used}; the lock needs requires-python {spec!r}")
    return problems


def _environment_problems(body: str) -> list[str]:
    problems, defined = [], set(SET_BEFORE_ENVIRONMENT)
    for line in _code_lines(body):
        for name, value in re.findall(r"(?:^|[\s;])(?:export\s+)?([A-Za-z_]\w*)=(\S*)", line):
            for ref in re.findall(r"\$\{?([A-Za-z_]\w*)", value):
                if ref not in defined:
                    problems.append(f"%environment reads ${ref} in {line.strip()!r}: Apptainer empties the environment "
                                    "before %environment runs, so the host's value is never seen there")
            if (name.startswith("SPECMATCH_") and name not in IMAGE_VARIABLES) or name in HOST_VARIABLES:
                problems.append(f"%environment sets {name}: the image's value would override the host's and the "
                                "binds' (Apptainer restores host variables only where the image set none)")
            defined.add(name)
    return problems


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
    if agent == "debootstrap":
        problems += [f"header: no `{k}:` line (debootstrap needs it)" for k in ("OSVersion", "MirrorURL")
                     if k.lower() not in d.header]
    elif base is None:
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
    problems += _environment_problems(env)
    defaults = arguments(d)
    for name in sorted({m for body in d.sections.values() for m in _TEMPLATE.findall(body)} - set(defaults)):
        problems.append(f"template variable {{{{ {name} }}}} has no default in %arguments (a build without "
                        "--build-arg would fail)")
    if d.header.get("from") is not None or agent == "debootstrap":
        problems += _python_problems(d)
    if agent == "docker":  # spython parses docker bootstraps only ("Only docker is supported")
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
