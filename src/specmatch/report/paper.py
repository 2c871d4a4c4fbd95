"""`specmatch report paper`: the paper's tables and figures (docs/method.md §9, experiments E1-E4) from the
DAG's stage outputs, and one report page linking them.

Inputs are stage output folders given explicitly (`report.inputs`: data spectra, autoencoder
evaluations, trained diffusion models, generation metrics, samples, target spectra, metric over
training, real floors); the `report` parameters say which runs form each experiment
(`report.experiments`). Every table is written as CSV and Markdown (`tables.write_table`) with
the protocol beside every number. Figures are deterministic PNGs (`report.figures`); the page is
the template `templates/index.md.j2`, and the same page as HTML (`render.html`: rendered from
that Markdown, one self-contained file with relative links, to open in a browser). The output
folder is replaced atomically and carries a provenance record listing every input, so
`specmatch audit` walks from any table or figure back to the raw data.

    report/index.md          the page: what each experiment is, its protocol, links
    report/index.html        the same page for a browser (inline style, no network)
    report/tables/           e1, e2, e3, e4_data, e4_latents, fid_over_training (.csv, .md)
    report/figures/          spectra, reconstructions, samples, metric over training
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from .. import config as config_mod
from ..grid import EXPERIMENTS
from ..render import html
from ..render.tables import markdown, write_table
from ..runtime import atomic
from ..runtime.provenance import Provenance
from . import claims as claims_mod
from . import experiments, figures, published
from .inputs import Inputs

log = logging.getLogger(__name__)

INDEX = "index.md"
HTML = "index.html"
TEMPLATE = "index.md.j2"

__all__ = ["HTML", "INDEX", "Inputs", "page", "write"]


# --------------------------------------------------------------------------- the page


def _md(df: pd.DataFrame, cols: list[str]) -> str:
    return markdown(df[[c for c in cols if c in df.columns]]) if len(df) else "(no rows)"


def _is_metric(column: str) -> bool:
    """A generation distance column (FID, FD-<net>), not one of its companions (std, untrained...)."""
    return column == "FID" or (column.startswith("FD-") and " " not in column)


def _generation_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if _is_metric(c) or c.endswith((" untrained", " real floor"))] + ["gap_closed"]


def _protocol_lines(df: pd.DataFrame, gen: bool = True, recon: bool = True) -> list[str]:
    lines = []
    if recon and "recon_n" in df:
        rm = [c for c in df.columns if c.startswith("r") and ("FID" in c or c.startswith("rFD")) and " LP " not in c]
        for (split, n, w), _ in df.groupby(["recon_split", "recon_n", "recon_feature_weights_sha256"]):
            lines.append(f"- reconstruction: {', '.join(rm) or 'distance'} and PSNR/SSIM on {n} `{split}` images "
                         f"(posterior mean), feature weights sha256 {w}...")
    if gen and "n_samples" in df and df["n_samples"].notna().any():
        g = df[df["n_samples"].notna()]
        metrics = sorted({c for c in g.columns if _is_metric(c)})
        for (n, ref, w, proto), _ in g.groupby(["n_samples", "reference", "feature_weights_sha256", "protocol"]):
            lines.append(f"- generation: {', '.join(metrics)} of {int(n)} samples against {ref}, protocol {proto}, "
                         f"feature weights sha256 {w}...")
        for key, sub in g.groupby(["sampler", "steps", "cfg_scale", "cfg_interval", "trained_steps"]):
            s, st, cfg, iv, ts = key
            lines.append(f"- sampler: {s}, {int(st)} steps, guidance {cfg:g} on t in [{iv.replace('-', ', ')}] "
                         f"(runs trained {int(ts)} steps): {', '.join(sorted(set(sub['diffusion'])))}")
    return lines


def _section(exp: str, runs: dict[str, dict[str, list[str]]], t: dict[str, pd.DataFrame],
             figs: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    """What the page shows of one experiment: its runs, protocol and the short form of its tables."""
    r = runs[exp]
    listed = [f"{k}: {', '.join(r[k])}" for k in ("datasets", "autoencoders", "diffusions")
              if r[k] and (exp == "E4" or k != "datasets")]
    s = {"exp": exp, "title": EXPERIMENTS[exp].title, "description": EXPERIMENTS[exp].description,
         "listed": "; ".join(listed), "empty": False}
    if exp == "E4":
        dd, dl, ds_ = t["e4_data"], t["e4_latents"], t["e4_samples"]
        s["data"] = None if dd.empty else _md(dd, ["dataset", "map", "psd_exponent", "split", "n_images"])
        s["latents"] = None
        if not dl.empty:
            lp = [c for c in dl.columns if " LP k=" in c]
            s["latents"] = {"metric": lp[0].split(" LP ")[0],
                            "images": ", ".join(f"{n} `{split}` images"
                                                for split, n in sorted(set(zip(dl["recon_split"], dl["recon_n"])))),
                            "table": _md(dl, ["autoencoder", "latent_grid", "latent_psd_exponent",
                                              "image_psd_exponent_on_grid", "KL(target||latent)"] + lp)}
        s["samples"] = None if ds_.empty else _md(ds_, ["samples", "sampler", "n_images", "KL(samples||real)",
                                                        "psd_exponent", "real_psd_exponent"])
        return s
    df = t[exp.lower()]
    if df.empty:
        return {**s, "empty": True}
    if exp in ("E1", "E2"):
        recon = [c for c in df.columns if c.startswith("rFD") or c == "rFID"]
        return {**s, "protocol": _protocol_lines(df),
                "table": _md(df, ["autoencoder", "variant", "latent_grid", "PSNR", "SSIM", "LPIPS"] + recon
                             + ["diffusion", "sampler", "cfg_scale"] + _generation_columns(df))}
    return {**s, "protocol": _protocol_lines(df, recon=False),
            "table": _md(df, ["diffusion", "alignment", "encoder", "sampler", "cfg_scale"] + _generation_columns(df)
                         + ["target_RMSC2", "target_psd_exponent", "published_FID", "comparable"]),
            "published": published.section(df) if exp == "E3" else [],
            # E3b shows the target spectra only when E3, which shows them first, has no runs.
            "targets": bool(figs["targets"]) and (exp == "E3" or not runs["E3"]["diffusions"])}


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.PackageLoader("specmatch.report", "templates"), autoescape=False,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    return env.get_template(TEMPLATE)


def page(name: str, runs: dict[str, dict[str, list[str]]], t: dict[str, pd.DataFrame],
         figs: dict[str, list[tuple[str, str]]]) -> str:
    """index.md: the claims, each experiment's runs, protocol and tables, and every figure."""
    claims = t["claims"]
    pt = t["fid_over_training"]
    return _template().render(
        name=name, figs=figs, sections=[_section(exp, runs, t, figs) for exp in EXPERIMENTS],
        claims={"table": _md(claims, ["claim", "setting", "evidence", "z", "verdict"]) if len(claims) else None,
                "statements": claims_mod.CLAIMS, "tested": set(claims["claim"]) if len(claims) else set()},
        progress_n_samples=None if pt.empty else int(pt[pt["source"] != "generation table"]["n_samples"].iloc[0]))


# --------------------------------------------------------------------------- the stage


def write(params: dict[str, Any], inputs: Inputs, name: str, out: str | Path) -> dict[str, pd.DataFrame]:
    """The tables, figures, index.md and index.html in `out` (atomically), with a provenance record."""
    # Every table and claim reads a generation number beside its baselines.
    experiments.attach_baselines(inputs.generation, inputs.floors)
    p = config_mod.validate(params, "report", where="report", source=f"parameters of {name}")
    runs = experiments.runs_of(p, inputs)
    t, progress = experiments.tables(p, runs, inputs)
    prov = Provenance("report-paper", name, p)
    inputs.add_to(prov)
    with atomic.atomic_dir(out) as tmp:
        (tmp / "tables").mkdir()
        (tmp / "figures").mkdir()
        for stem, df in t.items():
            if len(df):
                write_table(df, tmp / "tables", stem, *experiments.INTROS[stem])
        figs = figures.render(p, runs, inputs, progress, tmp / "figures")
        text = page(name, runs, t, figs)
        atomic.write_text(tmp / INDEX, text)
        atomic.write_text(tmp / HTML, html.page(text))
        prov.write(out, tmp)
    log.info("report %s: %s", name, {k: len(v) for k, v in t.items()})
    return t
