"""Config: overrides are type-checked, unknown keys list the valid ones, derived values and their errors."""

import json

import pytest

from foxdist.config import Config, apply_overrides, derive, write_config


def test_overrides_types():
    cfg = apply_overrides(Config(), ["train.max_steps=7", "optim.lr=3e-4", "model.qk_norm=false",
                                     "kernels.acp_eps=none", "kernels.acp_eps=0.001", "data.source=/x"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 3e-4 and cfg.model.qk_norm is False
    assert cfg.kernels.acp_eps == 0.001 and cfg.data.source == "/x"
    cfg = apply_overrides(cfg, ["kernels.acp_eps=none"])
    assert cfg.kernels.acp_eps is None
    with pytest.raises(ValueError, match="expected a value of type bool"):
        apply_overrides(Config(), ["model.qk_norm=maybe"])
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides(Config(), ["max_steps=3"])


def test_derive_arithmetic():
    cfg = apply_overrides(Config(), ["parallel.tp=2", "parallel.cp=2", "train.global_batch_size=32",
                                     "train.micro_batch_size=2", "data.seq_len=1024"])
    d = derive(cfg, world_size=16)
    assert (d.dp, d.grad_accum, d.local_seq_len, d.tokens_per_step) == (4, 4, 512, 32 * 1024)
    assert d.dims.padded_vocab % 2 == 0 and d.dims.padded_vocab >= 257


@pytest.mark.parametrize("sets,world,msg", [
    (["parallel.tp=3"], 4, "not divisible by tp*cp = 3*1"),
    (["parallel.tp=8"], 8, "n_heads=4 and n_kv_heads=4 must both be divisible by tp=8"),
    (["parallel.cp=3", "data.seq_len=100"], 3, "6 chunks (cp=3 x 2); 100 % 6 = 4"),
    (["parallel.cp=2", "parallel.cp_mode=ulysses", "model.n_heads=2", "model.d_model=64", "parallel.tp=2"], 4,
     "n_heads/tp = 2/2 = 1 must be divisible by the Ulysses degree 2"),
    (["train.global_batch_size=12", "train.micro_batch_size=4"], 2, "micro_batch_size * dp = 4 * 2 = 8"),
    (["model.n_kv_heads=3"], 1, "n_kv_heads=3 must divide n_heads=4"),
    (["model.arch=transformer", "parallel.cp=2"], 2, "without context parallelism"),
    (["kernels.acp_eps=1.5"], 1, "acp_eps must lie in (0, 1)"),
])
def test_derive_errors(sets, world, msg):
    with pytest.raises(ValueError) as e:
        derive(apply_overrides(Config(), sets), world)
    assert msg in str(e.value)


def test_resolved_config_roundtrip(tmp_path):
    cfg = apply_overrides(Config(), ["train.max_steps=9"])
    write_config(cfg, derive(cfg), tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["derived"]["dp"] == 1
    data.pop("derived")
    assert Config.from_dict(data) == cfg
