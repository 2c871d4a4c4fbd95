"""Copy a `small` run's report into this folder, so that a new run can be compared with ours.

    .venv/bin/python docs/results/small/collect.py [results/small] [docs/results/small]

Copies the report page (index.md and index.html), its tables and its figures as they are, except
the sample grids: for each sample set the page shows it draws the first 32 samples with the
report's own renderer, under the report's file name (the report's grids hold 64 samples at about
0.7 MB each; results/small/report/figures/ keeps them).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from specmatch.data.shards import iter_image_batches
from specmatch.render.figures import image_grid

N_SHOWN = 32


def main(results: Path, out: Path) -> None:
    report = results / "report"
    if not (report / "index.md").is_file():
        raise SystemExit(f"{report}: no index.md; run `make small` first (or pass the results folder)")
    for page in ("index.md", "index.html"):
        shutil.copy2(report / page, out / page)
    shutil.rmtree(out / "tables", ignore_errors=True)
    shutil.copytree(report / "tables", out / "tables")
    figs = out / "figures"
    shutil.rmtree(figs, ignore_errors=True)
    figs.mkdir()
    for fig in (report / "figures").glob("*.png"):
        if not fig.name.startswith("samples_"):
            shutil.copy2(fig, figs / fig.name)
    linked = (report / "index.md").read_text()
    for run in sorted(p for p in (results / "samples").glob("*") if p.is_dir()):
        for sampler in sorted(p for p in run.glob("*") if p.is_dir()):
            name = f"samples_{run.name}-{sampler.name}.png"
            if f"(figures/{name})" in linked:  # the sample sets the page shows
                images = next(iter_image_batches(sampler, "samples", N_SHOWN))
                image_grid(images, figs / name, title=f"{run.name}: {sampler.name}, first {len(images)} samples")


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    main(args[0] if args else Path("results/small"), args[1] if len(args) > 1 else Path(__file__).parent)
