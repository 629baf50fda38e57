"""Typed configs: the one source of truth for every default (SPEC section cited per field group)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional


@dataclass(frozen=True)
class DataConfig:
    """Real data (docs/data.md). The server's public split pretrains the autoencoder; the rest is private."""
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None          # directory of IDX .gz files; default: the Debian package
    image_size: int = 32                    # 28x28 images are zero-padded to 32x32 -> latent 4x8x8
    public_size: int = 6000                 # server-held public split (autoencoder pretraining)
    train_limit: Optional[int] = None       # subsample of the private split (tiny runs, tests)
    test_limit: Optional[int] = None
    seed: int = 0


@dataclass(frozen=True)
class AutoencoderConfig:
    """First encoder E1 and decoder D, trained together (docs/spec.md §1, 'encoder' of figures 3-4)."""
    in_channels: int = 1
    latent_channels: int = 4
    encoder_channels: tuple[int, ...] = (32, 64)     # light: runs on edge devices
    decoder_channels: tuple[int, ...] = (96, 48, 24)
    kl_weight: float = 1e-4
    steps: int = 600
    decoder_finetune: float = 0.75          # then decoder-only steps per joint step, E1 frozen
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


@dataclass(frozen=True)
class ChainConfig:
    """Second encoder E2 + T noise estimators (docs/spec.md §1 claims 1-2, figures 3-4)."""
    T: int = 20
    layout: str = "separate"                # 'separate': T modules (claim 2); 'shared': one module + t embedding
    beta_schedule: str = "squaredcos_cap_v2"
    prediction: str = "epsilon"             # estimator output: 'epsilon' (the noise) | 'v_prediction' (velocity)
    unet_channels: tuple[int, int] = (32, 64)
    cross_attention_dim: int = 64
    condition_tokens: int = 16              # E2 output: tokens (a square grid) x cross_attention_dim
    second_encoder_channels: int = 64        # 128: 4x the MACs, no better
    shared_steps: int = 900                 # joint training of the shared estimator (warm start)
    module_steps: int = 7                   # per-module fine-tuning steps in the separate layout (15: no better, ~2 min more on a CPU)
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class CondenseConfig:
    """How synthetic images are made from real latents (docs/spec.md §1 claims 1-7)."""
    ipc: Optional[int] = 10                 # synthetic images per class; or use `ratio`
    ratio: Optional[float] = None           # synthetic/real image count; 1/T with max_coverage
    max_coverage: bool = False              # every real latent conditions exactly one synthetic image
    selection: str = "cluster"              # 'random' (claim 3) | 'one-to-one' (claims 4, 7) | 'cluster' (4 + similar groups)
    class_plan: str = "pure"                # 'pure': one class per image | 'mixed': soft labels n_c/T
    sampler: str = "ddim"                   # 'ddim' | 'ddpm'
    noise_init: str = "random"              # 'random' noise image | 'preset': mean of conditioning images
    clip_latent: Optional[float] = 3.0      # clip predicted z_0 to [-r, r] while sampling (unit-variance latents)
    guidance: float = 0.05                  # teacher guidance per guided step on z_0 (RMS, latent units); 0: off
    guidance_terms: str = "label:1,representative:1"   # what guidance pulls towards (server/condense/guidance.py)
    guidance_steps: int = 10                # guide only the chain's last N steps; 0 or >= T: every step
    formation: int = 1                      # multi-image formation (server/condense/formation.py): factor^2 chain images per stored image
    refine_iterations: int = 0              # latent distribution matching after the chain (server/condense/refine.py); 0: off
    refine_lr: float = 0.01                 # Adam on the chain's latents
    refine_objective: str = "mean"          # per-class comparison (server/condense/matching.py): 'mean' (DM) | 'mmd' (M3D)
    refine_networks: str = "random"         # embedding networks (server/condense/embedders.py): 'random' (DM) | 'trained' (IDM)
    refine_ce_weight: float = 0.0           # IDM's class-aware term x held accuracy (%); trained networks only
    refine_pool_steps: int = 200            # training steps of each trained matching network (2 runs, a snapshot every 1/10)
    refine_real_per_class: int = 6000       # decoded pool latents per class that the refinement matches
    refine_real_batch: int = 256            # real images per class and iteration (DM's 256)
    batch_size: int = 500
    seed: int = 0


@dataclass(frozen=True)
class StudentConfig:
    """Student training on any image set; the same recipe for every arm."""
    model: str = "convnet3"
    steps: int = 200                        # ~45 s per IPC-10 arm on 2 CPU cores (ConvNet-3, bf16; demo)
    batch_size: int = 256
    lr: float = 0.02                        # the random-real baseline's best of 0.01-0.05
    lr_reference_batch: int = 100           # batches below it train at lr * sqrt(batch / it) (IPC 1: batch 10)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "affine"                 # shared/augment.py: 'affine' | 'dsa' | 'none'
    loss: str = "soft_ce:0.25,kd:1"         # loss spec (server/distill/losses.py); any term but soft_ce uses the teacher
    teacher_steps: int = 300                # the server's teacher, trained on the pooled latents (server/distill/teacher.py)
    teacher_strength: Optional[float] = None  # teacher's augmentation relative to the student's; None: each loss term asks for its own
    full_epochs: float = 0.3                # the full-real upper bound trains by epochs (0.3 ~ 63 steps at demo scale)
    seed: int = 0


