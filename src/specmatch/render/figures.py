"""Figures in the style of the paper."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..runtime import atomic  # noqa: E402


def save_figure(fig, path: Path) -> None:
    # Fixed metadata so that the same figure gives the same bytes (no software/date stamps).
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def spectrum_distribution_figure(result: dict[str, Any], path: str | Path) -> None:
    """The paper's "spectrum distribution" plot: p_k against the frequency band k, one panel per
    latent grid (image untilted and the delta-tilted ESM targets, training setting), and one
    panel with the analysis setting (no centring, DC kept) at every grid and at full size."""
    grids = result["grids"]
    fig, axes = plt.subplots(1, len(grids) + 1, figsize=(4.2 * (len(grids) + 1), 3.6), squeeze=False)
    axes = axes[0]
    cmap = plt.get_cmap("viridis")
    for ax, (g, s) in zip(axes, grids.items()):
        dists = s["training"]["distribution"]
        valid = s["valid_bins"]
        for i, (delta, d) in enumerate(dists.items()):
            ks = [k for k, v in enumerate(valid) if v]
            ys = [d["mean"][k] for k in ks]
            style = dict(color="black", lw=2, label="image (delta 0)") if float(delta) == 0 else \
                dict(color=cmap(i / max(1, len(dists) - 1)), lw=1.3, ls="--", label=f"target delta {delta}")
            ax.plot(ks, ys, marker="o", ms=3, **style)
        ax.set_title(f"{g}x{g} latent grid\n(training setting: centred, DC removed)", fontsize=10)
        ax.set_xlabel("frequency band k")
        ax.set_ylabel("spectrum distribution p_k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    ax = axes[-1]
    entries = [("full", result["full_resolution"])] + list(grids.items())
    for i, (g, s) in enumerate(entries):
        valid = s["valid_bins"]
        ks = [k for k, v in enumerate(valid) if v]
        mean = s["analysis"]["distribution"]["mean"]
        label = f"{s['size'][0]}x{s['size'][1]}" + (" (full)" if g == "full" else "")
        ax.plot(ks, [mean[k] for k in ks], marker="o", ms=3, label=label, color=cmap(i / max(1, len(entries) - 1)))
    ax.set_title("all grids\n(analysis setting: DC kept)", fontsize=10)
    ax.set_xlabel("frequency band k")
    ax.set_ylabel("p_k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    slope = result["full_resolution"]["psd_exponent"]["of_mean_energy"]
    fig.suptitle(f"Spectrum distribution of {result['dataset']} ({result['split']}, {result['n_images']} images;"
                 f" PSD exponent {slope:.2f})")
    fig.tight_layout()
    save_figure(fig, Path(path))


def latent_spectrum_figure(result: dict[str, Any], path: str | Path) -> None:
    """An autoencoder's latent spectrum distribution against the image's delta-tilted target on
    the latent grid (the paper's figure for ESM/DSM), from `eval-ae`'s metrics."""
    s = result["latent_spectrum"]
    ks = [k for k, v in enumerate(s["valid_bins"]) if v]
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.plot(ks, [s["target_distribution"][k] for k in ks], color="black", lw=2, marker="o", ms=3,
            label=f"image target (delta {s['delta']})")
    ax.plot(ks, [s["latent_distribution"][k] for k in ks], color="tab:red", lw=1.5, marker="s", ms=3,
            label=f"latent {s['grid'][0]}x{s['grid'][1]}")
    ax.set_xlabel("frequency band k")
    ax.set_ylabel("spectrum distribution p_k")
    ax.set_title(f"{result['name']} ({result['variant']}): KL {s['kl_target_to_latent']:.3f}, "
                 f"PSD exponent {s['psd_exponent']:.2f}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, Path(path))


def image_grid(images, path: str | Path, title: str | None = None, columns: int = 8) -> None:
    """A grid of uint8 images (N, H, W, 3): samples or reconstructions at a glance."""
    import numpy as np

    images = np.asarray(images)
    n = len(images)
    if n == 0:
        raise ValueError("image_grid: no images")
    cols = min(columns, n)
    rows = -(-n // cols)
    h, w = images.shape[1:3]
    canvas = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = im
    fig, ax = plt.subplots(figsize=(max(2.0, cols * w / 48), max(2.0, rows * h / 48)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    save_figure(fig, Path(path))


def latents_vs_image_figure(image: dict[str, Any], latents: list[dict[str, Any]], path: str | Path,
                            title: str) -> None:
    """The paper's spectrum-distribution comparison on one axes: the image's distribution on a
    latent grid (untilted, and its delta-tilted ESM target) against each autoencoder's latent
    distribution on that grid. `image`: {"valid", "untilted", "target", "delta"}; `latents`:
    [{"label", "distribution"}] (training setting: centred, DC removed; empty bins left out)."""
    ks = [k for k, v in enumerate(image["valid"]) if v]
    fig, ax = plt.subplots(figsize=(5.2, 3.9))
    ax.plot(ks, [image["untilted"][k] for k in ks], color="black", lw=2.2, marker="o", ms=3, label="image (delta 0)")
    if image.get("target") is not None:
        ax.plot(ks, [image["target"][k] for k in ks], color="black", lw=1.4, ls="--", marker="o", ms=3,
                label=f"image target (delta {image['delta']:g})")
    cmap = plt.get_cmap("tab10")
    for i, lat in enumerate(latents):
        ax.plot(ks, [lat["distribution"][k] for k in ks], color=cmap(i % 10), lw=1.6, marker="s", ms=3,
                label=lat["label"])
    ax.set_xlabel("frequency band k")
    ax.set_ylabel("spectrum distribution p_k")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, Path(path))


def image_rows_figure(rows: list[tuple[str, Any]], path: str | Path, title: str | None = None) -> None:
    """Rows of uint8 images (each (N, H, W, 3), same N, H, W), one row per label, the label on the
    left: e.g. held-out originals above each autoencoder's reconstructions of them."""
    import numpy as np

    if not rows:
        raise ValueError("image_rows_figure: no rows")
    n, h, w = np.asarray(rows[0][1]).shape[:3]
    inch = min(2.0, max(0.8, w / 80))  # per image: 64 px images at 0.8 in, 256 px at 2 in (dpi 120)
    fig, axes = plt.subplots(len(rows), 1, figsize=(n * inch + 1.6, len(rows) * (inch * h / w + 0.2)), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows):
        images = np.asarray(images)
        canvas = np.full((h + 2, n * (w + 2) + 2, 3), 255, np.uint8)
        for i, im in enumerate(images[:n]):
            canvas[1:1 + h, 2 + i * (w + 2):2 + i * (w + 2) + w] = im
        ax.imshow(canvas, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, Path(path))


def progress_figure(points, finals, path: str | Path) -> None:
    """The generation metric against training steps, one line per run (`points`: rows with
    diffusion, step, value, metric, n_samples, reference), one panel per (metric, reference); a
    run's final evaluation (`finals`: same columns) is drawn as its own marker, labelled with
    its number of samples, where its protocol differs from the curve's."""
    panels = list(dict.fromkeys(zip(points["metric"], points["reference"])))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 3.9), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (metric, ref) in zip(axes[0], panels):
        sel = points[(points["metric"] == metric) & (points["reference"] == ref)]
        for i, (run, g) in enumerate(sel.groupby("diffusion", sort=True)):
            g = g.sort_values("step")
            n = int(g["n_samples"].iloc[0])
            ax.plot(g["step"], g["value"], marker="o", ms=4, color=cmap(i % 10), label=f"{run} (n={n})")
            f = finals[(finals["diffusion"] == run) & (finals["metric"] == metric)]
            for _, r in f.iterrows():
                ax.plot([r["step"]], [r["value"]], marker="*", ms=11, ls="none", color=cmap(i % 10),
                        markeredgecolor="black", label=f"{run}: {r['label']}")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{metric} (lower is better)")
        ax.set_title(f"{metric} over training, reference {ref}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, Path(path))
