"""Every shipped recipe loads, derives on the world size it was sized for, and builds its model."""

import inspect
from pathlib import Path

import pytest
import torch

from foxdist.config import derive, load_recipe
from foxdist.model import FoxLM

ROOT = Path(__file__).resolve().parents[1]
WORLD = {"debug.py": 1, "fox_pro.py": 8}  # others: the tp * cp the recipe names (dp = 1)


def _recipes():
    import importlib.util

    for file in sorted((ROOT / "recipes").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"r_{file.stem}", file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name, fn in vars(mod).items():
            if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == mod.__name__:
                yield file, name


@pytest.mark.parametrize("file,name", list(_recipes()), ids=lambda x: getattr(x, "name", x))
def test_recipe_resolves(file, name):
    cfg = load_recipe(f"{file}:{name}")
    d = derive(cfg, WORLD.get(file.name, cfg.parallel.tp * cfg.parallel.cp))
    assert d.tokens_per_step == cfg.train.global_batch_size * cfg.data.seq_len
    with torch.device("meta"):
        model = FoxLM(cfg.model)
    assert model.num_params() > 0
