"""The device's own privacy policy, set by its operator in the SuperNode's node config (docs/privacy.md).

The server asks for a clip norm, a noise multiplier, a label mechanism and delta, and sends the first
encoder. The device checks the request against its policy before it touches its data, computes the
epsilon of the request itself (shared/accounting.py), and refuses what its policy does not allow:

    flower-supernode ... --node-config "max-epsilon=8 max-delta=1e-5 encoder-sha256=3fa1..."

| key | meaning | unset |
|---|---|---|
| `max-epsilon` | the largest per-record epsilon the device releases under | any (also no DP) |
| `max-delta` | the largest delta it accepts | 1e-5 when max-epsilon is set |
| `min-noise-multiplier` | the smallest latent noise multiplier | 0 |
| `labels` | `private`: labels only through randomized response; `public`: may leave in the clear | `private` when max-epsilon is set |
| `encoder-sha256` | allowed first-encoder hashes (comma-separated) | any encoder |
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from shared.accounting import ImageRelease


class PolicyRefusal(Exception):
    """The device refuses the request; `code` is stable, `reason` tells the server's operator why."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


def encoder_sha256(state_dict: dict) -> str:
    """SHA-256 over the encoder's tensors in name order (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class DevicePolicy:
    max_epsilon: Optional[float] = None
    max_delta: Optional[float] = None
    min_noise_multiplier: float = 0.0
    labels: Optional[str] = None
    encoder_sha256: tuple[str, ...] = ()

    KEYS = ("max-epsilon", "max-delta", "min-noise-multiplier", "labels", "encoder-sha256")

    @classmethod
    def from_node_config(cls, node_config: dict) -> "DevicePolicy":
        get = lambda key: node_config.get(key)
        try:
            max_eps = float(get("max-epsilon")) if get("max-epsilon") is not None else None
            max_delta = float(get("max-delta")) if get("max-delta") is not None else (1e-5 if max_eps else None)
            min_sigma = float(get("min-noise-multiplier") or 0.0)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"device policy: a number is malformed in the node config ({exc}); "
                             f"keys {cls.KEYS}") from None
        labels = str(get("labels")) if get("labels") is not None else ("private" if max_eps else None)
        if labels not in (None, "private", "public"):
            raise ValueError(f"device policy: labels='{labels}'; use labels=private or labels=public")
        hashes = tuple(h.strip().lower() for h in str(get("encoder-sha256") or "").split(",") if h.strip())
        return cls(max_eps, max_delta, min_sigma, labels, hashes)

    def check(self, release: ImageRelease, encoder_hash: str) -> float:
        """Raise PolicyRefusal unless the request is allowed; returns its epsilon as the device computes it."""
        if self.encoder_sha256 and encoder_hash not in self.encoder_sha256:
            raise PolicyRefusal("encoder", f"first encoder {encoder_hash[:16]}... is not among the "
                                           f"{len(self.encoder_sha256)} allowed by this device (encoder-sha256)")
        if release.noise_multiplier < self.min_noise_multiplier:
            raise PolicyRefusal("noise", f"noise multiplier {release.noise_multiplier:.4g} is below this device's "
                                         f"minimum {self.min_noise_multiplier:.4g} (min-noise-multiplier)")
        if self.max_delta is not None and not release.delta <= self.max_delta:
            raise PolicyRefusal("delta", f"delta {release.delta:.3g} exceeds this device's {self.max_delta:.3g} "
                                         f"(max-delta)")
        epsilon = release.epsilon("pld")
        if self.max_epsilon is not None and not epsilon <= self.max_epsilon * (1 + 1e-9):
            shown = "inf (no noise)" if math.isinf(epsilon) else f"{epsilon:.4g}"
            raise PolicyRefusal("epsilon", f"the request's epsilon {shown} exceeds this device's "
                                           f"{self.max_epsilon:.4g} (max-epsilon)")
        if self.labels == "private" and release.label_mechanism != "randomized_response":
            raise PolicyRefusal("labels", "the server asks for labels in the clear; this device releases labels only "
                                          "through randomized response (labels=private)")
        return epsilon
