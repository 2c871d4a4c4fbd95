"""Shared test setup: make `src/` importable without installing the package."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SRC = str(REPO / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)


import pytest  # noqa: E402

# The micro autoencoder of the trainer tests: 32 px images -> 4x16x16 latents in a second.
MICRO_AE = {"name": "micro", "channels": [8, 16], "z_channels": 4, "num_res_blocks": 1, "norm_groups": 4}
MICRO_AE_RUN = {"dataset": "embedded", "config": MICRO_AE, "variant": "sdvae",
                "train": {"steps": 2, "batch_size": 4, "device": "cpu", "ema_decay": 0.0, "log_every": 1},
                "loss": {"lpips_weight": 0.0},
                "latents": {"batch_size": 7, "shard_size": 10, "device": "cpu"}}


@pytest.fixture(scope="session")
def micro_latents(tmp_path_factory):
    """(dataset, autoencoder folder, latent cache) of the embedded set at 32 px (24 train images,
    8 test) and a 2-step micro autoencoder: 48 cache entries (flips included) of 4x16x16."""
    from specmatch.autoencoder import latents
    from specmatch.autoencoder import train as ae_train
    from specmatch.data.prepare import prepare

    root = tmp_path_factory.mktemp("micro-latents")
    data = root / "embedded"
    prepare({"source": "embedded", "resolution": 32, "seed": 0, "n_train": 24, "n_test": 8, "shard_size": 10},
            "embedded", data)
    ae_train.train(MICRO_AE_RUN, data, root / "aerun", root / "ae", "micro")
    man = latents.extract(MICRO_AE_RUN, root / "ae", data, "micro", root / "lat")
    assert man["count"] == 48 and man["shape"] == [4, 16, 16] and man["num_classes"] > 1
    return data, root / "ae", root / "lat"
