"""`specmatch prepare-data`: build a dataset's uint8 shards and manifest (docs/parameters.md, `datasets.<name>`).

Sources: `embedded` (crops of bundled images), `folder` (a flat folder of images, the
CelebA-HQ 256 layout) and `imagenet` (one sub-folder per class). Folder and ImageNet images
are read, hashed and decoded in worker processes, in order, and brought to the output size
with ADM's centre crop; shards are written as they fill, so memory stays at one shard.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from .. import config
from ..errors import SpecmatchError
from ..runtime.atomic import atomic_dir
from ..runtime.hashing import sha256_json
from ..runtime.provenance import Provenance, display_path
from . import embedded, images
from .shards import MANIFEST_SCHEMA, ShardWriter, write_manifest

log = logging.getLogger(__name__)


def _folder(root: str, name: str, key: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise SpecmatchError(
            f"dataset {name}: folder {path} does not exist (set by parameter datasets.{name}.{key}); "
            "point it at the images in params.yaml")
    return path


def _list_images(folder: Path, name: str, key: str) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if images.is_image_file(p)), key=lambda p: p.name)
    if not files:
        raise SpecmatchError(f"dataset {name}: no image files ({' '.join(images.IMAGE_EXTENSIONS)}) "
                             f"directly in {folder} (parameter datasets.{name}.{key})")
    return files


def _list_classes(folder: Path, name: str, key: str, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise SpecmatchError(f"dataset {name}: {folder} has no class sub-folders (parameter "
                             f"datasets.{name}.{key}); the imagenet source expects <root>/<class>/<image>")
    if classes is not None and found != classes:
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise SpecmatchError(f"dataset {name}: class folders of {folder} (parameter datasets.{name}.{key}) "
                             f"differ from the training classes: extra {extra[:5]}, missing {missing[:5]}")
    items = [(p, label) for label, cls in enumerate(found)
             for p in sorted((q for q in (folder / cls).iterdir() if images.is_image_file(q)), key=lambda q: q.name)]
    if not items:
        raise SpecmatchError(f"dataset {name}: no image files in the class folders of {folder}")
    return found, items


def _hold_out(items: list, n_test: int, n_train: int | None, seed: int, name: str) -> dict[str, list]:
    """Seeded split of one list into held-out and train items (each kept in listing order)."""
    if n_test >= len(items):
        raise SpecmatchError(f"dataset {name}: n_test={n_test} leaves no training images ({len(items)} found)")
    perm = np.random.default_rng([seed, 2]).permutation(len(items))
    test = sorted(perm[:n_test].tolist())
    train = sorted(perm[n_test:].tolist())
    if n_train is not None:
        train = train[:n_train]
    return {"train": [items[i] for i in train], "test": [items[i] for i in test]}


def _decode(paths: list[str], size: int, workers: int, desc: str) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    if workers <= 1 or len(paths) < 64:
        results: Iterable = (images.load_file(p, size) for p in paths)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(images.load_file, paths, [size] * len(paths), chunksize=32)
    try:
        yield from tqdm(results, total=len(paths), desc=desc, unit="img", mininterval=2.0)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


class _Builder:
    """Writes the shards of every split and collects the manifest's file lists."""

    def __init__(self, out: Path, name: str, p: dict[str, Any]):
        self.out, self.name, self.p = out, name, p
        self.files: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.splits: dict[str, Any] = {}

    def writer(self, split: str) -> ShardWriter:
        return ShardWriter(self.out, split, self.p["resolution"], self.p["shard_size"], self.p["compression"])

    def add_files(self, split: str, items: list[tuple[Path, int]], root: Path) -> None:
        w = self.writer(split)
        paths = [str(p) for p, _ in items]
        for (path, label), (digest, arr, err) in zip(items, _decode(paths, self.p["resolution"], self.p["workers"], f"{self.name}/{split}")):
            rel = path.relative_to(root).as_posix()
            if err is not None:
                if self.p["on_bad_image"] == "error":
                    raise SpecmatchError(f"{err}; set datasets.{self.name}.on_bad_image: skip to leave such files out")
                log.warning("skipping %s", err)
                self.skipped.append({"path": rel, "split": split, "reason": err, "sha256": digest})
                continue
            self.files.append({"path": rel, "label": label, "split": split, "sha256": digest})
            w.add(arr, label, len(self.files) - 1)
        self.splits[split] = w.close()
        if self.splits[split]["count"] == 0 and items:
            raise SpecmatchError(f"dataset {self.name}: every image of split {split} was skipped as undecodable")


