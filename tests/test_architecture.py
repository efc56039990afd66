"""The shape of the package, as ARCHITECTURE.md describes it: layers, small modules, a recipe that reads top to
bottom. The import contracts themselves are checked by import-linter (``lint-imports``, run by .ci/run)."""

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "vlmtune"


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_part_of_the_recipe_is_in_the_components_layer():
    (layers,) = [c["layers"] for c in _contracts() if c["type"] == "layers"]
    listed = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    parts = {
        f"vlmtune.train.{p.stem}" for p in (PACKAGE / "train").glob("*.py") if p.stem not in ("__init__", "recipe")
    }
    assert parts - listed == set(), "add the new module of vlmtune/train to the layers contract in pyproject.toml"
    assert layers.index("vlmtune.train.recipe") < next(
        i for i, layer in enumerate(layers) if "vlmtune.train.loss" in layer
    )


def test_no_import_cycles_is_a_contract():
    assert any(c["type"] == "acyclic_siblings" and c["ancestors"] == ["vlmtune"] for c in _contracts())


def test_few_top_level_modules_and_none_over_400_lines():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert long == {}


def _function_lines(path: Path, name: str) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    return fn.end_lineno - fn.lineno + 1


def test_the_stage_loop_is_short_and_named_by_its_steps():
    recipe = PACKAGE / "train" / "recipe.py"
    assert _function_lines(recipe, "run_stage") < 80
    names = {n.name for n in ast.parse(recipe.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef)}
    assert {"train", "prepare_stage", "train_step", "after_step", "finish_stage"} <= names
