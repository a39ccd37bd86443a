"""Debug recipes: small FoX models on the interpreter's own standard-library sources (byte-level).

    foxdist train --recipe recipes/debug.py:cpu               # FoX Pro, ~2-3 minutes on 2 CPU cores
    foxdist train --recipe recipes/debug.py:cpu_transformer   # same size, RoPE Transformer baseline
    foxdist train --recipe recipes/debug.py:tiny              # seconds; what the tests use

Arithmetic (cpu): 16 sequences x 256 tokens = 4,096 tokens per step; 8 per micro-batch -> 2 accumulation
steps on one process; 300 steps = 1.2M tokens (~3% of the 38 MB corpus). Model: 4 layers x 128,
4 heads of 32, SwiGLU hidden 320: 0.91M parameters, ~15 MB of fp32 weights + Adam state.
"""

from foxdist.config import Config, ModelConfig


def cpu() -> Config:
    cfg = Config()
    cfg.model = ModelConfig(arch="fox", vocab_size=257, d_model=128, n_layers=4, n_heads=4, mlp_ratio=3.5)
    cfg.data.source = "stdlib"
    cfg.data.seq_len = 256
    cfg.train.max_steps = 300
    cfg.train.global_batch_size = 16
    cfg.train.micro_batch_size = 8
    cfg.train.device = "cpu"
    cfg.train.eval_every = 100
    cfg.optim.lr = 3e-3
    cfg.schedule.warmup_steps = 20
    cfg.checkpoint.every = 100
    return cfg


def cpu_transformer() -> Config:
    cfg = cpu()
    cfg.model.arch = "transformer"
    cfg.model.token_shift = cfg.model.qk_norm = cfg.model.output_gate = cfg.model.output_norm = False
    return cfg


def cpu_llama() -> Config:
    """FoX without the Pro extras (forget gate only), as in the paper's FoX (LLaMA) ablation."""
    cfg = cpu()
    cfg.model.token_shift = cfg.model.qk_norm = cfg.model.output_gate = cfg.model.output_norm = False
    return cfg


def tiny() -> Config:
    """A few seconds per dozen steps: for tests and smoke checks."""
    cfg = cpu()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 64, 2, 2
    cfg.data.seq_len = 128
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 4
    cfg.train.max_steps = 20
    cfg.train.eval_every = 0
    cfg.data.num_val_batches = 2
    cfg.schedule.warmup_steps = 5
    cfg.checkpoint.every = 10
    cfg.logging.progress = "lines"
    return cfg
