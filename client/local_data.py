"""A device's own labelled images, from a folder its operator names in the node config (`data-dir=...`).

Two layouts are read:
- class folders: `DIR/<class>/*.png|*.jpg|...`, `<class>` a class index (`0`, `1`, ...) or a class name
  of the federation's dataset (`Trouser`, `Bag`; spaces or slashes as `_` are accepted too);
- IDX files: `DIR/images-idx3-ubyte[.gz]` and `DIR/labels-idx1-ubyte[.gz]` (any file names ending so).

Images are converted to single-channel uint8 of the dataset's native size; a folder that holds
something else fails with an error that names the file and the fix.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.data import CLASS_NAMES, StoredSplit, read_idx

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _class_index(name: str, class_names: list[str]) -> int:
    if name.isdigit() and int(name) < len(class_names):
        return int(name)
    norm = lambda s: s.lower().replace(" ", "_").replace("/", "_")
    for i, cls in enumerate(class_names):
        if norm(cls) == norm(name):
            return i
    raise ValueError(f"class folder '{name}' is neither an index 0..{len(class_names) - 1} nor a class name of "
                     f"this dataset ({', '.join(class_names)}); rename or remove it")


def _read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L"), dtype=np.uint8)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable image ({exc}); remove it from the data folder") from None
    if arr.shape != size:
        raise ValueError(f"{path} is {arr.shape[1]}x{arr.shape[0]} pixels; this federation's images are "
                         f"{size[1]}x{size[0]}: resize it first")
    return arr


def _idx_pair(root: Path) -> tuple[Path, Path] | None:
    images = sorted(p for p in root.iterdir() if p.name.endswith(("images-idx3-ubyte", "images-idx3-ubyte.gz")))
    labels = sorted(p for p in root.iterdir() if p.name.endswith(("labels-idx1-ubyte", "labels-idx1-ubyte.gz")))
    if not images and not labels:
        return None
    if len(images) != 1 or len(labels) != 1:
        raise ValueError(f"{root} must hold exactly one *images-idx3-ubyte[.gz] and one *labels-idx1-ubyte[.gz] "
                         f"file; found {[p.name for p in images + labels]}")
    return images[0], labels[0]


def load_local_folder(data_dir: str, dataset: str, native_size: tuple[int, int], image_size: int,
                      num_classes: int) -> StoredSplit:
    """The device's images and labels as a StoredSplit (uint8 pixels, int64 labels, ids 0..n-1)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data-dir '{root}' is not a folder; set the SuperNode's node config "
                                f"data-dir to the folder holding this device's images")
    pair = _idx_pair(root)
    if pair is not None:
        pixels, labels = read_idx(pair[0]), read_idx(pair[1]).astype(np.int64)
        if pixels.ndim != 3 or tuple(pixels.shape[1:]) != native_size or len(pixels) != len(labels):
            raise ValueError(f"{pair[0].name}: {pixels.shape} images for {len(labels)} labels; expected "
                             f"(n, {native_size[0]}, {native_size[1]}) and n labels")
    else:
        class_names = CLASS_NAMES.get(dataset, [str(c) for c in range(num_classes)])
        pix, lab = [], []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            c = _class_index(folder.name, class_names)
            for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                pix.append(_read_image(path, native_size))
                lab.append(c)
        if not pix:
            raise ValueError(f"{root} holds no images: put them in one folder per class ({root}/<class>/*.png) "
                             f"or give the two IDX files")
        pixels, labels = np.stack(pix), np.asarray(lab, dtype=np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{root}: labels outside 0..{num_classes - 1}")
    return StoredSplit(pixels, torch.from_numpy(labels), torch.arange(len(labels)), image_size)
