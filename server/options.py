"""The options of a run: the flags every command shares, the demo's own, and how they become a typed
`DemoConfig` (recipe first, then each flag that is set). The CLI (server/cli.py) and the Flower ServerApp
(server/federation/app.py, whose run-config keys are these flags) both build runs from here."""
from __future__ import annotations

import argparse
from dataclasses import replace


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="small",
                   help="small (the typed defaults: models a CPU trains in ~20 min) | full (shared/recipes/full.toml: "
                        "the models trained to their plateau, minutes on a GPU; committed checkpoints) | demo (what "
                        "`make demo` runs: the full recipe's models, condensation sized for 2 CPU cores) | demo-mean (demo with "
                        "the class-mean refinement, the central-DP figures' recipe) | demo-trained (demo refining through "
                        "trained matching networks) | a .toml file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--cpu-precision", choices=["auto", "bf16", "fp32"], default=None,
                   help="conv nets on a CPU: auto = bf16 where the CPU has native bf16 (default), else fp32")
    p.add_argument("--data-dir", default=None, help="directory holding the 4 IDX .gz files (default: Debian package)")
    p.add_argument("--train-limit", type=int, default=None, help="use only this many private training images")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on this many test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--T", type=int, default=None, help="chain length / images per synthetic image (default 20)")
    p.add_argument("--layout", choices=["separate", "shared"], default=None)
    p.add_argument("--ae-steps", type=int, default=None, help="autoencoder training steps")
    p.add_argument("--chain-steps", type=int, default=None, help="shared-estimator training steps")
    p.add_argument("--module-steps", type=int, default=None, help="per-module fine-tuning steps (separate layout)")
    p.add_argument("--chain-batch", type=int, default=None, help="chain training batch size (default 128)")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction"], default=None,
                   help="what the estimators output: the noise, or its velocity re-parameterisation")


def add_condense(p: argparse.ArgumentParser) -> None:
    p.add_argument("--selection", choices=["random", "one-to-one", "cluster"], default=None)
    p.add_argument("--class-plan", choices=["pure", "mixed"], default=None)
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=None)
    p.add_argument("--noise-init", choices=["random", "preset"], default=None)
    p.add_argument("--guidance", type=float, default=None,
                   help="teacher guidance per guided chain step (default: CondenseConfig.guidance; 0 turns it off)")
    p.add_argument("--guidance-terms", default=None,
                   help="what guidance pulls towards, name:weight,... (default label:1,representative:1; "
                        "server/condense/guidance.py)")
    p.add_argument("--guidance-steps", type=int, default=None,
                   help="guide only the chain's last N steps (default: CondenseConfig.guidance_steps; "
                        "0, or T and above: every step)")
    p.add_argument("--formation", type=int, default=None,
                   help="multi-image formation: each stored image holds FACTOR^2 chain images (IDC); default 1")
    p.add_argument("--refine-iterations", type=int, default=None,
                   help="refine the chain's latents by distribution matching for this many iterations (default 0)")
    p.add_argument("--refine-lr", type=float, default=None, help="Adam learning rate of the refinement (default 0.01)")
    p.add_argument("--refine-objective", choices=["mean", "mmd"], default=None,
                   help="how the refinement compares each class: 'mean' (DM's class-mean match) or 'mmd' "
                        "(Gaussian-kernel MMD, as M3D); default: the recipe's")
    p.add_argument("--refine-networks", choices=["random", "trained"], default=None,
                   help="the networks the refinement embeds through: 'random' (a fresh ConvNet-3 each iteration, "
                        "DM) or 'trained' (snapshots of ConvNet-3s trained on the decoded pool, IDM); default: the "
                        "recipe's")
    p.add_argument("--refine-ce-weight", type=float, default=None,
                   help="IDM's class-aware term: this weight x the drawn network's accuracy (%%) x the synthetic "
                        "images' cross-entropy (needs --refine-networks trained; IDM uses 0.5 at IPC 1 and 10)")
    p.add_argument("--condense-batch", type=int, default=None,
                   help="synthetic images per chain batch, the unit that is kept on disk for resuming and shared "
                        "out over workers (default 500)")
    p.add_argument("--ratio", type=float, default=None, help="budget as synthetic/real ratio instead of IPC")
    p.add_argument("--max-coverage", action="store_true", help="every real latent conditions exactly one image")


