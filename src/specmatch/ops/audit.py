"""`specmatch audit <artefact>`: the lineage of a result, re-verified down to raw data and weights.

Every stage output folder holds `provenance.json` (runtime/provenance.py): its output files with
their sha256, and its inputs, each either another stage's output (identified by the sha256 of
that folder's own record), a plain file (pretrained weights: its sha256) or a plain folder (the
digest of its files). The audit starts at the folder of the artefact (a table, a figure, a
checkpoint, any file in a stage folder, or the folder itself) and walks the inputs depth first:

- every output file of every record is re-hashed: `missing` or `modified` if it is gone or
  differs, `unrecorded` if a file is there that the record does not list;
- every input is checked against what the consumer recorded: a stage input whose record has
  changed since is `stale` (it was re-made after the consumer ran), a file or folder input that
  differs is `modified`, one that is gone is `missing`;
- optionally, `dvc status` is asked whether dvc.lock still describes the stage outputs (when
  the repository has a dvc.lock): a stage it reports changed is `stale (dvc.lock)`.

Paths in records are relative to the repository root the stages ran from. Each record names
its own folder relative to that root (`outputs.path`), so the root is found from the artefact
itself when `--root` (default: the working folder) does not hold it: run from anywhere, the
audit reads the records where they are (`find_root`). Exit status 0 when everything verifies,
1 with every problem named otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SpecmatchError
from ..runtime.hashing import hash_tree, sha256_file, tree_digest
from ..runtime.provenance import RECORD_NAME


@dataclass
class Node:
    """One stage output folder of the lineage."""

    path: str
    stage: str = "?"
    run: str = "?"
    role: str = "artefact"
    files: int = 0
    problems: list[str] = field(default_factory=list)
    inputs: list["Node | Leaf"] = field(default_factory=list)
    seen_before: bool = False


@dataclass
class Leaf:
    """A raw input: a file (pretrained weights, a source file) or a plain folder."""

    path: str
    role: str
    kind: str
    problems: list[str] = field(default_factory=list)


def stage_folder(artefact: str | os.PathLike) -> Path:
    """The stage output folder an artefact belongs to (itself or its nearest ancestor with a
    provenance record)."""
    p = Path(artefact)
    if not p.exists():
        raise SpecmatchError(f"{artefact}: no such file or folder")
    for cand in ([p] if p.is_dir() else []) + list(p.parents)[:4]:
        if (cand / RECORD_NAME).is_file():
            return cand
    raise SpecmatchError(f"{artefact}: not in a stage output folder (no {RECORD_NAME} in it or in its parents); "
                         "only outputs of `specmatch` stages can be audited")


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _marked_root(folder: Path) -> Path | None:
    """The nearest folder above `folder` holding dvc.yaml or a Snakefile (a repository root)."""
    for cand in folder.absolute().parents:
        if (cand / "dvc.yaml").is_file() or (cand / "Snakefile").is_file():
            return cand
    return None


def find_root(folder: str | os.PathLike, root: str | os.PathLike = ".") -> tuple[Path, str | None]:
    """(the root the records of stage folder `folder` are relative to, a note when it is not
    `root`). A record's `outputs.path` is its folder as the stage saw it from the root it ran in:
    `root` is kept when that path leads back to `folder` from it; otherwise the root is the
    folder with that path taken off its end, or, for a record with an absolute path, the nearest
    folder above with dvc.yaml or a Snakefile."""
    folder, root = Path(folder), Path(root)
    try:
        recorded = json.loads((folder / RECORD_NAME).read_text()).get("outputs", {}).get("path")
    except (OSError, json.JSONDecodeError, AttributeError):
        recorded = None  # the audit reports the unreadable record itself
    if not isinstance(recorded, str) or not recorded:
        return root, None
    rel = Path(recorded)
    if rel.is_absolute():
        if (root / "dvc.yaml").is_file() or (root / "Snakefile").is_file():
            return root, None
        found = _marked_root(folder)
        return (root, None) if found is None else (found, f"records read from the repository root {found}")
    if _same_folder(root / rel, folder):
        return root, None
    for base in (folder.absolute(), folder.resolve()):
        if len(base.parts) > len(rel.parts) and base.parts[-len(rel.parts):] == rel.parts:
            cand = Path(*base.parts[:-len(rel.parts)])
            if _same_folder(cand / rel, folder):
                return cand, f"records read from the repository root {cand} (where {recorded} was written)"
    raise SpecmatchError(
        f"{folder / RECORD_NAME}: its folder was written as {recorded!r} relative to the root the stage ran "
        f"from, but {root.absolute() / rel} is not this folder and {folder} does not end with that path "
        f"(moved?); pass that root as --root (the folder that holds {rel.parts[0]}/)")


class Auditor:
    def __init__(self, root: str | os.PathLike = "."):
        self.root = Path(root)
        self._nodes: dict[str, Node] = {}

    def _resolve(self, recorded: str) -> Path:
        p = Path(recorded)
        return p if p.is_absolute() else self.root / p

    def node(self, folder: Path, role: str = "artefact") -> Node:
        key = str(folder.resolve())
        if key in self._nodes:  # a shared ancestor (the dataset of several runs) is verified once
            prev = self._nodes[key]
            return Node(prev.path, prev.stage, prev.run, role, prev.files, [], [], seen_before=True)
        node = Node(self._display(folder), role=role)
        self._nodes[key] = node
        try:
            rec = json.loads((folder / RECORD_NAME).read_text())
        except (OSError, json.JSONDecodeError) as e:
            node.problems.append(f"unreadable {RECORD_NAME}: {e}")
            return node
        node.stage, node.run = rec.get("stage", "?"), rec.get("run", "?")
        recorded = rec.get("outputs", {}).get("files", {})
        node.files = len(recorded)
        present = hash_tree(folder, exclude=(RECORD_NAME,))
        for name, digest in sorted(recorded.items()):
            if name not in present:
                node.problems.append(f"missing: {self._display(folder / name)}")
            elif present[name] != digest:
                node.problems.append(f"modified: {self._display(folder / name)} (sha256 {present[name][:16]}, "
                                     f"recorded {digest[:16]})")
        for name in sorted(set(present) - set(recorded)):
            node.problems.append(f"unrecorded: {self._display(folder / name)} (not in the record)")
        for inp in rec.get("inputs", []):
            node.inputs.append(self._input(inp))
        return node

    def _input(self, inp: dict[str, Any]) -> Node | Leaf:
        path, role, kind = self._resolve(inp["path"]), inp.get("role", "?"), inp.get("kind", "?")
        if kind == "stage-output":
            record = path / RECORD_NAME
            if not record.is_file():
                return Leaf(inp["path"], role, kind, [f"missing: {inp['path']} (a {role} input, no {RECORD_NAME})"])
            child = self.node(path, role)
            if sha256_file(record) != inp.get("provenance_sha256"):
                child.problems = child.problems + [
                    f"stale: {inp['path']} was re-made after its consumer used it (its {RECORD_NAME} changed)"]
            return child
        leaf = Leaf(inp["path"], role, kind)
        if kind == "file":
            if not path.is_file():
                leaf.problems.append(f"missing: {inp['path']} ({role})")
            elif sha256_file(path) != inp.get("sha256"):
                leaf.problems.append(f"modified: {inp['path']} ({role}; sha256 differs from the record)")
        elif kind == "folder":
            if not path.is_dir():
                leaf.problems.append(f"missing: {inp['path']} ({role})")
            elif tree_digest(hash_tree(path)) != inp.get("sha256"):
                leaf.problems.append(f"modified: {inp['path']} ({role}; its files differ from the record)")
        return leaf

    def _display(self, p: Path) -> str:
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return p.as_posix()


def dvc_stale_paths(root: Path) -> tuple[list[str], str | None]:
    """Output paths of the stages `dvc status` reports changed (empty when dvc.lock is absent);
    and a note when DVC could not be asked."""
    if not (root / "dvc.lock").is_file():
        return [], None
    try:
        proc = subprocess.run(["dvc", "status", "--json"], cwd=root, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return [], f"dvc.lock not cross-checked: {e}"
    if proc.returncode != 0:
        return [], f"dvc.lock not cross-checked: dvc status failed: {proc.stderr.strip()[-300:]}"
    status = json.loads(proc.stdout or "{}")
    lock = _load_yaml(root / "dvc.lock")
    stale = []
    for stage in status:
        outs = (lock.get("stages", {}).get(stage.split(":")[-1]) or {}).get("outs", [])
        stale += [str(o["path"]).rstrip("/") for o in outs]
    return stale, None


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def walk(node: Node | Leaf):
    yield node
    if isinstance(node, Node):
        for child in node.inputs:
            yield from walk(child)


def audit(artefact: str | os.PathLike, root: str | os.PathLike = ".", dvc: bool = True) -> tuple[Node, list[str]]:
    """(lineage tree, every problem found). `root`: where the records' relative paths start
    (default the working folder); a root that does not hold the artefact is replaced by the one
    its record names (`find_root`, said in a note)."""
    folder = stage_folder(artefact)
    root, found = find_root(folder, root)
    tree = Auditor(root).node(folder)
    notes = [found] if found else []
    if dvc:
        stale, note = dvc_stale_paths(root)
        if note:
            notes.append(note)
        for n in walk(tree):
            if isinstance(n, Node) and not n.seen_before and any(n.path == s or n.path.startswith(s + "/") for s in stale):
                n.problems.append(f"stale (dvc.lock): {n.path} is an output of a stage `dvc status` reports changed")
    problems = [p for n in walk(tree) for p in n.problems]
    return tree, problems + [f"note: {n}" for n in notes]


def render(tree: Node | Leaf, indent: str = "") -> list[str]:
    ok = "ok" if not tree.problems else "FAILED"
    if isinstance(tree, Node):
        head = f"{indent}{tree.path}  [{tree.stage} {tree.run}; {tree.role}; {tree.files} files]"
        if tree.seen_before:
            return [f"{head} (verified above)"]
        lines = [f"{head} {ok}"] + [f"{indent}    ! {p}" for p in tree.problems]
        for child in tree.inputs:
            lines += render(child, indent + "  ")
        return lines
    return [f"{indent}{tree.path}  [{tree.kind}; {tree.role}] {ok}"] + [f"{indent}    ! {p}" for p in tree.problems]
