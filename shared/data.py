"""Real labelled images that load offline (docs/data.md), split into public / private / test.

Default: full Fashion-MNIST from Debian's `dataset-fashion-mnist` (IDX .gz files). Any directory of
the four standard IDX files works with `--data-dir`.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shared.config import DataConfig
from shared.registry import Registry

DATASETS: Registry = Registry("dataset")
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"      # Debian's dataset-fashion-mnist
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASS_NAMES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (.gz or raw): magic 0,0,dtype,ndim then big-endian u32 dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values (truncated file?)")
    return data.reshape(dims)


@DATASETS.register("fashion-mnist")
def load_idx_dir(data_dir: str | None = None) -> dict[str, np.ndarray]:
    root = Path(data_dir or DEFAULT_DATA_DIR)
    missing = [name for name in IDX_FILES.values() if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"dataset files {missing} not found in {root}. Install the default dataset with "
            "`sudo apt-get install dataset-fashion-mnist` (or `make data`), or pass --data-dir DIR "
            "holding the four IDX .gz files.")
    return {key: read_idx(root / name) for key, name in IDX_FILES.items()}


@dataclass
class ImageSplit:
    """Images as float tensors in [-1, 1], shape (N, C, S, S), with int64 labels and stable ids."""
    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "ImageSplit":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageSplit(self.images[idx], self.labels[idx], self.ids[idx])


@dataclass
class Dataset:
    """Splits as float ImageSplits (`load_dataset`), or as stored uint8 StoredSplits (`stored_splits`)."""
    name: str
    num_classes: int
    public: "ImageSplit | StoredSplit"
    private: "ImageSplit | StoredSplit"
    test: "ImageSplit | StoredSplit"
    native_shape: tuple[int, int] = (28, 28)   # one image as stored (uint8, H x W), before padding

    @property
    def raw_bytes_per_image(self) -> int:
        """Size of one image as stored (uint8), for uplink comparisons."""
        return self.native_shape[0] * self.native_shape[1]

    @property
    def class_names(self) -> list[str]:
        return CLASS_NAMES.get(self.name, [str(c) for c in range(self.num_classes)])

    def converted(self) -> "Dataset":
        return replace(self, public=self.public.converted(), private=self.private.converted(),
                       test=self.test.converted())


def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, size, size) in [-1, 1], zero-padded (black) to `size`."""
    return pad_black(torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1), size)


