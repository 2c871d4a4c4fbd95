"""The docs stand on their own: nothing in the repository cites a file that is not in it (the
method's source notes, design or environment notes), and every "docs/method.md §n" points at a
section that docs/method.md has."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO

# Built from parts so that this file does not match itself.
FOREIGN = re.compile(r"\b(?:" + "|".join(["SP" + "EC", "DES" + "IGN", "ENVIRON" + "MENT"]) + r")\.md\b|\bSP" + r"EC\b")
METHOD_REF = re.compile(r"(?:docs/)?method\.md ?§ ?(\d+(?:\.\d+)?)")
TEXT = (".py", ".md", ".yaml", ".yml", ".smk", ".def", ".txt", ".in", ".toml", ".cfg", ".sh", ".json")


def _tracked() -> list:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.split()
    names = [p for p in out if p.endswith(TEXT) or p in ("Snakefile", "Makefile") or p.startswith(".ci/")]
    return [REPO / p for p in names if (REPO / p).is_file()]


def test_no_reference_to_files_outside_the_repository():
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()[:100]}"
            for p in _tracked() for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if FOREIGN.search(line)]
    assert not hits, "references to files that are not in the repository:\n" + "\n".join(hits[:20])


def test_method_references_name_existing_sections():
    method = (REPO / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", method, re.M))
    assert {str(n) for n in range(1, 10)} <= sections, f"docs/method.md sections: {sorted(sections)}"
    bad = [f"{p.relative_to(REPO)}: §{n}" for p in _tracked() for n in METHOD_REF.findall(p.read_text(errors="replace"))
           if n not in sections]
    assert not bad, f"references to sections docs/method.md does not have: {bad[:20]}"