def add_student(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", default=None, help="convnet3 | convnet3_w32 | resnet8 | resnet18 | mobilenet_v2 | mobilenet_v2_w05 | shufflenet_v2 | shufflenet_v2_x05")
    p.add_argument("--student-steps", type=int, default=None)
    p.add_argument("--full-epochs", type=float, default=None)


def add_teacher(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student-loss", default=None,
                   help="every student arm's loss (default soft_ce:0.25,kd:1); any term but soft_ce uses the server's teacher")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps on the pooled latents")


def add_federation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local", action="store_true", help="single machine, no federation")
    p.add_argument("--clients", type=int, default=None, help="simulated clients (default 10)")
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet alpha of the non-IID split (default 0.5)")
    p.add_argument("--iid", action="store_true", help="IID split instead of Dirichlet")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for a round of client replies")
    p.add_argument("--chunk-size", type=int, default=None, help="latents per sealed message")
    p.add_argument("--target-epsilon", type=float, default=None, help="client-side DP: epsilon per image")
    p.add_argument("--delta", type=float, default=None, help="DP delta (default 1/(10 n))")
    p.add_argument("--clip-norm", type=float, default=None, help="latent L2 clip (default: median public norm)")
    p.add_argument("--label-mechanism", choices=["randomized_response", "public"], default=None,
                   help="with --target-epsilon: labels through randomized response (default), or declared public "
                        "(the epsilon then covers latents only; the report says so in bold)")
    p.add_argument("--label-share", type=float, default=None,
                   help="share of --target-epsilon spent on randomized-response labels (default 0.25)")
    p.add_argument("--group-size", type=int, default=None,
                   help="with --target-epsilon: each device releases the mean of this many same-label latents, "
                        "noised k times less at the same epsilon (default 1: every latent)")
    p.add_argument("--denoise", choices=["wiener", "none"], default=None,
                   help="with --target-epsilon: the server replaces each noised latent by its posterior mean under a "
                        "per-class prior from the public split (default wiener; post-processing, no privacy cost)")
    p.add_argument("--central-epsilon", type=float, default=None,
                   help="central DP on a trusted server (with or without --local): the shipped set and student carry "
                        "this epsilon per pooled record, labels included; the devices' latents are not noised "
                        "(docs/privacy.md)")
    p.add_argument("--central-delta", type=float, default=None, help="with --central-epsilon: delta (default 1e-5)")
    p.add_argument("--central-iterations", type=int, default=None,
                   help="with --central-epsilon: Adam iterations fitting the set to the release (default 150)")
    p.add_argument("--deadline", type=float, default=None, help="seconds the whole collection may take")
    p.add_argument("--retries", type=int, default=None,
                   help="ask a node that missed a round's timeout again this often before dropping it (default 2)")


def check_refinement(cond) -> None:
    """A recipe's refinement settings that cannot run fail here, before any work, naming the fix."""
    from server.condense.embedders import NETWORKS
    if cond.refine_networks not in NETWORKS:
        raise ValueError(f"unknown refine_networks '{cond.refine_networks}'; choose one of: {', '.join(NETWORKS)}")
    if cond.refine_ce_weight and cond.refine_networks != "trained":
        raise ValueError(f"refine_ce_weight {cond.refine_ce_weight} needs trained matching networks: set "
                         "refine_networks = \"trained\" (--refine-networks trained) or refine_ce_weight = 0")


def demo_config(args):
    from shared.config import DemoConfig, FederationConfig, override
    from shared.recipe import apply_recipe
    cfg = apply_recipe(DemoConfig(), getattr(args, "recipe", "small"))
    data = override(cfg.data, data_dir=args.data_dir, train_limit=args.train_limit, test_limit=args.test_limit, seed=args.seed)
    ae = override(cfg.autoencoder, steps=args.ae_steps)
    chain = override(cfg.chain, T=args.T, layout=args.layout, shared_steps=args.chain_steps, module_steps=args.module_steps,
                     batch_size=args.chain_batch, prediction=args.prediction)
    cond = override(cfg.condense, selection=getattr(args, "selection", None), class_plan=getattr(args, "class_plan", None),
                    formation=getattr(args, "formation", None), refine_iterations=getattr(args, "refine_iterations", None),
                    refine_lr=getattr(args, "refine_lr", None), refine_objective=getattr(args, "refine_objective", None),
                    refine_networks=getattr(args, "refine_networks", None),
                    refine_ce_weight=getattr(args, "refine_ce_weight", None),
                    sampler=getattr(args, "sampler", None), noise_init=getattr(args, "noise_init", None),
                    ratio=getattr(args, "ratio", None), guidance=getattr(args, "guidance", None),
                    guidance_terms=getattr(args, "guidance_terms", None),
                    guidance_steps=getattr(args, "guidance_steps", None),
                    batch_size=getattr(args, "condense_batch", None), seed=args.seed)
    from server.condense.matching import MATCH_OBJECTIVES
    MATCH_OBJECTIVES[cond.refine_objective]      # a recipe's unknown objective fails here, before any work
    check_refinement(cond)
    if getattr(args, "max_coverage", False):     # every latent exactly once: claims 4 and 7's one-to-one rule
        cond = replace(cond, max_coverage=True, ipc=None, selection=getattr(args, "selection", None) or "one-to-one")
    student = override(cfg.student, model=getattr(args, "student", None), steps=getattr(args, "student_steps", None),
                       full_epochs=getattr(args, "full_epochs", None), seed=args.seed,
                       loss=getattr(args, "student_loss", None), teacher_steps=getattr(args, "teacher_steps", None))
    ipcs = tuple(getattr(args, "ipc", None) or cfg.ipcs)
    baselines = tuple(b for b in cfg.baselines if not (b == "full_real" and getattr(args, "no_full", False)))
    fed = None
    if not getattr(args, "local", True):
        fed = override(FederationConfig(), clients=args.clients, alpha=args.alpha, timeout=args.timeout,
                       chunk_size=args.chunk_size, partition_seed=args.seed, iid=args.iid or None,
                       target_epsilon=args.target_epsilon, delta=args.delta, clip_norm=args.clip_norm,
                       label_mechanism=args.label_mechanism, label_share=args.label_share, deadline=args.deadline,
                       retries=args.retries, group_size=args.group_size,
                       denoise=args.denoise)
        if fed.group_size < 1:
            raise ValueError(f"--group-size must be >= 1, got {fed.group_size}")
        if fed.group_size > 1 and not fed.target_epsilon:
            raise ValueError("--group-size averages latents for the DP mechanism; give --target-epsilon as well")
    central = override(cfg.central, epsilon=getattr(args, "central_epsilon", None),
                       delta=getattr(args, "central_delta", None), iterations=getattr(args, "central_iterations", None))
    if central.epsilon is not None and not central.epsilon > 0:
        raise ValueError(f"--central-epsilon must be > 0, got {central.epsilon}")
    if central.epsilon and cond.refine_networks != "random":
        raise ValueError("--central-epsilon fits the set to the released class-mean embeddings under the release's "
                         "own random networks; trained matching networks would read the pool outside the release. "
                         "Drop --refine-networks trained (or use a recipe with refine_networks = \"random\")")
    if central.epsilon and fed is not None and fed.target_epsilon:
        raise ValueError("--central-epsilon (trusted server) and --target-epsilon (DP on the device) are two threat "
                         "models; give one of them")
    eval_seeds = getattr(args, "eval_seeds", None)
    eval_seeds = cfg.eval_seeds if eval_seeds is None else eval_seeds
    if eval_seeds < 1:
        raise ValueError(f"--eval-seeds must be >= 1 (1: the single run), got {eval_seeds}")
    evaluation = override(cfg.evaluation, evaluators=getattr(args, "evaluators", None),
                          epochs=getattr(args, "eval_epochs", None))
    protocol = getattr(args, "protocol", None) if getattr(args, "command", "") == "demo" else None
    return replace(cfg, recipe=getattr(args, "recipe", "small"), evaluation=evaluation, protocol=protocol or cfg.protocol,
                   data=data, autoencoder=ae, chain=chain, condense=cond, central=central,
                   student=student, ipcs=ipcs,
                   baselines=baselines, eval_seeds=eval_seeds, device=args.device, federation=fed,
                   reuse_baselines=not getattr(args, "retrain_baselines", False))


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--ipc", type=int, nargs="+", default=None, help="images per class, e.g. --ipc 1 10 50")
    p.add_argument("--no-full", action="store_true", help="skip the full-real upper bound")
    p.add_argument("--retrain-baselines", action="store_true",
                   help="train the random-real and full-real students even where an identical earlier run's "
                        "result is cached (same data, recipe, teacher, code and kernels)")
    p.add_argument("--eval-seeds", type=int, default=None,
                   help="condense and train each IPC arm with this many seeds and report the paired lead over "
                        "random real images (default 1; each adds ~1.5 min at demo scale on 2 cores)")
    p.add_argument("--protocol", choices=["standard", "teacher-kd"], default=None,
                   help="how every arm is scored: standard (ConvNet-3 from scratch on the set alone, the field's "
                        "protocol) or teacher-kd (students distil from the server's teacher); default: the recipe's")
    p.add_argument("--evaluators", type=int, default=None, help="standard protocol: evaluators per set")
    p.add_argument("--eval-epochs", type=int, default=None, help="standard protocol: evaluator epochs (default 300)")
    for add in (add_common, add_condense, add_student, add_teacher, add_federation):
        add(p)
    p.set_defaults(command="demo")


def demo_parser() -> argparse.ArgumentParser:
    """The demo's flags alone (what a Flower run-config may set)."""
    p = argparse.ArgumentParser(prog="fedcondense demo")
    add_demo_arguments(p)
    return p
