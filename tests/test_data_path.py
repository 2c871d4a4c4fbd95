"""The data path of the trainers at paper scale: shard readers with a bounded number of open
files (a 600-shard cache under `ulimit -n 256`), rows read in place against numpy's own reading,
the background loader, the EMA and non-finite check that never read a value back per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from specmatch.data.shards import write_npz
from specmatch.errors import SpecmatchError
from specmatch.runtime import training
from specmatch.runtime.distributed import DistInfo
from specmatch.runtime.hashing import sha256_file

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _latent_cache(folder: Path, shards: int, per_shard: int, shape=(2, 2, 2), deflate: tuple[int, ...] = ()) -> Path:
    """A latent cache in the extract-latents format, each value telling its entry and member."""
    from specmatch.autoencoder.latents import SCHEMA

    folder.mkdir(parents=True)
    files = []
    for j in range(shards):
        ids = np.arange(j * per_shard, (j + 1) * per_shard)
        mu = (ids[:, None, None, None] + np.zeros(shape)).astype(np.float32)
        name = f"latents-{j:05d}.npz"
        write_npz(folder / name, {"mu": mu, "logvar": -mu, "labels": ids % 7, "index": ids, "flip": ids < 0},
                  "deflate" if j in deflate else "none")
        files.append({"file": name, "count": per_shard, "sha256": sha256_file(folder / name)})
    (folder / "manifest.json").write_text(json.dumps({"schema": SCHEMA, "count": shards * per_shard,
                                                      "shape": list(shape), "scale_factor": 0.5, "shards": files}))
    return folder


def test_rows_equal_numpys_reading_in_any_order(tmp_path):
    from specmatch.autoencoder.latents import LatentReader

    folder = _latent_cache(tmp_path / "c", 5, 7, deflate=(3,))  # one deflated shard among stored ones
    r = LatentReader(folder, max_open=2)
    ref = {m: np.concatenate([np.load(folder / f"latents-{j:05d}.npz")[m] for j in range(5)])
           for m in ("mu", "logvar", "labels")}
    rng = np.random.default_rng(0)
    for idx in (rng.permutation(35), np.arange(35), [34, 0, 0, 20, 21, 22, 13], [6, 7]):
        mu, logvar, labels = r.get(idx)
        np.testing.assert_array_equal(mu, ref["mu"][idx])
        np.testing.assert_array_equal(logvar, ref["logvar"][idx])
        np.testing.assert_array_equal(labels, ref["labels"][idx])
        assert len(r._fds) <= 2
    t_mu, t_logvar, t_labels = r.get_tensors([3, 30])
    assert t_mu.dtype == torch.float32 and t_labels.dtype == torch.int64
    np.testing.assert_array_equal(t_mu.numpy(), ref["mu"][[3, 30]])
    # the trainer's posterior sample: s * (mu + exp(logvar / 2) * eps)
    eps = torch.randn(t_mu.shape, generator=torch.Generator().manual_seed(0))
    z = r.scaled_sample(t_mu, t_logvar, eps)
    np.testing.assert_allclose(z.numpy(), 0.5 * (ref["mu"][[3, 30]] + np.exp(ref["logvar"][[3, 30]] / 2) * eps.numpy()),
                               rtol=1e-6)
    with pytest.raises(IndexError, match="out of range"):
        r.get([35])


def test_truncated_shard_is_named(tmp_path):
    from specmatch.autoencoder.latents import LatentReader

    folder = _latent_cache(tmp_path / "c", 2, 4)
    path = folder / "latents-00001.npz"
    r = LatentReader(folder, verify=False)  # the sha256 check would catch it first; the read must too
    r.get([4])
    os.truncate(path, path.stat().st_size // 3)
    r.close()
    with pytest.raises(SpecmatchError, match="latents-00001.npz"):
        r.get([7])


_READ_ALL = """
import os, sys, numpy as np
from specmatch.autoencoder.latents import LatentReader
r = LatentReader(sys.argv[1])
order = np.random.default_rng(1).permutation(len(r))
peak = 0
for k in range(0, len(r), 64):
    r.get(order[k:k + 64])
    peak = max(peak, len(os.listdir("/proc/self/fd")))
