"""`specmatch prepare-data` (embedded, folder, imagenet sources), the shard format and the
`data-spectra` stage.

References are independent of the code under test: hashes recomputed with hashlib from the
documented definitions, ADM's centre crop written out as guided-diffusion's
`center_crop_arr`, held-out crops located by brute-force search in the source images, the
spectrum distribution recomputed with scipy's DCT.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specmatch import cli
from specmatch.data import images, shards
from specmatch.data.prepare import prepare
from specmatch.errors import SpecmatchError

from conftest import load_split

EMBEDDED = {"source": "embedded", "resolution": 64, "seed": 0, "n_train": 64, "n_test": 16, "shard_size": 24}
N_SOURCES = 22


# --------------------------------------------------------------------------- helpers


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files_bytes(folder: Path, skip=("provenance.json",)) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _raw_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """images, labels, sources of a split, read with np.load only (not the reader under test)."""
    man = _manifest(folder)
    ims, labs, srcs = [], [], []
    for shard in man["splits"][split]["shards"]:
        with np.load(folder / shard["file"], allow_pickle=False) as z:
            ims.append(z["images"])
            labs.append(z["labels"])
            srcs.append(z["sources"])
    if not ims:
        res = man["resolution"]
        return np.zeros((0, res, res, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ims), np.concatenate(labs), np.concatenate(srcs)


def _stream_hash(arr: np.ndarray, dtype: str) -> str:
    """ImageStreamHash as documented: '<dtype>|<item shape>|' then the C-order bytes."""
    head = f"{dtype}|{','.join(map(str, arr.shape[1:]))}|".encode("ascii")
    return _sha(head + np.ascontiguousarray(arr).tobytes())


def _array_hash(arr: np.ndarray) -> str:
    """sha256_array as documented: '<dtype>|<shape>|' then the C-order bytes."""
    a = np.ascontiguousarray(arr)
    return _sha(f"{a.dtype.str}|{','.join(map(str, a.shape))}|".encode("ascii") + a.tobytes())


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion's ADM preprocessing (image_datasets.py), the independent reference."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def _noise_rgb(rng, h: int, w: int) -> np.ndarray:
    """Smooth-ish random colour image (so resizing does something non-trivial)."""
    small = rng.integers(0, 256, size=(max(2, h // 4), max(2, w // 4), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), resample=Image.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, size=(h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _jpeg_bytes(rng, h=48, w=40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_noise_rgb(rng, h, w)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _reference_rgb(path: Path) -> Image.Image:
    """Independent RGB conversion of the test images (16-bit gray rescaled to 8 bits)."""
    img = Image.open(path)
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img).astype(np.float64)
        g = np.floor(a * 255.0 / 65535.0 + 0.5).astype(np.uint8)
        return Image.fromarray(np.stack([g, g, g], -1))
    return img.convert("RGB")


def _make_mixed_folder(root: Path) -> dict[str, dict]:
    """A CelebA-HQ-like flat folder with every colour mode; returns what each file holds."""
    rng = np.random.default_rng(123)
    root.mkdir(parents=True)
    made = {}
    Image.fromarray(_noise_rgb(rng, 50, 100)).save(root / "a_rgb.png")
    made["a_rgb.png"] = {"mode": "RGB"}
    Image.fromarray(_noise_rgb(rng, 64, 64)[..., 0]).save(root / "b_gray.png")
    made["b_gray.png"] = {"mode": "L"}
    rgba = np.concatenate([_noise_rgb(rng, 300, 257), rng.integers(0, 256, (300, 257, 1), dtype=np.uint8)], -1)
    rgba[:, :40, 3] = 0  # fully transparent columns: alpha must be dropped, not composited
    Image.fromarray(rgba, mode="RGBA").save(root / "c_rgba.png")
    made["c_rgba.png"] = {"mode": "RGBA", "rgb": rgba[..., :3]}
    gray8 = _noise_rgb(rng, 40, 48)[..., 1]
    Image.fromarray(gray8.astype(np.uint16) * 257).save(root / "d_16bit.png")
    made["d_16bit.png"] = {"mode": "I;16", "gray8": gray8}
    Image.fromarray(_noise_rgb(rng, 80, 80)).convert("P").save(root / "e_palette.png")
    made["e_palette.png"] = {"mode": "P"}
    (root / "f_photo.jpg").write_bytes(_jpeg_bytes(rng, 90, 120))
    made["f_photo.jpg"] = {"mode": "RGB"}
    exact = _noise_rgb(rng, 32, 32)
    Image.fromarray(exact).save(root / "g_exact.png")
    made["g_exact.png"] = {"mode": "RGB", "exact": exact}
    (root / "h_upper.JPEG").write_bytes(_jpeg_bytes(rng, 70, 70))
    made["h_upper.JPEG"] = {"mode": "RGB"}
    # things that must be ignored
    (root / "notes.txt").write_text("not an image")
    (root / "README").write_text("x")
    (root / "sub").mkdir()
    Image.fromarray(_noise_rgb(rng, 40, 40)).save(root / "sub" / "nested.png")
    Image.fromarray(_noise_rgb(rng, 40, 40)).save(root / ".hidden.png")
    return made


def _good_folder(root: Path, n: int, size=(40, 36), seed=0) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_noise_rgb(rng, *size)).save(root / f"img{i:03d}.png")


def _truncated_jpeg() -> bytes:
    data = _jpeg_bytes(np.random.default_rng(5), 64, 64)
    return data[: len(data) // 2]


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _cli_prepare(params: dict, name: str, out: Path) -> int:
    return cli.main(["prepare-data", "--name", name, "--params", json.dumps(params), "--out", str(out)])


# --------------------------------------------------------------------------- embedded


@pytest.fixture(scope="module", autouse=True)
def _load_embedded_sources_once():
    """Speed only: the bundled images are loaded (really) once per module and shared read-only."""
    from specmatch.data import embedded

    real, cache = embedded.load_sources, []

    def cached():
        if not cache:
            loaded = real()
            for _, arr in loaded:
                arr.setflags(write=False)
            cache.append(loaded)
        return list(cache[0])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embedded, "load_sources", cached)
        yield


@pytest.fixture(scope="module")
def embedded_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "embedded"
    prepare(dict(EMBEDDED), "embedded", out)
    return out


def test_embedded_layout_counts_and_dtypes(embedded_ds):
    man = _manifest(embedded_ds)
    assert man["schema"] == "specmatch.dataset/1"
    assert man["source"] == "embedded" and man["name"] == "embedded" and man["resolution"] == 64
    assert man["num_classes"] == N_SOURCES == len(man["classes"])
    assert man["splits"]["train"]["count"] == 64 and man["splits"]["test"]["count"] == 16
    assert [s["count"] for s in man["splits"]["train"]["shards"]] == [24, 24, 16]
    assert [s["count"] for s in man["splits"]["test"]["shards"]] == [16]
    assert sorted(p.name for p in embedded_ds.iterdir()) == [
        "manifest.json", "provenance.json", "test-00000.npz",
        "train-00000.npz", "train-00001.npz", "train-00002.npz"]
    for split, n in (("train", 64), ("test", 16)):
        ims, labels, sources = _raw_split(embedded_ds, split)
        assert ims.dtype == np.uint8 and ims.shape == (n, 64, 64, 3)
        assert labels.dtype == np.int64 and sources.dtype == np.int64
        np.testing.assert_array_equal(labels, sources)  # the label is the source image
        counts = np.bincount(labels, minlength=N_SOURCES)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
        assert man["splits"][split]["label_counts"] == {str(k): int(v) for k, v in enumerate(counts) if v}
        assert ims.std() > 10  # real content, not blank crops
        # no duplicate crops
        assert len({_sha(im.tobytes()) for im in ims}) == n


def test_embedded_hashes_match_independent_computation(embedded_ds):
    man = _manifest(embedded_ds)
    for split in ("train", "test"):
        ims, labels, _ = _raw_split(embedded_ds, split)
        entry = man["splits"][split]
        assert entry["images_sha256"] == _stream_hash(ims, "|u1")
        assert entry["labels_sha256"] == _stream_hash(labels, "<i8")
        for shard in entry["shards"]:
            assert shard["sha256"] == _sha((embedded_ds / shard["file"]).read_bytes())
    # the shard reader agrees with np.load
    ims, labels = load_split(embedded_ds, "train")
    raw_ims, raw_labels, _ = _raw_split(embedded_ds, "train")
    np.testing.assert_array_equal(ims, raw_ims)
    np.testing.assert_array_equal(labels, raw_labels)


def test_embedded_manifest_lists_sources_with_sha256(embedded_ds):
    man = _manifest(embedded_ds)
    files = man["files"]
    assert len(files) == N_SOURCES
    assert [f["label"] for f in files] == list(range(N_SOURCES))
    assert [f["path"] for f in files] == man["classes"]
    assert all(len(f["sha256"]) == 64 for f in files)
    assert len({f["sha256"] for f in files}) == N_SOURCES
    by_name = {f["path"]: f for f in files}
    import skimage.data
    from sklearn.datasets import load_sample_images

    astro = skimage.data.astronaut()
    china = load_sample_images().images[0]
    assert by_name["skimage:astronaut"]["sha256"] == _array_hash(astro)
    assert by_name["skimage:astronaut"]["shape"] == list(astro.shape)
    assert by_name["sklearn:china"]["sha256"] == _array_hash(china)
    assert any(n.startswith("matplotlib:") for n in by_name)
    assert man["skipped"] == []


def test_embedded_same_seed_byte_identical_via_cli(embedded_ds, tmp_path, capsys):
    out = tmp_path / "again"
    assert _cli_prepare(dict(EMBEDDED), "embedded", out) == 0
    a, b = _files_bytes(embedded_ds), _files_bytes(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs between two runs with the same parameters"
    pa = json.loads((embedded_ds / "provenance.json").read_text())
    pb = json.loads((out / "provenance.json").read_text())
    assert pa["outputs"]["files"] == pb["outputs"]["files"]
    assert pa["params_sha256"] == pb["params_sha256"]


def test_embedded_seed_changes_images_and_test_split_independent_of_n_train(embedded_ds, tmp_path):
    fewer, other = tmp_path / "fewer", tmp_path / "seed1"
    prepare({**EMBEDDED, "n_train": 32}, "embedded", fewer)
    prepare({**EMBEDDED, "n_train": 32, "seed": 1}, "embedded", other)
    for split in ("train", "test"):
        a, _, _ = _raw_split(fewer, split)
        b, _, _ = _raw_split(other, split)
        assert a.shape == b.shape
        # a different seed: nearly every crop differs
        assert sum(np.array_equal(x, y) for x, y in zip(a, b)) <= 1
    # fewer training crops must not change the held-out crops (one generator per split)
    ta, la, _ = _raw_split(embedded_ds, "test")
    tb, lb, _ = _raw_split(fewer, "test")
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_array_equal(la, lb)
    assert _manifest(fewer)["splits"]["train"]["count"] == 32


def _rgb_sources() -> dict[str, np.ndarray]:
    import skimage.data
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    sk = load_sample_images().images
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f))
    return {
        "skimage:astronaut": skimage.data.astronaut(),
        "skimage:chelsea": skimage.data.chelsea(),
        "skimage:coffee": skimage.data.coffee(),
        "sklearn:china": sk[0],
        "sklearn:flower": sk[1],
        "matplotlib:grace_hopper": hopper,
    }


def _find_window(crop: np.ndarray, region: np.ndarray, side: int, res: int) -> tuple[float, float]:
    """Best match of `crop` among the side x side windows at the top of `region`, each resized
    to res x res (plain bicubic, the reference): (mean abs difference of the best window, median
    over all windows). Resampling details may differ from the reference by a few levels, a
    window elsewhere in the image by tens."""
    target = crop.astype(np.float32)
    diffs = []
    for left in range(region.shape[1] - side + 1):
        win = Image.fromarray(np.ascontiguousarray(region[:side, left:left + side]))
        if side != res:
            win = win.resize((res, res), resample=Image.BICUBIC)
        diffs.append(float(np.abs(np.asarray(win, dtype=np.float32) - target).mean()))
    return min(diffs), float(np.median(diffs))


def test_embedded_held_out_crops_come_from_bottom_band(tmp_path):
    # With crop_scale [1, 1] every crop is a full-height square of its region, so its location is
    # found by a search over horizontal offsets in the independently loaded source image.
    out = tmp_path / "band"
    prepare({**EMBEDDED, "n_train": N_SOURCES, "n_test": N_SOURCES, "crop_scale": [1.0, 1.0],
             "test_region": 0.25}, "embedded", out)
    man = _manifest(out)
    label_of = {f["path"]: f["label"] for f in man["files"]}
    test_ims, test_labels, _ = _raw_split(out, "test")
    train_ims, train_labels, _ = _raw_split(out, "train")
    assert sorted(test_labels.tolist()) == list(range(N_SOURCES))
    for name, src in _rgb_sources().items():
        h, w = src.shape[:2]
        cut = h - round(h * 0.25)
        label = label_of[name]
        test_crop = test_ims[list(test_labels).index(label)]
        best, typical = _find_window(test_crop, src[cut:], min(h - cut, w), 64)
        assert best < 3.0 and best < typical / 4, f"{name}: held-out crop not in the bottom band ({best}, {typical})"
        # and it does not match the rows just above the band (the last training rows)
        above, _ = _find_window(test_crop, src[cut - (h - cut):cut], min(h - cut, w), 64)
        assert above > 3 * best + 3, f"{name}: held-out crop also matches training rows"
        if name in ("skimage:astronaut", "skimage:chelsea"):  # (the search is slow for big windows)
            train_crop = train_ims[list(train_labels).index(label)]
            best, typical = _find_window(train_crop, src[:cut], min(cut, w), 64)
            assert best < 3.0 and best < typical / 4, f"{name}: train crop not above the band ({best}, {typical})"


def test_embedded_provenance(embedded_ds):
    rec = json.loads((embedded_ds / "provenance.json").read_text())
    assert rec["stage"] == "prepare-data" and rec["run"] == "embedded"
    assert rec["params"]["n_train"] == 64 and rec["params"]["on_bad_image"] == "error"
    canon = json.dumps(rec["params"], sort_keys=True, separators=(",", ":"))
    assert rec["params_sha256"] == _sha(canon.encode())
    assert rec["seeds"] == {"seed": 0}
    files = rec["outputs"]["files"]
    on_disk = {p.name for p in embedded_ds.iterdir()} - {"provenance.json"}
    assert set(files) == on_disk
    for name, digest in files.items():
        assert digest == _sha((embedded_ds / name).read_bytes())
    assert _manifest(embedded_ds)["params_sha256"] == rec["params_sha256"]


def test_embedded_bad_crop_scale(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(SpecmatchError, match="crop_scale"):
        prepare({**EMBEDDED, "n_train": 4, "n_test": 2, "crop_scale": [0.9, 0.5]}, "embedded", out)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- ADM centre crop


@pytest.mark.parametrize("wh", [(100, 50), (64, 64), (257, 300), (50, 100), (600, 130), (33, 32), (31, 47), (513, 512)])
@pytest.mark.parametrize("size", [32, 64])
def test_adm_center_crop_matches_guided_diffusion(wh, size):
    rng = np.random.default_rng(wh[0] * 1000 + wh[1])
    img = Image.fromarray(_noise_rgb(rng, wh[1], wh[0]))
    got = images.adm_center_crop(img, size)
    ref = center_crop_arr(img.copy(), size)
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)


def test_adm_center_crop_exact_size_unchanged():
    arr = _noise_rgb(np.random.default_rng(1), 64, 64)
    np.testing.assert_array_equal(images.adm_center_crop(Image.fromarray(arr), 64), arr)


def test_decode_reports_file_name():
    with pytest.raises(images.BadImage, match="some/file.jpg"):
        images.decode(b"definitely not an image", "some/file.jpg")
    with pytest.raises(images.BadImage, match="cut.jpg"):
        images.decode(_truncated_jpeg(), "cut.jpg")


# --------------------------------------------------------------------------- folder source


def _folder_params(root: Path, **kw) -> dict:
    return {"source": "folder", "root": str(root), "resolution": 32, "seed": 0, "n_test": 3,
            "workers": 1, "shard_size": 4, **kw}


def test_folder_source_modes_crop_and_split(tmp_path):
    root = tmp_path / "celeb"
    made = _make_mixed_folder(root)
    out = tmp_path / "out"
    man = prepare(_folder_params(root), "celeb", out)
    assert man == _manifest(out)
    assert man["classes"] == ["celeb"] and man["num_classes"] == 1
    paths = [f["path"] for f in man["files"]]
    assert sorted(paths) == sorted(made)  # non-images, sub-folders and hidden files ignored
    by_split = {s: {f["path"] for f in man["files"] if f["split"] == s} for s in ("train", "test")}
    assert len(by_split["test"]) == 3 and len(by_split["train"]) == len(made) - 3
    assert not by_split["train"] & by_split["test"]
    assert man["splits"]["train"]["count"] == 5 and man["splits"]["test"]["count"] == 3
    seen = set()
    for split in ("train", "test"):
        ims, labels, sources = _raw_split(out, split)
        assert ims.shape == (len(by_split[split]), 32, 32, 3) and ims.dtype == np.uint8
        assert (labels == 0).all()
        assert man["splits"][split]["images_sha256"] == _stream_hash(ims, "|u1")
        for im, src in zip(ims, sources):
            entry = man["files"][src]
            assert entry["split"] == split
            path = root / entry["path"]
            assert entry["sha256"] == _sha(path.read_bytes())
            np.testing.assert_array_equal(im, center_crop_arr(_reference_rgb(path), 32), err_msg=entry["path"])
            info = made[entry["path"]]
            if info["mode"] in ("L", "I;16"):
                assert (im[..., 0] == im[..., 1]).all() and (im[..., 1] == im[..., 2]).all()
            if info["mode"] == "I;16":
                # a 16-bit image is rescaled, not clipped to white
                ref = center_crop_arr(Image.fromarray(np.stack([info["gray8"]] * 3, -1)), 32)
                np.testing.assert_array_equal(im, ref)
                assert im.mean() < 250
            if info["mode"] == "RGBA":
                ref = center_crop_arr(Image.fromarray(np.ascontiguousarray(info["rgb"])), 32)
                np.testing.assert_array_equal(im, ref)
            if "exact" in info:
                np.testing.assert_array_equal(im, info["exact"])
            seen.add(entry["path"])
    assert seen == set(made)


def test_folder_split_deterministic_and_seeded(tmp_path):
    root = tmp_path / "imgs"
    _good_folder(root, 10, size=(20, 20))
    splits = []
    for seed in range(3):
        out = tmp_path / f"out{seed}"
        man = prepare(_folder_params(root, seed=seed, resolution=16), "d", out)
        test = tuple(sorted(f["path"] for f in man["files"] if f["split"] == "test"))
        train = tuple(sorted(f["path"] for f in man["files"] if f["split"] == "train"))
        assert len(test) == 3 and len(train) == 7 and not set(test) & set(train)
        splits.append(test)
    assert len(set(splits)) >= 2  # the seed picks the held-out images
    again = prepare(_folder_params(root, seed=2, resolution=16), "d", tmp_path / "again")
    assert _files_bytes(tmp_path / "again") == _files_bytes(tmp_path / "out2")
    assert tuple(sorted(f["path"] for f in again["files"] if f["split"] == "test")) == splits[2]
    capped = prepare(_folder_params(root, n_train=2, resolution=16), "d", tmp_path / "capped")
    assert capped["splits"]["train"]["count"] == 2 and capped["splits"]["test"]["count"] == 3


def test_folder_provenance_input_and_rebuild_replaces(tmp_path):
    root = tmp_path / "imgs"
    _good_folder(root, 5, size=(20, 20))
    out = tmp_path / "out"
    prepare(_folder_params(root, n_test=1, resolution=16), "d", out)
    rec1 = json.loads((out / "provenance.json").read_text())
    inp = [i for i in rec1["inputs"] if i["role"] == "images"]
    assert len(inp) == 1 and inp[0]["kind"] == "folder" and len(inp[0]["sha256"]) == 64
    (out / "stale-file.txt").write_text("left from an earlier run")
    # change one source image: the input hash changes and the output is replaced whole
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "img000.png")
    prepare(_folder_params(root, n_test=1, resolution=16), "d", out)
    rec2 = json.loads((out / "provenance.json").read_text())
    assert [i for i in rec2["inputs"] if i["role"] == "images"][0]["sha256"] != inp[0]["sha256"]
    assert not (out / "stale-file.txt").exists()


# --------------------------------------------------------------------------- imagenet source


def _class_tree(root: Path, classes: dict[str, int], size=(24, 20), seed=0) -> None:
    rng = np.random.default_rng(seed)
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(_noise_rgb(rng, *size)).save(root / cls / f"{cls}_{i:03d}.png")


def _imagenet_params(root: Path, test_root: Path | None = None, **kw) -> dict:
    return {"source": "imagenet", "root": str(root), "test_root": str(test_root) if test_root else None,
            "resolution": 16, "seed": 0, "n_test": 0, "workers": 1, "shard_size": 5, **kw}


def test_imagenet_labels_are_sorted_class_indices(tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    order = ["n03_cat", "n01_dog", "n02_bird"]  # created out of order
    _class_tree(train, dict.fromkeys(order, 3), seed=1)
    _class_tree(val, dict.fromkeys(order, 2), seed=2)
    (train / "n01_dog" / "labels.txt").write_text("ignored")
    (train / ".cache").mkdir()  # hidden folders are not classes
    out = tmp_path / "out"
    man = prepare(_imagenet_params(train, val), "inet", out)
    classes = sorted(order)
    assert man["classes"] == classes and man["num_classes"] == 3
    assert man["splits"]["train"]["count"] == 9 and man["splits"]["test"]["count"] == 6
    for split, root in (("train", train), ("test", val)):
        ims, labels, sources = _raw_split(out, split)
        assert ims.shape[1:] == (16, 16, 3)
        for im, label, src in zip(ims, labels, sources):
            entry = man["files"][src]
            cls = entry["path"].split("/")[0]
            assert entry["split"] == split
            assert label == entry["label"] == classes.index(cls)
            path = root / entry["path"]
            assert entry["sha256"] == _sha(path.read_bytes())
            np.testing.assert_array_equal(im, center_crop_arr(Image.open(path).convert("RGB"), 16))
        assert man["splits"][split]["label_counts"] == {str(k): v for k, v in
                                                        enumerate(np.bincount(labels).tolist())}
    rec = json.loads((out / "provenance.json").read_text())
    roles = {i["role"] for i in rec["inputs"]}
    assert {"images", "test-images"} <= roles
    capped = prepare(_imagenet_params(train, val, n_test=4, n_train=5), "inet", tmp_path / "capped")
    assert capped["splits"]["test"]["count"] == 4 and capped["splits"]["train"]["count"] == 5


def test_imagenet_without_test_root_holds_out(tmp_path):
    train = tmp_path / "train"
    _class_tree(train, {"a": 4, "b": 4}, seed=3)
    man = prepare(_imagenet_params(train, n_test=3), "inet", tmp_path / "out")
    assert man["splits"]["test"]["count"] == 3 and man["splits"]["train"]["count"] == 5
    paths = {s: {f["path"] for f in man["files"] if f["split"] == s} for s in ("train", "test")}
    assert not paths["train"] & paths["test"] and len(paths["train"] | paths["test"]) == 8


def test_imagenet_test_root_with_different_classes(tmp_path, capsys):
    train, val = tmp_path / "train", tmp_path / "val"
    _class_tree(train, {"n01": 1, "n02": 1, "n03": 1})
    _class_tree(val, {"n01": 1, "n02": 1, "n04": 1})
    out = tmp_path / "out"
    with pytest.raises(SpecmatchError) as e:
        prepare(_imagenet_params(train, val), "inet", out)
    msg = str(e.value)
    assert "n04" in msg and "n03" in msg and "test_root" in msg and str(val) in msg
    assert not out.exists()
    assert _cli_prepare(_imagenet_params(train, val), "inet", out) == 2
    err = capsys.readouterr().err
    assert "n04" in err and "n03" in err and "Traceback" not in err
    assert not out.exists()


def test_imagenet_root_without_class_folders(tmp_path):
    flat = tmp_path / "flat"
    _good_folder(flat, 3)
    with pytest.raises(SpecmatchError) as e:
        prepare(_imagenet_params(flat), "inet", tmp_path / "out")
    assert "class" in str(e.value) and "datasets.inet.root" in str(e.value)


def test_imagenet_multiprocess_equals_single_process(tmp_path, monkeypatch):
    import specmatch.data.prepare as prep

    pools = []
    real = prep.ProcessPoolExecutor

    class Spy(real):
        def __init__(self, *a, **kw):
            pools.append(kw.get("max_workers", a[0] if a else None))
            super().__init__(*a, **kw)

    monkeypatch.setattr(prep, "ProcessPoolExecutor", Spy)
    train = tmp_path / "train"
    _class_tree(train, {"x": 33, "y": 33}, size=(20, 18), seed=7)
    one, two = tmp_path / "w1", tmp_path / "w2"
    prepare(_imagenet_params(train, n_test=2, workers=1, shard_size=16), "inet", one)
    assert pools == []
    prepare(_imagenet_params(train, n_test=2, workers=2, shard_size=16), "inet", two)
    assert pools == [2]  # the 64 training images went through the process pool
    a, b = _files_bytes(one, skip=("provenance.json", "manifest.json")), _files_bytes(two, skip=("provenance.json", "manifest.json"))
    assert sorted(a) == sorted(b) and len(a) >= 5
    for name in a:
        assert a[name] == b[name], name
    ma, mb = _manifest(one), _manifest(two)
    ma.pop("params_sha256"), mb.pop("params_sha256")  # workers is a parameter
    assert ma == mb


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_bad_image_error_names_file_and_writes_nothing(tmp_path, capsys, kind):
    root = tmp_path / "imgs"
    _good_folder(root, 4)
    bad = root / f"bad_{kind}.jpg"
    bad.write_bytes({"truncated": _truncated_jpeg(), "garbage": b"GIF89a? no, just garbage " * 20,
                     "empty": b""}[kind])
    out = tmp_path / "results" / "ds"
    before = _listing(tmp_path)
    with pytest.raises(SpecmatchError) as e:
        prepare(_folder_params(root, n_test=1), "celeb", out)
    assert f"bad_{kind}.jpg" in str(e.value)
    assert "on_bad_image" in str(e.value)
    assert not out.exists()
    assert [p for p in _listing(tmp_path) if p not in before] in ([], ["results"])
    if (tmp_path / "results").exists():
        assert list((tmp_path / "results").iterdir()) == []  # no temporary folder left behind
    # the same through the CLI
    rc = _cli_prepare(_folder_params(root, n_test=1), "celeb", out)
    err = capsys.readouterr().err
    assert rc == 2 and f"bad_{kind}.jpg" in err and "Traceback" not in err
    assert not out.exists()


def test_bad_image_error_keeps_previous_output(tmp_path):
    root = tmp_path / "imgs"
    _good_folder(root, 4)
    out = tmp_path / "ds"
    prepare(_folder_params(root, n_test=1), "celeb", out)
    before = _files_bytes(out, skip=())
    (root / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    with pytest.raises(SpecmatchError, match="zz_broken.png"):
        prepare(_folder_params(root, n_test=1), "celeb", out)
    assert _files_bytes(out, skip=()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "imgs"]


def test_bad_images_skipped_and_listed(tmp_path):
    root = tmp_path / "imgs"
    _good_folder(root, 6)
    trunc, garbage = _truncated_jpeg(), b"garbage bytes" * 50
    (root / "trunc.jpg").write_bytes(trunc)
    (root / "garbage.jpg").write_bytes(garbage)
    out = tmp_path / "ds"
    man = prepare(_folder_params(root, n_test=2, on_bad_image="skip"), "celeb", out)
    skipped = {s["path"]: s for s in man["skipped"]}
    assert set(skipped) == {"trunc.jpg", "garbage.jpg"}
    assert skipped["trunc.jpg"]["sha256"] == _sha(trunc)
    assert skipped["garbage.jpg"]["sha256"] == _sha(garbage)
    for name, s in skipped.items():
        assert name in s["reason"] and s["split"] in ("train", "test")
    assert {f["path"] for f in man["files"]} == {f"img{i:03d}.png" for i in range(6)}
    assert man["splits"]["train"]["count"] + man["splits"]["test"]["count"] == 6
    assert _manifest(out)["skipped"] == man["skipped"]
    ims, _ = load_split(out, "train")
    assert ims.shape[0] == man["splits"]["train"]["count"]


def test_all_images_of_a_split_bad_with_skip(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        (root / f"x{i}.jpg").write_bytes(b"nope" * 10)
    with pytest.raises(SpecmatchError, match="skipped"):
        prepare(_folder_params(root, n_test=1, on_bad_image="skip"), "celeb", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_missing_root_names_path_and_parameter(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "folder"
    out = tmp_path / "ds"
    with pytest.raises(SpecmatchError) as e:
        prepare(_folder_params(missing), "celeb", out)
    assert str(missing) in str(e.value) and "datasets.celeb.root" in str(e.value)
    assert not out.exists()
    rc = _cli_prepare(_folder_params(missing), "celeb", out)
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err and "datasets.celeb.root" in err and "Traceback" not in err
    assert not out.exists()


def test_missing_test_root_names_parameter(tmp_path):
    train = tmp_path / "train"
    _class_tree(train, {"a": 1})
    missing = tmp_path / "val"
    with pytest.raises(SpecmatchError) as e:
        prepare(_imagenet_params(train, missing), "inet", tmp_path / "out")
    assert str(missing) in str(e.value) and "datasets.inet.test_root" in str(e.value)


def test_empty_folder(tmp_path, capsys):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "readme.txt").write_text("no images here")
    (root / "sub").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "sub" / "deep.png")
    with pytest.raises(SpecmatchError) as e:
        prepare(_folder_params(root, n_test=0), "celeb", tmp_path / "ds")
    assert str(root) in str(e.value) and "datasets.celeb.root" in str(e.value)
    assert _cli_prepare(_folder_params(root, n_test=0), "celeb", tmp_path / "ds") == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_n_test_too_large(tmp_path):
    root = tmp_path / "imgs"
    _good_folder(root, 3)
    with pytest.raises(SpecmatchError, match="n_test"):
        prepare(_folder_params(root, n_test=3), "celeb", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    "params, key",
    [
        ({**EMBEDDED, "colour": "red"}, "colour"),
        ({**EMBEDDED, "resolution": "64"}, "datasets.embedded.resolution"),
        ({**EMBEDDED, "n_train": 0}, "datasets.embedded.n_train"),
        ({**EMBEDDED, "on_bad_image": "ignore"}, "datasets.embedded.on_bad_image"),
        ({**EMBEDDED, "test_region": 1.0}, "datasets.embedded.test_region"),
        ({"source": "folder", "resolution": 32}, "root"),
        ({"source": "imagenet"}, "root"),
        ({"source": "tfrecords", "root": "x"}, "datasets.embedded.source"),
    ],
)
def test_invalid_parameters(tmp_path, capsys, params, key):
    out = tmp_path / "ds"
    with pytest.raises(SpecmatchError) as e:
        prepare(params, "embedded", out)
    assert key in str(e.value)
    assert _cli_prepare(params, "embedded", out) == 2
    err = capsys.readouterr().err
    assert key in err and "error" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("drop", ["n_train", "n_test"])
def test_embedded_without_split_sizes(tmp_path, capsys, drop):
    params = {k: v for k, v in EMBEDDED.items() if k != drop}
    out = tmp_path / "ds"
    try:
        rc = _cli_prepare(params, "embedded", out)
    except Exception as e:  # noqa: BLE001 - the bug: an ordinary exception escapes the CLI
        pytest.fail(f"{type(e).__name__} escaped instead of a SpecmatchError: {e}")
    err = capsys.readouterr().err
    assert rc == 2 and drop in err and "Traceback" not in err
    assert not out.exists()


def test_params_file_and_bad_params_arg(tmp_path, capsys):
    pfile = tmp_path / "p.yaml"
    root = tmp_path / "imgs"
    _good_folder(root, 3, size=(16, 16))
    pfile.write_text(f"source: folder\nroot: {root}\nresolution: 8\nn_test: 1\nworkers: 1\n")
    out = tmp_path / "ds"
    assert cli.main(["prepare-data", "--name", "d", "--params", str(pfile), "--out", str(out)]) == 0
    assert _manifest(out)["splits"]["test"]["count"] == 1
    rc = cli.main(["prepare-data", "--name", "d", "--params", str(tmp_path / "nope.yaml"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.yaml" in err and "Traceback" not in err
    rc = cli.main(["prepare-data", "--name", "d", "--params", '{"source": ', "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "JSON" in err and "Traceback" not in err


@pytest.mark.parametrize("stage, words", [("prepare-data", ["--params", "--out", "manifest.json", "provenance.json"]),
                                          ("data-spectra", ["--dataset", "--grids", "spectra.json"])])
def test_stage_help(capsys, stage, words):
    with pytest.raises(SystemExit) as e:
        cli.main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for w in words:
        assert w in out


# --------------------------------------------------------------------------- shards


def test_write_npz_loads_and_is_byte_identical(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {"images": rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8),
              "labels": np.arange(5, dtype=np.int64), "sources": np.array([4, 3, 2, 1, 0], dtype=np.int64)}
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    shards.write_npz(a, arrays)
    # a different wall-clock time must not change the bytes (zip entries carry a date)
    later = time.localtime(time.time() + 3 * 86400 + 7)
    monkeypatch.setattr(time, "localtime", lambda *args: later)
    shards.write_npz(b, arrays)
    assert a.read_bytes() == b.read_bytes()
    with np.load(a, allow_pickle=False) as z:
        assert sorted(z.files) == ["images", "labels", "sources"]
        for k, v in arrays.items():
            assert z[k].dtype == v.dtype
            np.testing.assert_array_equal(z[k], v)
    with zipfile.ZipFile(a) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    c = tmp_path / "c.npz"
    shards.write_npz(c, {"z": np.zeros((100, 100), np.uint8)}, compression="deflate")
    with np.load(c) as z:
        np.testing.assert_array_equal(z["z"], 0)
    assert c.stat().st_size < 100 * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "c.npz"]


def _small_dataset(tmp_path: Path, name="ds", n=7, shard_size=3) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    rng = np.random.default_rng(1)
    w = shards.ShardWriter(folder, "train", 4, shard_size)
    for i in range(n):
        w.add(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), i % 2, i)
    entry = w.close()
    shards.write_manifest(folder, {"schema": shards.MANIFEST_SCHEMA, "name": name, "resolution": 4,
                                   "splits": {"train": entry}})
    return folder


def test_shard_writer_layout(tmp_path):
    folder = _small_dataset(tmp_path)
    man = shards.read_manifest(folder)
    entry = man["splits"]["train"]
    assert [s["count"] for s in entry["shards"]] == [3, 3, 1]
    assert [s["file"] for s in entry["shards"]] == ["train-00000.npz", "train-00001.npz", "train-00002.npz"]
    assert entry["count"] == 7 and entry["label_counts"] == {"0": 4, "1": 3}
    ims, labels, sources = _raw_split(folder, "train")
    assert entry["images_sha256"] == _stream_hash(ims, "|u1")
    np.testing.assert_array_equal(labels, np.arange(7) % 2)
    np.testing.assert_array_equal(sources, np.arange(7))
    parts = list(shards.iter_shards(folder, "train", verify=True))
    assert [len(p["images"]) for p in parts] == [3, 3, 1]


def test_iter_shards_verify_detects_modified_shard(tmp_path):
    folder = _small_dataset(tmp_path)
    path = folder / "train-00001.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SpecmatchError) as e:
        list(shards.iter_shards(folder, "train", verify=True))
    assert "train-00001.npz" in str(e.value) and "sha256" in str(e.value)
    with pytest.raises(SpecmatchError, match="train-00001.npz"):
        load_split(folder, "train")


def test_shard_reader_errors(tmp_path):
    with pytest.raises(SpecmatchError) as e:
        shards.read_manifest(tmp_path)
    assert str(tmp_path) in str(e.value) and "manifest.json" in str(e.value) and "prepare-data" in str(e.value)
    folder = _small_dataset(tmp_path)
    with pytest.raises(SpecmatchError, match="'valid'"):
        load_split(folder, "valid")
    (folder / "train-00002.npz").unlink()
    with pytest.raises(SpecmatchError, match="train-00002.npz"):
        load_split(folder, "train")
    other = _small_dataset(tmp_path, "other")
    man = json.loads((other / "manifest.json").read_text())
    man["schema"] = "something/else"
    (other / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(SpecmatchError, match="schema"):
        shards.read_manifest(other)


# --------------------------------------------------------------------------- data-spectra


def _bin_counts(h: int, w: int, n_bins: int) -> np.ndarray:
    u, v = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    r = np.sqrt(u ** 2 + v ** 2)
    bins = np.minimum(np.floor(n_bins * r / math.hypot(h - 1, w - 1)), n_bins - 1).astype(int)
    return np.bincount(bins.ravel(), minlength=n_bins), bins


@pytest.fixture(scope="module")
def spectra_run(embedded_ds, tmp_path_factory):
    from specmatch.metrics import spectra

    out = tmp_path_factory.mktemp("spec") / "spectra"
    result = spectra.run(embedded_ds, {}, [16, 8, 4], "embedded", out)
    return out, result


def test_data_spectra_outputs(spectra_run, embedded_ds):
    out, result = spectra_run
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "spectra.json", "spectrum_distribution.png"]
    assert json.loads((out / "spectra.json").read_text()) == result
    png = (out / "spectrum_distribution.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as im:
        im.verify()
    assert result["n_images"] == 64 and result["dataset"] == "embedded" and result["resolution"] == 64
    assert result["images_sha256"] == _manifest(embedded_ds)["splits"]["train"]["images_sha256"]
    rec = json.loads((out / "provenance.json").read_text())
    assert rec["stage"] == "data-spectra" and rec["params"]["latent_grids"] == [16, 8, 4]
    (inp,) = rec["inputs"]
    assert inp["kind"] == "stage-output"
    assert inp["provenance_sha256"] == _sha((embedded_ds / "provenance.json").read_bytes())
    for name in ("spectra.json", "spectrum_distribution.png"):
        assert rec["outputs"]["files"][name] == _sha((out / name).read_bytes())


def test_data_spectra_distributions(spectra_run):
    _, result = spectra_run
    assert set(result["grids"]) == {"16", "8", "4"}
    summaries = {**{int(g): s for g, s in result["grids"].items()}, 64: result["full_resolution"]}
    for g, s in summaries.items():
        assert s["size"] == [g, g]
        counts, _ = _bin_counts(g, g, 16)
        assert s["bin_counts"] == counts.tolist()
        valid = counts > 0
        assert s["valid_bins"] == valid.tolist()
        dists = s["training"]["distribution"]
        assert list(dists) == ["0.0", "0.6", "0.8", "1.0", "1.2"]
        for key, d in dists.items():
            mean = np.array(d["mean"])
            assert mean[valid].sum() == pytest.approx(1.0, abs=1e-5), (g, key)
            assert (mean[~valid] == 0).all() and (mean >= 0).all()
            assert (np.array(d["std"]) >= 0).all()
        # the tilt moves mass to high frequencies
        last = np.flatnonzero(valid)[-1]
        assert dists["1.2"]["mean"][last] > dists["0.0"]["mean"][last]
        assert dists["1.2"]["mean"][0] <= dists["0.0"]["mean"][0] + 1e-9
        amean = np.array(s["analysis"]["distribution"]["mean"])
        assert amean[valid].sum() == pytest.approx(1.0, abs=1e-5)
        assert s["training"]["setting"] == {"center": "mean", "remove_dc": True}
        assert s["analysis"]["setting"] == {"center": "none", "remove_dc": False}
    # natural images: power-law spectrum with a clearly negative exponent
    psd = result["full_resolution"]["psd_exponent"]
    assert psd["of_mean_energy"] < -1
    assert psd["per_image_mean"] < -1
    for s in result["grids"].values():
        assert s["psd_exponent"]["of_mean_energy"] < 0


def test_data_spectra_full_resolution_matches_scipy(spectra_run, embedded_ds):
    import scipy.fft

    _, result = spectra_run
    ims, _, _ = _raw_split(embedded_ds, "train")
    x = ims.astype(np.float64).transpose(0, 3, 1, 2) / 127.5 - 1.0
    counts, bins = _bin_counts(64, 64, 16)
    onehot = np.eye(16)[bins.ravel()] / np.maximum(counts, 1)

    def dist(xx, center, remove_dc):
        if center:
            xx = xx - xx.mean(axis=(-2, -1), keepdims=True)
        p = np.maximum((scipy.fft.dctn(xx, axes=(-2, -1), norm="ortho") ** 2).mean(1), 1e-12)
        if remove_dc:
            p[:, 0, 0] = 0.0
        e = p.reshape(len(p), -1) @ onehot
        return e

    e_an = dist(x, False, False)
    q = np.log1p(e_an)
    np.testing.assert_allclose(result["full_resolution"]["analysis"]["distribution"]["mean"],
                               (q / q.sum(1, keepdims=True)).mean(0), rtol=1e-4, atol=1e-6)
    e_tr = dist(x, True, True)
    k = np.arange(16)
    for delta in (0.0, 1.2):
        q = np.log1p(e_tr * (k + 1.0) ** delta)
        np.testing.assert_allclose(result["full_resolution"]["training"]["distribution"][repr(delta)]["mean"],
                                   (q / q.sum(1, keepdims=True)).mean(0), rtol=1e-4, atol=1e-6)


def test_data_spectra_small_grid_has_invalid_bins(spectra_run):
    _, result = spectra_run
    s = result["grids"]["4"]
    counts, _ = _bin_counts(4, 4, 16)
    assert not counts.all()  # 4x4 with 16 bins leaves empty bins
    assert s["valid_bins"] == (counts > 0).tolist()
    assert s["bin_counts"] == counts.tolist()


def test_data_spectra_max_images_subset(embedded_ds):
    from specmatch import config
    from specmatch.metrics import spectra

    raw, _, _ = _raw_split(embedded_ds, "train")
    rows = {im.tobytes(): i for i, im in enumerate(raw)}

    def picked(seed):
        batches = list(spectra.image_batches(embedded_ds, "train", 20, 7, seed))
        assert all(0 < b.shape[0] <= 7 for b in batches)  # (batches do not span shards)
        x = np.concatenate([b.numpy() for b in batches])
        assert x.shape == (20, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
        u8 = np.rint((x + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
        idx = [rows[im.tobytes()] for im in u8]  # every image is one of the split's
        assert idx == sorted(set(idx))  # distinct, in dataset order
        return idx

    a = picked(0)
    assert picked(0) == a  # seeded
    assert picked(1) != a
    p = config.validate({"max_images": 20, "batch_size": 7, "deltas": [1.0]}, ref="spectra")
    result = spectra.dataset_spectra(embedded_ds, [8], p)
    assert result["n_images"] == 20
    assert list(result["grids"]["8"]["training"]["distribution"]) == ["0.0", "1.0"]


def test_data_spectra_grid_larger_than_resolution(embedded_ds, tmp_path, capsys):
    from specmatch.metrics import spectra

    out = tmp_path / "s"
    with pytest.raises(SpecmatchError) as e:
        spectra.run(embedded_ds, {}, [16, 128], "embedded", out)
    assert "128" in str(e.value) and "64" in str(e.value)
    assert not out.exists()
    rc = cli.main(["data-spectra", "--dataset", str(embedded_ds), "--name", "embedded", "--grids", "128",
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "128" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_data_spectra_bad_inputs(tmp_path, embedded_ds, capsys):
    from specmatch.metrics import spectra

    with pytest.raises(SpecmatchError, match="manifest.json"):
        spectra.run(tmp_path, {}, [8], "x", tmp_path / "out")
    with pytest.raises(SpecmatchError, match="spectra.n_bins"):
        spectra.run(embedded_ds, {"n_bins": 1}, [8], "x", tmp_path / "out")
    with pytest.raises(SpecmatchError, match="spectra"):
        spectra.run(embedded_ds, {"colour": 1}, [8], "x", tmp_path / "out")
    assert not (tmp_path / "out").exists()
