"""Real labelled images that load offline (docs/data.md), split into public / private / test.

Default: full Fashion-MNIST from Debian's `dataset-fashion-mnist` (IDX .gz files). Any directory of
the four standard IDX files works with `--data-dir`.
"""
from __future__ import annotations

import functools
import gzip
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shared.config import DataConfig
from shared.registry import Registry

DATASETS: Registry = Registry("dataset")
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
    root = Path(data_dir or "/usr/share/datasets/fashion-mnist")
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
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    pad = size - x.shape[-1]
    if pad < 0:
        raise ValueError(f"image_size {size} is smaller than the images ({x.shape[-1]})")
    return F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)


@functools.lru_cache(maxsize=2)
def read_dataset(name: str, data_dir: str | None) -> dict[str, np.ndarray]:
    """The stored arrays (uint8; ~55 MB for Fashion-MNIST), read once per process and shared read-only:
    a Flower node asked for several chunks, or for several partitions in simulation, reads them once."""
    return DATASETS[name](data_dir)


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


def stored_splits(cfg: DataConfig) -> Dataset:
    """Public, private and test splits, deterministic for `cfg.seed`: public first, then the private
    split (cut to `train_limit`); the test split cut to `test_limit`."""
    raw = read_dataset(cfg.dataset, cfg.data_dir)
    train_y = torch.from_numpy(raw["train_labels"].astype(np.int64))
    test_y = torch.from_numpy(raw["test_labels"].astype(np.int64))
    train = StoredSplit(raw["train_images"], train_y, torch.arange(len(train_y)), cfg.image_size)
    test = StoredSplit(raw["test_images"], test_y, torch.arange(len(test_y)), cfg.image_size)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.public_size >= len(train):
        raise ValueError(f"public_size {cfg.public_size} leaves no private data (train has {len(train)})")
    public, private_idx = order[:cfg.public_size], order[cfg.public_size:]
    if cfg.train_limit:
        private_idx = private_idx[:cfg.train_limit]
    if cfg.test_limit:
        test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed + 1))[:cfg.test_limit])
    return Dataset(cfg.dataset, int(train_y.max()) + 1, train.subset(public), train.subset(private_idx), test,
                   tuple(int(d) for d in raw["train_images"].shape[1:]))


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load, split (`stored_splits`) and convert every split to float images."""
    return stored_splits(cfg).converted()
