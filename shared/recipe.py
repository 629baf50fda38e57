"""Recipes: named sets of config values (shared/recipes/*.toml). The typed defaults of shared/config.py are
the `small` recipe; a recipe file lists only the values it changes, section by section, and may
`inherit = "other"` first. `[run]` sets the run's own fields (protocol, IPCs, baselines, seeds)."""
from __future__ import annotations

import tomllib
from dataclasses import fields, replace
from pathlib import Path

from shared.config import DemoConfig

RECIPES = Path(__file__).with_name("recipes")
SECTIONS = {"data", "autoencoder", "chain", "condense", "student", "evaluation", "run", "inherit"}
RUN_KEYS = {"protocol", "ipcs", "baselines", "eval_seeds"}


def recipe_names() -> list[str]:
    return ["small", *sorted(p.stem for p in RECIPES.glob("*.toml"))]


def load_recipe(name: str) -> dict:
    """{section: {key: value}} of a recipe name (shared/recipes/NAME.toml) or a path to a .toml file."""
    if name == "small":
        return {}
    path = Path(name) if name.endswith(".toml") else RECIPES / f"{name}.toml"
    if not path.exists():
        raise FileNotFoundError(f"no recipe '{name}': choose one of {recipe_names()} or give a .toml file")
    with open(path, "rb") as fh:
        recipe = tomllib.load(fh)
    unknown = set(recipe) - SECTIONS
    if unknown:
        raise ValueError(f"recipe {path}: unknown sections {sorted(unknown)}; known: {sorted(SECTIONS)}")
    base = load_recipe(recipe.pop("inherit")) if "inherit" in recipe else {}
    return {sec: {**base.get(sec, {}), **recipe.get(sec, {})} for sec in set(base) | set(recipe)}


def apply_recipe(cfg: DemoConfig, name: str) -> DemoConfig:
    """`cfg` with the recipe's values; an unknown key is an error naming the valid ones."""
    changes = {}
    for section, values in load_recipe(name).items():
        if section == "run":
            bad = set(values) - RUN_KEYS
            if bad:
                raise ValueError(f"recipe '{name}' [run]: unknown keys {sorted(bad)}; valid: {sorted(RUN_KEYS)}")
            changes.update({k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
            continue
        sub = getattr(cfg, section)
        valid = {f.name for f in fields(sub)}
        bad = set(values) - valid
        if bad:
            raise ValueError(f"recipe '{name}' [{section}]: unknown keys {sorted(bad)}; valid: {sorted(valid)}")
        changes[section] = replace(sub, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    return replace(cfg, **changes)