mu, _, labels = r.get(np.arange(len(r)))
print(r.max_open, peak, float(mu[:, 0, 0, 0].sum()), int(labels.sum()))
"""

_MAP_ALL = """
import sys
from pathlib import Path
from specmatch.data.reader import _member_memmap
maps = [_member_memmap(p, m + ".npy") for p in sorted(Path(sys.argv[1]).glob("*.npz")) for m in ("mu", "logvar", "labels")]
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors through /proc")
def test_600_shard_cache_reads_under_ulimit_256(tmp_path):
    """Each mapped member held a descriptor (Python's mmap keeps one): the ImageNet latent cache
    needed ~940. The readers keep a bounded number of files open, so a cache of 600 shards
    reads fully under a limit of 256 descriptors, where mapping every member fails."""
    folder = _latent_cache(tmp_path / "c", 600, 2)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f'ulimit -n 256 && exec "{sys.executable}" -c "$0" "$1"', code, str(folder)],
                              env=env, capture_output=True, text=True, timeout=300)

    mapped = run(_MAP_ALL)
    assert mapped.returncode != 0 and "Too many open files" in mapped.stderr, mapped.stderr[-2000:]
    proc = run(_READ_ALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    max_open, peak, mu_sum, label_sum = proc.stdout.split()
    assert int(max_open) == 256 // 16 and int(peak) < 256
    ids = np.arange(1200)
    assert float(mu_sum) == float(ids.sum()) and int(label_sum) == int((ids % 7).sum())


def test_prefetch_delivers_in_order_and_raises_the_readers_error():
    seen = []

    def fetch(step):
        seen.append(step)
        if step == 5:
            raise SpecmatchError("shard 5 is damaged")
        return step * 10

    with training.Prefetch(fetch, range(2, 9), depth=2) as pf:
        assert [pf.get(s) for s in (2, 3, 4)] == [20, 30, 40]
        with pytest.raises(SpecmatchError, match="shard 5"):
            pf.get(5)
    assert seen == [2, 3, 4, 5]  # it stops at the error
    with training.Prefetch(lambda s: s, range(0, 10 ** 9), depth=2) as pf:  # left early: the thread ends
        assert pf.get(0) == 0
    assert not pf._thread.is_alive()


def test_ema_is_torch_averaged_model_bitwise_and_resumes():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ref = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9),
                                              use_buffers=True)
    ema = training.make_ema(net, 0.9)
    assert training.make_ema(net, 0.0) is None
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for i in range(5):
        opt.zero_grad()
        net(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        ref.update_parameters(net)
        ema.update_parameters(net)
        if i == 2:  # a resumption: a fresh EMA loaded from the state dict continues the same way
            state = ema.state_dict()
            ema = training.make_ema(net, 0.9)
            ema.load_state_dict(state)
    assert ema.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(ema.state_dict()[k], v), k
    assert int(ema.n_averaged) == 5


def _info(world=1, rank=0):
    return DistInfo(rank, world, rank, torch.device("cpu"), None, rank == 0)


def test_finite_guard_names_the_first_bad_step_when_checked(tmp_path):
    g = training.FiniteGuard(_info(), tmp_path)
    g.update({"loss": torch.tensor(1.0)}, 0)
    g.check()  # all finite
    g.update({"loss": torch.tensor(float("nan")), "align": torch.tensor(2.0)}, 1)
    g.update({"loss": torch.tensor(float("inf")), "align": torch.tensor(3.0)}, 2)
    with pytest.raises(training.NonFiniteLoss, match=r"step 1 \(loss=nan, align=2 on rank 0\).*none \(no checkpoint"):
        g.check()
    with pytest.raises(training.NonFiniteLoss, match="iteration 4"):
        training.check_finite({"d": torch.tensor([1.0, float("nan")])}, 4, _info(), tmp_path, "iteration")


def test_training_loop_reads_nothing_back_per_step(tmp_path, micro_latents, monkeypatch):
    """On a GPU every read of a tensor's value waits for the device. The diffusion loop reads
    values at log, snapshot and checkpoint steps only: a run of 12 steps reads back as often as
    one of 4 (counted on the CPU through the Tensor methods that read values; torch's
    AveragedModel alone read two per step)."""
    from specmatch.diffusion import train

    import inspect

    counts = {"n": 0}
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **kw):
            # torch's optimisers keep their step count on the CPU (unless `capturable`) so that
            # reading it never waits for the GPU: those reads are not counted
            if "torch/optim/" not in inspect.currentframe().f_back.f_code.co_filename:
                counts["n"] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads(steps: int) -> int:
        params = {"autoencoder": "micro", "model": "UViT-tiny/2", "process": {"kind": "vp-linear"},
                  "train": {"steps": steps, "batch_size": 4, "device": "cpu", "ema_decay": 0.9,
                            "checkpoint_every": 1000, "log_every": 1000, "seed": 5}}
        counts["n"] = 0
        train.train(params, micro_latents[2], tmp_path / f"o{steps}", "a", run_dir=tmp_path / f"r{steps}")
        return counts["n"]

    assert reads(12) == reads(4)


