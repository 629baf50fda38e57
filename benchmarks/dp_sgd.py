"""DP-SGD trained directly on the private images (Abadi et al., CCS 2016), through Opacus: the central-DP
anchor a released set has to be weighed against (a trusted server could ship a DP model instead of a set).

Published settings by default: Tramer & Boneh, "Differentially Private Learning Needs Better Features (or
Much More Data)", ICLR 2021, end-to-end CNN on Fashion-MNIST (their `cnns.py --dataset=fmnist --batch_size=2048
--lr=4 --noise_multiplier=2.15`): the tanh CNN below on 28x28 pixels in [0, 1], SGD lr 4, momentum 0.9, batch
2048, per-example clip 0.1, 40 epochs; 86.0 % at (3, 1e-5). Here the noise multiplier is computed by Opacus's
RDP accountant for each target epsilon on the private split's size, batches are Poisson-sampled (what the
accountant assumes; the paper shuffles), and the reported accuracy is the last epoch's (no test-set selection).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.progress import progress


@dataclass(frozen=True)
class DPSGDConfig:
    batch_size: int = 2048
    lr: float = 4.0
    momentum: float = 0.9
    max_grad_norm: float = 0.1
    epochs: int = 40
    accountant: str = "rdp"
    test_batch: int = 2000


class TramerBonehCNN(nn.Module):
    """Their MNIST / Fashion-MNIST CNN: conv 16 8x8 /2, tanh, max-pool 2 /1, conv 32 4x4 /2, tanh, max-pool
    2 /1, linear 512 -> 32, tanh, linear 32 -> 10 (26,010 parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 8, 2, padding=2), nn.Tanh(), nn.MaxPool2d(2, 1),
                                      nn.Conv2d(16, 32, 4, 2), nn.Tanh(), nn.MaxPool2d(2, 1))
        self.classifier = nn.Sequential(nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def native_pixels(images: torch.Tensor, native: int = 28) -> torch.Tensor:
    """The project's (N, 1, S, S) images in [-1, 1], zero-padded to S, back to the native S0 x S0 in [0, 1]."""
    pad = (images.shape[-1] - native) // 2
    return ((images[..., pad:pad + native, pad:pad + native].float() + 1) / 2).clamp(0, 1)


def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    net.eval()
    with torch.no_grad():
        hits = sum(int((net(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
                   for i in range(0, len(labels), batch))
    return hits / len(labels)


def train_dp_sgd(private, test, target_epsilon: float, delta: float, seed: int, cfg: DPSGDConfig = DPSGDConfig()
                 ) -> dict:
    """One DP-SGD model on `private` (an ImageSplit), scored on `test`: its accuracy, the noise multiplier the
    accountant chose, the epsilon it reports spent, and the wall time."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")      # an anchor, not a shipped mechanism
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _train(private, test, target_epsilon, delta, seed, cfg)


def _train(private, test, target_epsilon: float, delta: float, seed: int, cfg: DPSGDConfig) -> dict:
    from opacus import PrivacyEngine
    torch.manual_seed(seed)
    x, y = native_pixels(private.images), private.labels.long()
    if cfg.batch_size >= len(y):
        raise ValueError(f"DP-SGD batch size {cfg.batch_size} is not below the {len(y)} private records: Poisson "
                         "sampling needs a rate under 1; pass a smaller DPSGDConfig.batch_size")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    net = TramerBonehCNN(int(y.max()) + 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=False)
    net, optimizer, loader = engine.make_private_with_epsilon(
        module=net, optimizer=optimizer, data_loader=loader, target_epsilon=target_epsilon, target_delta=delta,
        epochs=cfg.epochs, max_grad_norm=cfg.max_grad_norm, poisson_sampling=True)
    start = time.time()
    for _ in progress(range(cfg.epochs), desc=f"DP-SGD eps {target_epsilon:g}"):
        net.train()
        for xb, yb in loader:
            if len(yb) == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb), yb).backward()
            optimizer.step()
    tx, ty = native_pixels(test.images), test.labels.long()
    return {"accuracy": accuracy(net, tx, ty, cfg.test_batch), "noise_multiplier": optimizer.noise_multiplier,
            "epsilon_spent": engine.get_epsilon(delta), "sample_rate": cfg.batch_size / len(y),
            "steps": engine.accountant.history[-1][2] if engine.accountant.history else 0,
            "seconds": time.time() - start, "records": len(y), "settings": asdict(cfg)}
