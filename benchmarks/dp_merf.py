"""DP-MERF (Harder, Adamczewski & Park, "DP-MERF: Differentially Private Mean Embeddings with Random Features
for Practical Privacy-Preserving Data Generation", AISTATS 2021): one Gaussian release of the private data's
class-conditional mean embedding under random Fourier features, then a generator fitted to it with no further
access to the data. The central-DP synthetic-data baseline closest to ours (one release, then a free fit).

Published settings by default (ParkLabML/DP-MERF, `code_balanced/mnist_sr_gen.py --data fashion`): pixels in
[0, 1] flattened (28 x 28), 10,000 random features (5,000 frequencies, cos and sin, drawn N(0, 1/127)), the
embedding of (x, y) the outer product of the features with the one-hot label, the conditional convolutional
generator (code 5, hidden 200, channels 16 / 8, kernels 5 / 5, batch norm, sigmoid), Adam lr 0.01 decayed x0.9
per epoch, 5 epochs of 600 batches of 100. Each feature map has norm 1, so replacing one (image, label) moves
the embedding sum by at most 2; the noise std on that sum is sigma x 1 with sigma from this project's exact
Gaussian calibration (shared/accounting.py: `noise_for_epsilon`), the same as our central release, where the
paper's classical bound adds more noise at the same epsilon.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from benchmarks.dp_sgd import native_pixels
from client.privacy import secure_normal
from shared.data import pad_black
from shared.progress import progress


@dataclass(frozen=True)
class DPMERFConfig:
    features: int = 10_000
    bandwidth: float = 127.0          # frequencies ~ N(0, 1 / bandwidth)
    code: int = 5
    hidden: int = 200
    channels: tuple = (16, 8)
    kernels: tuple = (5, 5)
    lr: float = 0.01
    lr_decay: float = 0.9
    epochs: int = 5
    batch: int = 100
    batches_per_epoch: int = 600
    native: int = 28


def frequencies(cfg: DPMERFConfig, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(cfg.features // 2, dim, generator=gen) / math.sqrt(cfg.bandwidth)


def embed(x: torch.Tensor, labels_1hot: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of features(x) (outer) label: (features, classes). Each row's features have norm 1."""
    xw = x.flatten(1) @ w.t()
    phi = torch.cat([xw.cos(), xw.sin()], 1) / math.sqrt(w.shape[0])
    return phi.t() @ labels_1hot


@dataclass
class MERFRelease:
    mean: torch.Tensor        # (features, classes): the noised mean embedding
    noise_std: float          # on the mean
    records: int


def release_embedding(private, num_classes: int, sigma: float, w: torch.Tensor, native: int = 28,
                      chunk: int = 4096) -> MERFRelease:
    """The one release: the private split's embedding sum plus N(0, sigma^2) per entry (sensitivity 2 under
    replace-one, labels inside), over the public record count."""
    total = torch.zeros(w.shape[0] * 2, num_classes)
    for lo in range(0, len(private.labels), chunk):
        x = native_pixels(private.images[lo:lo + chunk], native)
        total += embed(x, nn.functional.one_hot(private.labels[lo:lo + chunk].long(), num_classes).float(), w)
    if sigma > 0:
        total += secure_normal(tuple(total.shape)) * sigma
    n = len(private.labels)
    return MERFRelease(total / n, sigma / n, n)


class ConvCondGenerator(nn.Module):
    """DP-MERF's ConvCondGen: [code, one-hot] -> linear 200 -> BN -> ReLU -> linear 16x7x7 -> BN -> up x2 ->
    conv 5x5 (8) -> ReLU -> up x2 -> conv 5x5 (1) -> sigmoid: 28 x 28 images in [0, 1]."""

    def __init__(self, cfg: DPMERFConfig, num_classes: int):
        super().__init__()
        c1, c2 = cfg.channels
        k1, k2 = cfg.kernels
        self.code, self.num_classes, self.c1 = cfg.code, num_classes, c1
        self.fc = nn.Sequential(nn.Linear(cfg.code + num_classes, cfg.hidden), nn.BatchNorm1d(cfg.hidden), nn.ReLU(),
                                nn.Linear(cfg.hidden, c1 * 49), nn.BatchNorm1d(c1 * 49))
        self.conv = nn.Sequential(nn.UpsamplingBilinear2d(scale_factor=2), nn.Conv2d(c1, c2, k1, padding=k1 // 2),
                                  nn.ReLU(), nn.UpsamplingBilinear2d(scale_factor=2),
                                  nn.Conv2d(c2, 1, k2, padding=k2 // 2), nn.Sigmoid())

    def forward(self, labels: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        code = torch.randn(len(labels), self.code, generator=gen)
        h = self.fc(torch.cat([code, nn.functional.one_hot(labels, self.num_classes).float()], 1))
        return self.conv(h.view(-1, self.c1, 7, 7))


def fit_generator(release: MERFRelease, w: torch.Tensor, num_classes: int, cfg: DPMERFConfig, seed: int
                  ) -> tuple[ConvCondGenerator, list[float]]:
    """Adam on || released mean - generated batch's mean embedding ||^2, labels drawn uniformly (the paper's
    single-release loss); the data is not touched again."""
    torch.manual_seed(seed)
    gen = ConvCondGenerator(cfg, num_classes)
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=cfg.lr_decay)
    losses = []
    for _ in progress(range(cfg.epochs), desc="DP-MERF generator"):
        for _ in range(cfg.batches_per_epoch):
            y = torch.randint(num_classes, (cfg.batch,))
            fake = embed(gen(y), nn.functional.one_hot(y, num_classes).float(), w) / cfg.batch
            loss = ((release.mean - fake) ** 2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
    return gen.eval(), losses


def sample(gen: ConvCondGenerator, ipc: int, num_classes: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ipc` images per class, back in the project's layout: (N, 1, S, S) in [-1, 1], zero-padded (black)."""
    y = torch.arange(num_classes).repeat_interleave(ipc)
    with torch.no_grad():
        x = gen(y, torch.Generator().manual_seed(seed)) * 2 - 1
    return pad_black(x, image_size), y


def dp_merf_sets(private, num_classes: int, sigma: float, ipc: int, seeds, image_size: int,
                 cfg: DPMERFConfig = DPMERFConfig()) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """Per seed: fresh frequencies, one release, one generator, `ipc` samples per class."""
    start, sets, info = time.time(), [], []
    for s in seeds:
        w = frequencies(cfg, cfg.native ** 2, seed=10_000 + s)
        release = release_embedding(private, num_classes, sigma, w, cfg.native)
        gen, losses = fit_generator(release, w, num_classes, cfg, seed=s)
        sets.append(sample(gen, ipc, num_classes, image_size, seed=s))
        info.append({"seed": s, "noise_std_on_mean": release.noise_std, "loss_first": losses[0],
                     "loss_last": losses[-1]})
    return sets, {"seconds": time.time() - start, "runs": info, "settings": asdict(cfg), "records": len(private.labels)}
