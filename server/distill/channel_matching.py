"""Channel matching without learnable parameters (docs/spec.md §5), with scipy's Hungarian solver.

Student features (B, n, H, W), teacher features (B, m, H, W), m >= n. The distance between student
channel i and teacher channel j is the mean squared difference of their maps over batch and space.
- `sparse`: n x m distances padded with a large value to m x m; the assignment gives each student
  channel one teacher channel (padded rows take the leftovers and never win a real channel).
- `random`: r = m // n, s = r n teacher channels (odd positions first); n x s distances replicated
  r times into s x s; the assignment gives each student channel r teacher channels, one of which is
  picked at random.
- `maxpool`: same grouping as `random`; the target is the element-wise max over the group.
Matching carries no gradient; the loss is the MSE between each student channel and its target.

As §5 says, the term trains "until the distance falls under a threshold (or a step budget)": it is a hint
stage, as in FitNets (Romero et al., ICLR 2015). By default (`runs_first`) it is FitNets' first stage: before
the task training, the student's layers up to the distillation point learn the term alone until its distance
falls under `stop_fraction` of its first value or `budget` x the training steps have run
(server/distill/student.py `_hint_stage`); the task training then starts from them and the term is zero.
With `runs_first=False` the stage runs inside the task training instead, the term added to the other terms
until the same threshold or budget. Either way the state is a buffer, so a resumed student stays in its stage.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from server.distill.registry import FEATURE_ONLY_CAVEAT, LOSSES, LossInputs
from shared.registry import Registry
from shared.workers import mean_over_workers

MATCH_RULES: Registry = Registry("channel matching rule")
PAD = 1e12


def channel_distances(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """(n, m) mean squared distance between every student and teacher channel."""
    a = fs.detach().transpose(0, 1).flatten(1)            # (n, B*H*W)
    b = ft.detach().transpose(0, 1).flatten(1)            # (m, B*H*W)
    return torch.cdist(a, b).pow(2) / a.shape[1]


def sparse_assignment(dist: np.ndarray) -> np.ndarray:
    """For an n x m (n <= m) matrix: the teacher channel of each student channel (rule 1)."""
    n, m = dist.shape
    padded = np.full((m, m), PAD)
    padded[:n] = dist
    rows, cols = linear_sum_assignment(padded)
    return cols[np.argsort(rows)][:n]


def teacher_group_order(m: int, s: int) -> np.ndarray:
    """The s teacher channels rules 2-3 use: odd positions first, then even ones."""
    return np.concatenate([np.arange(1, m, 2), np.arange(0, m, 2)])[:s]


def grouped_assignment(dist: np.ndarray) -> np.ndarray:
    """Rules 2-3: (n, r) teacher channels per student channel."""
    n, m = dist.shape
    r = m // n
    if r < 1:
        raise ValueError(f"teacher has fewer channels ({m}) than the student ({n})")
    chosen = teacher_group_order(m, r * n)
    square = np.tile(dist[:, chosen], (r, 1))               # row k*n + i is student channel i
    rows, cols = linear_sum_assignment(square)
    groups = [[] for _ in range(n)]
    for row, col in zip(rows, cols):
        groups[row % n].append(int(chosen[col]))
    return np.array([sorted(g) for g in groups])


@MATCH_RULES.register("sparse")
def target_sparse(fs, ft, generator=None) -> torch.Tensor:
    idx = sparse_assignment(channel_distances(fs, ft).cpu().numpy())
    return ft[:, torch.as_tensor(idx, device=ft.device)]


@MATCH_RULES.register("random")
def target_random(fs, ft, generator=None) -> torch.Tensor:
    groups = grouped_assignment(channel_distances(fs, ft).cpu().numpy())
    pick = torch.randint(0, groups.shape[1], (groups.shape[0],), generator=generator).numpy()
    return ft[:, torch.as_tensor(groups[np.arange(len(groups)), pick], device=ft.device)]


@MATCH_RULES.register("maxpool")
def target_maxpool(fs, ft, generator=None) -> torch.Tensor:
    groups = torch.as_tensor(grouped_assignment(channel_distances(fs, ft).cpu().numpy()), device=ft.device)
    return ft[:, groups].amax(dim=2)                        # (B, n, r, H, W) -> (B, n, H, W)


@torch.no_grad()
def target_coverage(rule: str, fs: torch.Tensor, ft: torch.Tensor) -> dict:
    """Which teacher channels `rule` targets for student features `fs`: how many distinct channels, their share of
    the teacher's feature energy (per-channel mean square), and their mean energy rank as a fraction (0: the
    weakest channel, 1: the strongest). `sparse` keeps n of m channels, and a squared distance is cheapest to a
    channel with little energy; `random` and `maxpool` spread the student over every grouped channel."""
    if fs.shape[-2:] != ft.shape[-2:]:
        ft = F.adaptive_avg_pool2d(ft, fs.shape[-2:])
    dist = channel_distances(fs.float(), ft.float()).cpu().numpy()
    used = sparse_assignment(dist) if rule == "sparse" else np.unique(grouped_assignment(dist))
    energy = ft.float().pow(2).mean(dim=(0, 2, 3)).cpu().numpy()
    rank = np.argsort(np.argsort(energy)) / max(len(energy) - 1, 1)
    return {"teacher_channels": int(len(energy)), "student_channels": int(fs.shape[1]),
            "channels_targeted": int(len(np.unique(used))), "energy_share": float(energy[used].sum() / energy.sum()),
            "mean_energy_rank": float(rank[used].mean())}


class ChannelMatching(nn.Module):
    def __init__(self, num_classes: int, rule: str = "sparse", stop_fraction: float = 0.1, budget: float = 0.5,
                 runs_first: bool = True, **_):
        super().__init__()
        self.runs_first = runs_first
        self.rule, self.stop_fraction, self.budget = MATCH_RULES[rule], stop_fraction, budget
        self.register_buffer("first", torch.tensor(float("nan")))       # the distance at the first step
        self.register_buffer("active", torch.tensor(True))              # the hint stage is still on

    def forward(self, inp: LossInputs) -> torch.Tensor:
        fs, ft = inp.need_features("channel matching")
        if not bool(self.active) or inp.progress >= self.budget:
            self.active.fill_(False)
            return fs.sum() * 0.0
        if fs.shape[-2:] != ft.shape[-2:]:
            ft = F.adaptive_avg_pool2d(ft, fs.shape[-2:])
        if ft.shape[1] < fs.shape[1]:
            raise ValueError(f"channel matching needs teacher channels >= student channels ({ft.shape[1]} < {fs.shape[1]})")
        loss = F.mse_loss(fs, self.rule(fs, ft).detach())
        distance = float(mean_over_workers(loss.detach()))      # under torchrun every worker ends the stage together
        if torch.isnan(self.first):
            self.first.fill_(distance)
        elif distance < self.stop_fraction * float(self.first):
            self.active.fill_(False)
        return loss


RULE_DOCS = {"sparse": "one teacher channel per student channel (Hungarian matching on channel distances; it picks "
                       "the teacher's low-energy channels, docs/distill/native.md)",
             "random": "a random teacher channel of each student channel's matched group",
             "maxpool": "the element-wise max over each student channel's matched group of teacher channels"}


def _channel_loss(rule: str):
    def make(num_classes, **ctx):
        return ChannelMatching(num_classes, rule)
    make.__doc__ = (f"Channel matching at the distillation point (docs/spec.md §5), rule '{rule}': {RULE_DOCS[rule]}; "
                    "a hint stage before the task training (FitNets), until its distance is under 10 % of its first "
                    "value or for half as many steps.")
    make.caveat = FEATURE_ONLY_CAVEAT
    return make


for _rule in RULE_DOCS:
    LOSSES.register(f"channel_{_rule}")(_channel_loss(_rule))