def _build_embedded(b: _Builder, p: dict[str, Any]) -> list[str]:
    sources = embedded.load_sources()
    b.files = embedded.describe_sources(sources)
    for split, count in (("train", p["n_train"]), ("test", p["n_test"])):
        w = b.writer(split)
        it = embedded.crops(sources, split, count, p["resolution"], p["seed"], tuple(p["crop_scale"]), p["test_region"])
        for img, label in tqdm(it, total=count, desc=f"{b.name}/{split}", unit="crop", mininterval=2.0):
            w.add(img, label, label)
        b.splits[split] = w.close()
    return [name for name, _ in sources]


def _build_folder(b: _Builder, p: dict[str, Any], prov: Provenance) -> list[str]:
    root = _folder(p["root"], b.name, "root")
    files = [(f, 0) for f in _list_images(root, b.name, "root")]
    for split, items in _hold_out(files, p.get("n_test", 0), p.get("n_train"), p["seed"], b.name).items():
        b.add_files(split, items, root)
    prov.add_input(root, "images", sha256=_listing_digest(b, root))
    return [root.name]


def _build_imagenet(b: _Builder, p: dict[str, Any], prov: Provenance) -> list[str]:
    root = _folder(p["root"], b.name, "root")
    classes, items = _list_classes(root, b.name, "root")
    if p["test_root"]:
        test_root = _folder(p["test_root"], b.name, "test_root")
        _, test_items = _list_classes(test_root, b.name, "test_root", classes)
        n_train, n_test = p.get("n_train"), p.get("n_test", 0)
        b.add_files("train", items[:n_train] if n_train else items, root)
        b.add_files("test", test_items[:n_test] if n_test else test_items, test_root)
        prov.add_input(test_root, "test-images", sha256=_listing_digest(b, test_root, split="test"))
    else:
        for split, part in _hold_out(items, p.get("n_test", 0), p.get("n_train"), p["seed"], b.name).items():
            b.add_files(split, part, root)
    prov.add_input(root, "images", sha256=_listing_digest(b, root, split=None if not p["test_root"] else "train"))
    return classes


def _listing_digest(b: _Builder, root: Path, split: str | None = None) -> str:
    """Digest of the source files read (path, sha256), computed from the hashes taken while
    decoding, so the input folder is never read twice."""
    rows = [(e["path"], e["sha256"]) for e in b.files + b.skipped if split is None or e["split"] == split]
    return sha256_json(sorted(rows))


def prepare(params: dict[str, Any], name: str, out: str | Path) -> dict[str, Any]:
    """Validate the dataset's parameters, build it into `out` atomically, return the manifest."""
    p = config.validate(params, ref="dataset", where=f"datasets.{name}", source=f"parameters of dataset {name}")
    out = Path(out)
    prov = Provenance("prepare-data", name, p, seeds={"seed": p["seed"]})
    with atomic_dir(out) as tmp:
        b = _Builder(tmp, name, p)
        if p["source"] == "embedded":
            classes = _build_embedded(b, p)
        elif p["source"] == "folder":
            classes = _build_folder(b, p, prov)
        else:
            classes = _build_imagenet(b, p, prov)
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "name": name,
            "source": p["source"],
            "resolution": p["resolution"],
            "classes": classes,
            "num_classes": len(classes),
            "splits": b.splits,
            "files": b.files,
            "skipped": b.skipped,
            "params_sha256": sha256_json(p),
        }
        write_manifest(tmp, manifest)
        prov.write(out, tmp)
    log.info("dataset %s: %s written to %s", name,
             ", ".join(f"{k} {v['count']}" for k, v in b.splits.items()), display_path(out))
    return manifest
