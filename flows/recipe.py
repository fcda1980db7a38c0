"""Recipes: the reference studies of this field as one command each (configs/recipes/*.yaml).

A recipe is a preset (a partial params.yaml) with a ``recipe`` section: its ``name``, the
``steps`` to run in order (``pipeline``: every DVC stage through the Prefect flow and the
promotion gate; ``tune``: Optuna; ``compare``: several models on one split, one report) and
``small``: the overrides that make it run on the embedded synthetic default at a small size.

``dermaflow recipe configs/recipes/<recipe>.yaml [--set key=value ...]`` writes the preset into
params.yaml (as ``dermaflow preset`` does, so ``dvc repro`` sees it), then:

- when ``dataset.root`` exists, the recipe runs on that data as written;
- when it does not (no ISIC archive on this machine), the recipe falls back to the embedded
  synthetic default (``dataset.root: data/raw/synthetic``, layout auto) with ``recipe.small``.

``recipe.small`` (on the fallback) and ``--set`` overrides are *pinned*: they also apply after
every compare variant's own overrides, so ``--set train.epochs=1`` shortens all models, not only
the base one. After a ``tune`` step followed by ``compare``, the best trial joins the comparison
as the variant ``<arch>_tuned``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client

from tasks.config import (
    ConfigError,
    apply_override,
    apply_overrides,
    apply_preset,
    deep_merge,
    flatten,
    load_params,
    params_from_dict,
    read_params_tree,
    update_params,
)

RECIPES = Path("configs/recipes")
EMBEDDED = ["dataset.layout=auto", "dataset.root=data/raw/synthetic", "dataset.masks=null"]


class RecipeError(RuntimeError):
    """A recipe step failed; the message names the step and carries the tail of its output."""


@dataclasses.dataclass(frozen=True)
class RecipePlan:
    """What a recipe will do, decided before anything runs."""

    name: str
    steps: list[str]
    embedded: bool  # dataset.root absent: the small run on the synthetic default
    overrides: list[str]  # applied to params.yaml after the preset
    pinned: list[str]  # also applied after each compare variant's own overrides


def plan_recipe(
    recipe_file: str | Path, repo: str | Path = ".", overrides: list[str] | None = None
) -> RecipePlan:
    """Read the recipe against the repo's params and decide data, steps and overrides.

    Raises:
        ConfigError: not a recipe (no ``recipe.steps``), or a key/value the typed config
            rejects (checked here, before params.yaml is touched).
    """
    recipe_file, repo = Path(recipe_file), Path(repo)
    if not recipe_file.is_file():
        raise ConfigError(f"{recipe_file}: recipe not found (see {RECIPES}/)")
    patch = yaml.safe_load(recipe_file.read_text()) or {}
    section = patch.get("recipe") or {}
    if not section.get("steps"):
        raise ConfigError(f"{recipe_file}: not a recipe (it has no recipe.steps)")
    tree = deep_merge(read_params_tree(repo / "params.yaml"), patch)
    merged = params_from_dict(tree, str(recipe_file))
    user = list(overrides or [])
    root = Path(merged.dataset.root)
    root = root if root.is_absolute() else repo / root
    user_root = any(o.startswith("dataset.root=") for o in user)
    embedded = not root.is_dir() and not user_root
    name = merged.recipe.name or recipe_file.stem
    pinned = [*(merged.recipe.small if embedded else []), *user]
    extra = [*EMBEDDED, f"dataset.name={name}-embedded"] if embedded else []
    for text in extra + pinned:  # every override must fit before params.yaml is touched
        apply_override(tree, text)
    params_from_dict(tree, str(recipe_file))
    return RecipePlan(name, list(merged.recipe.steps), embedded, extra + pinned, pinned)


def write_recipe_params(recipe_file: str | Path, repo: str | Path, plan: RecipePlan) -> None:
    """Preset + overrides into params.yaml (comments kept); pinned ones onto every variant."""
    params = Path(repo) / "params.yaml"
    apply_preset(params, recipe_file)
    if plan.overrides:
        apply_overrides(params, plan.overrides)
    if plan.pinned and "compare" in plan.steps:
        variants = load_params(params).compare.variants
        pinned = {name: [*sets, *plan.pinned] for name, sets in variants.items()}
        update_params(params, {"compare": {"variants": pinned}}, where=f"{recipe_file} (pinned)")


def add_tuned_variant(repo: str | Path, pinned: list[str]) -> str | None:
    """After ``tune``: the best trial's params as the compare variant ``<arch>_tuned``."""
    params = Path(repo) / "params.yaml"
    p = load_params(params)
    preset = Path(repo) / p.tune.preset
    if not preset.is_file():
        return None
    best = flatten(yaml.safe_load(preset.read_text()) or {})
    sets = [f"model.arch={p.model.arch}", *(f"{k}={_yaml_value(v)}" for k, v in best.items())]
    name = f"{p.model.arch}_tuned"
    variants = {**p.compare.variants, name: [*sets, *pinned]}
    update_params(params, {"compare": {"variants": variants}}, where=str(preset))
    return name


def _yaml_value(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _dermaflow() -> list[str]:
    return [sys.executable, "-m", "flows.cli"]


@task(name="recipe-step", cache_policy=NO_CACHE)
def cli_step(step: str, repo: str) -> str:
    """Run ``dermaflow <step>`` in the project; its progress goes to this terminal.

    The step reports to this flow's Prefect API (a temporary server included), so its flow run
    sits beside the recipe's in one UI and no second temporary server has to start.
    """
    with get_client(sync_client=True) as client:
        api = str(client.api_url)
    env = {**os.environ, "PREFECT_API_URL": api} if api.startswith("http") else None
    proc = subprocess.run([*_dermaflow(), step], cwd=repo, env=env)
    if proc.returncode != 0:
        raise RecipeError(f"recipe step {step} failed (exit {proc.returncode}); see its output")
    return step


@flow(name="dermaflow-recipe", log_prints=True)
def recipe(
    recipe_file: str, repo: str = ".", overrides: list[str] | None = None, refresh: bool = True
) -> dict:
    """Apply a recipe to params.yaml and run its steps in order.

    Args:
        recipe_file: a file in configs/recipes/ (or any preset with a ``recipe`` section).
        repo: the project folder (git + DVC repo).
        overrides: ``key=value`` params pinned for this run (see the module docstring).
        refresh: let the pipeline step update/pull the data first.
    """
    from flows.pipeline import pipeline

    logger = get_run_logger()
    plan = plan_recipe(recipe_file, repo, overrides)
    where = "the embedded synthetic default (small)" if plan.embedded else "its dataset"
    logger.info("recipe %s on %s: steps %s", plan.name, where, " -> ".join(plan.steps))
    write_recipe_params(recipe_file, repo, plan)
    done: dict[str, object] = {}
    for i, step in enumerate(plan.steps):
        if step == "pipeline":
            done[step] = pipeline(repo=repo, refresh=refresh)
        else:
            done[step] = cli_step(step, repo)
            if step == "tune" and "compare" in plan.steps[i + 1 :]:
                tuned = add_tuned_variant(repo, plan.pinned)
                logger.info("compare gets the tuned variant %s", tuned)
    return {"plan": dataclasses.asdict(plan), "steps": done}