def pad_black(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1], centred in `size` x `size` with black (-1) borders."""
    pad = size - x.shape[-1]
    if pad < 0:
        raise ValueError(f"image_size {size} is smaller than the images ({x.shape[-1]})")
    return F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)


@functools.lru_cache(maxsize=2)
def read_dataset(name: str, data_dir: str | None) -> dict[str, np.ndarray]:
    """The stored arrays (uint8; ~55 MB for Fashion-MNIST), memory-mapped from an uncompressed copy in the
    cache (written once, atomically); a device of a simulated federation reads its own rows from it
    (`private_share`), not the whole set."""
    from shared.cache import cache_root
    root = cache_root() / "datasets" / f"{name}-{_source_key(name, data_dir)}"
    if not (root / "complete").exists():
        arrays = DATASETS[name](data_dir)
        root.mkdir(parents=True, exist_ok=True)
        for key, array in arrays.items():
            tmp = root / f".{key}.{os.getpid()}.npy"
            np.save(tmp, np.ascontiguousarray(array))
            os.replace(tmp, root / f"{key}.npy")
        tmp = root / f".complete.{os.getpid()}"
        tmp.write_text(json.dumps(sorted(arrays)))
        os.replace(tmp, root / "complete")
    keys = json.loads((root / "complete").read_text())
    return {key: np.load(root / f"{key}.npy", mmap_mode="r") for key in keys}


def _source_key(name: str, data_dir: str | None) -> str:
    """Names the source files by path, size and modification time, so a changed file is read again."""
    folder = Path(data_dir or DEFAULT_DATA_DIR)
    stats = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.glob("*") if p.is_file())
    return hashlib.sha256(json.dumps([name, str(folder.resolve()), stats]).encode()).hexdigest()[:16]


@dataclass
class StoredSplit:
    """Images as stored (uint8, N x H x W), converted to an ImageSplit on demand: a node converts only
    the chunk it encodes, not the whole training set (conversion is per image, so the result is the same)."""
    pixels: np.ndarray
    labels: torch.Tensor
    ids: torch.Tensor
    image_size: int

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "StoredSplit":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return StoredSplit(self.pixels[idx.numpy()], self.labels[idx], self.ids[idx], self.image_size)

    def converted(self) -> ImageSplit:
        return ImageSplit(to_tensor(self.pixels, self.image_size), self.labels, self.ids)


def split_indices(cfg: DataConfig, train_size: int, test_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the training file in the public and private splits, and rows of the test file kept;
    deterministic for `cfg.seed`: public first, then the private split (cut to `train_limit`)."""
    order = torch.randperm(train_size, generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.public_size >= train_size:
        raise ValueError(f"public_size {cfg.public_size} leaves no private data (train has {train_size})")
    public, private = order[:cfg.public_size], order[cfg.public_size:]
    if cfg.train_limit:
        private = private[:cfg.train_limit]
    test = torch.arange(test_size)
    if cfg.test_limit:
        test = torch.randperm(test_size, generator=torch.Generator().manual_seed(cfg.seed + 1))[:cfg.test_limit]
    return public, private, test


def stored_splits(cfg: DataConfig) -> Dataset:
    """Public, private and test splits (`split_indices`), as stored."""
    raw = read_dataset(cfg.dataset, cfg.data_dir)
    train_y = torch.from_numpy(raw["train_labels"].astype(np.int64))
    test_y = torch.from_numpy(raw["test_labels"].astype(np.int64))
    train = StoredSplit(raw["train_images"], train_y, torch.arange(len(train_y)), cfg.image_size)
    test = StoredSplit(raw["test_images"], test_y, torch.arange(len(test_y)), cfg.image_size)
    public, private, kept = split_indices(cfg, len(train), len(test))
    return Dataset(cfg.dataset, int(train_y.max()) + 1, train.subset(public), train.subset(private), test.subset(kept),
                   tuple(int(d) for d in raw["train_images"].shape[1:]))


def private_share(cfg: DataConfig, rows_of_share) -> StoredSplit:
    """One device's share of the private split, reading only its rows: `rows_of_share(private labels)`
    returns the share's positions in the private split (a partition rule)."""
    raw = read_dataset(cfg.dataset, cfg.data_dir)
    labels = torch.from_numpy(raw["train_labels"].astype(np.int64))
    _, private, _ = split_indices(cfg, len(labels), len(raw["test_labels"]))
    rows = private[torch.as_tensor(rows_of_share(labels[private].numpy()), dtype=torch.long)]
    order = torch.argsort(rows)                                  # sequential reads of the mapped file
    rows = rows[order]
    pixels = read_rows(raw["train_images"], rows.numpy())
    share = StoredSplit(pixels, labels[rows], rows, cfg.image_size)
    return share.subset(torch.argsort(order))                   # back to the partition's order


def read_rows(mapped: np.memmap, rows: np.ndarray) -> np.ndarray:
    """Rows of a memory-mapped array read with pread, not through the mapping: a page fault may map far more
    of the file than the rows (fault-around), and all of it would count as the process's resident memory."""
    row_bytes = int(np.prod(mapped.shape[1:])) * mapped.dtype.itemsize
    out = np.empty((len(rows), *mapped.shape[1:]), dtype=mapped.dtype)
    view = out.reshape(len(rows), -1).view(np.uint8)
    fd = os.open(mapped.filename, os.O_RDONLY)
    try:
        for i, row in enumerate(rows.tolist()):
            view[i] = np.frombuffer(os.pread(fd, row_bytes, mapped.offset + row * row_bytes), dtype=np.uint8)
    finally:
        os.close(fd)
    return out


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load, split (`stored_splits`) and convert every split to float images."""
    return stored_splits(cfg).converted()