@dataclass(frozen=True)
class EvaluationConfig:
    """The field's standard evaluation protocol (DC, DSA, DM, IDC): a ConvNet-3 (width 128, instance
    norm, average pooling) trained from scratch on the set alone, SGD lr 0.01, momentum 0.9, weight
    decay 5e-4, batch 256, lr x0.1 at half the epochs, DSA augmentation, scored on the full test set."""
    epochs: int = 300                       # DSA's tables: 300; DM's: 1000
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "dsa"
    width: int = 128
    depth: int = 3
    labels: str = "hard"                    # 'hard': argmax of the set's labels | 'soft': the set's own n_c/T
    evaluators: int = 5                     # evaluator seeds per set
    max_members: int = 0                    # evaluators trained side by side; 0: 32 on CUDA, 1 on a CPU
    seed: int = 0


@dataclass(frozen=True)
class FederationConfig:
    """The federation: K clients, their split, chunking, timeouts, client-side noise."""
    clients: int = 10
    alpha: float = 0.5                      # Dirichlet concentration of the non-IID split
    iid: bool = False
    partition_seed: int = 0
    chunk_size: int = 2048                  # latents per sealed message (~1 MB in fp16)
    timeout: float = 300.0                  # seconds to wait for one round of replies
    startup_grace: float = 60.0             # extra seconds for the first round (client process cold start)
    connect_timeout: float = 120.0          # seconds to wait for the expected nodes to connect
    deadline: float = 4 * 3600.0            # the whole collection ends by then; pending nodes are dropped
    retries: int = 2                        # a node that misses a round's timeout is asked again this often
    retry_backoff: float = 1.5              # each retry round waits timeout x backoff^attempt (within the deadline)
    wave: int = 256                         # nodes asked per request round: bounds requests in flight and server memory
    max_node_records: int = 200_000         # a node declaring more chunks than this many records is rejected
    max_staged_mb: float = 2048.0           # latents staged in memory over all nodes (uncommitted)
    clip_norm: float = 0.0                  # the device's Gaussian mechanism on latents; 0 = off
    noise_multiplier: float = 0.0
    target_epsilon: Optional[float] = None  # calibrate the mechanisms to this per-record epsilon (latent + label)
    delta: Optional[float] = None           # default 1 / (10 n)
    label_mechanism: str = "randomized_response"   # with DP: 'randomized_response' | 'public' (docs/privacy.md)
    label_share: float = 0.25               # share of target_epsilon spent on randomized-response labels
    group_size: int = 1                     # with DP: each device releases means of k same-label latents (docs/privacy.md)
    denoise: str = "wiener"                 # with DP: the server's posterior-mean filter on the pool | 'none'
    client_threads: int = 1


@dataclass(frozen=True)
class CentralDPConfig:
    """Central DP on a trusted server (server/condense/private_target.py): the shipped set and student carry the
    guarantee; the devices' latents reach the server un-noised (sealed in transit). epsilon None: off."""
    epsilon: Optional[float] = None
    delta: float = 1e-5
    nets: int = 4                           # random ConvNet-3 embeddings in the release
    width: int = 64                         # their width
    iterations: int = 150                   # Adam iterations fitting the chain's latents to the release


@dataclass(frozen=True)
class DemoConfig:
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    condense: CondenseConfig = field(default_factory=CondenseConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    federation: Optional[FederationConfig] = field(default_factory=FederationConfig)   # None: single machine
    central: CentralDPConfig = field(default_factory=CentralDPConfig)
    ipcs: tuple[int, ...] = (10,)
    baselines: tuple[str, ...] = ("random_real", "full_real")
    eval_seeds: int = 1                     # per IPC: seeds 0..n-1 added to the condense/student seeds (paired stats)
    recipe: str = "small"                   # the recipe these values came from (shared/recipe.py)
    protocol: str = "teacher-kd"            # how arms are scored: 'standard' (server/distill/evaluate.py) | 'teacher-kd' (students distil from the teacher)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    reuse_baselines: bool = True            # reuse a baseline student whose inputs, code and kernels match (server/distill/baseline_cache.py)
    device: str = "auto"


def override(cfg, **changes):
    """`dataclasses.replace` that ignores None values and rejects unknown names with a clear error."""
    names = {f.name for f in fields(cfg)}
    unknown = set(changes) - names
    if unknown:
        raise TypeError(f"{type(cfg).__name__} has no field(s) {sorted(unknown)}; valid: {sorted(names)}")
    return replace(cfg, **{k: v for k, v in changes.items() if v is not None})