def test_shards_taken_into_a_split_are_linked_not_copied_and_hashed_as_written(tmp_path):
    """The sample stage stores each sample set once: its output split is made of the work
    folder's shard files (hard links), with the same split entry as writing the images anew."""
    from specmatch.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 7)
    work = tmp_path / "work"
    work.mkdir()
    for j, (lo, hi) in enumerate(((0, 4), (4, 7))):
        write_npz(work / f"shard-{j:05d}.npz", {"images": images[lo:hi], "labels": labels[lo:hi],
                                                "sources": np.arange(lo, hi), "nfe": np.array([5])})
    ref, out = tmp_path / "ref", tmp_path / "out"
    ref.mkdir(), out.mkdir()
    w = ShardWriter(ref, "samples", 4, shard_size=4)
    for i in range(7):
        w.add(images[i], int(labels[i]), i)
    expected = w.close()
    w = ShardWriter(out, "samples", 4, shard_size=4)
    for j in range(2):
        w.add_shard(work / f"shard-{j:05d}.npz")
    got = w.close()
    for k in ("count", "images_sha256", "labels_sha256", "label_counts"):
        assert got[k] == expected[k], k
    assert [s["count"] for s in got["shards"]] == [4, 3]
    for j, s in enumerate(got["shards"]):
        a, b = (out / s["file"]).stat(), (work / f"shard-{j:05d}.npz").stat()
        assert (a.st_ino, a.st_nlink) == (b.st_ino, 2) and s["sha256"] == sha256_file(out / s["file"])


def test_add_shard_takes_the_hash_its_caller_already_has(tmp_path):
    """`add_shard(path, sha256)`: the record holds the hash given (the round-robin writer's, of
    the same file), and it is the file's: the manifest equals the one that hashes the file."""
    from specmatch.data.shards import ShardWriter, write_npz
    from specmatch.runtime.hashing import sha256_file

    images = np.random.default_rng(1).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    shard = tmp_path / "shard-00000.npz"
    write_npz(shard, {"images": images, "labels": np.array([0, 1, 2]), "sources": np.arange(3)})
    digest = sha256_file(shard)
    records = []
    for name, given in (("a", None), ("b", digest)):
        (tmp_path / name).mkdir()
        w = ShardWriter(tmp_path / name, "samples", 4, shard_size=3)
        w.add_shard(shard, given)
        records.append(w.close())
    assert records[0] == records[1] and records[1]["shards"][0]["sha256"] == digest
