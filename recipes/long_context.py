"""Long-context FoX Pro recipes: context parallelism inside a node, tensor x context parallel across nodes.

    # 760M at 128k on one node of 8 GPUs (cp = 8)
    torchrun --standalone --nproc-per-node 8 -m foxdist.train --recipe recipes/long_context.py:fox_pro_760m_128k \
        --set data.source=/data/shards
    # 1.3B at 256k on 2 nodes x 8 GPUs (tp = 2 inside each node, cp = 8 hybrid)
    python launch/submit.py --recipe recipes/long_context.py:fox_pro_1p3b_256k --nodes 2 --gpus-per-node 8 ...
    # 1.3B at 1M on 8 nodes x 8 GPUs (tp = 2, cp = 32 hybrid)
    python launch/submit.py --recipe recipes/long_context.py:fox_pro_1p3b_1m --nodes 8 --gpus-per-node 8 ...

All keep the paper's 0.5M tokens per step (1M for the 1M-token recipe: one sequence), AdamW (0.9, 0.95),
weight decay 0.1, 256Mi tokens of warmup then cosine, and ACP at e^-10 (long contexts are where it
pays). Rank order is tp innermost, then cp, then dp, so the fastest links carry tensor parallelism
and the Ulysses all-to-all, and the ring crosses nodes.

Arithmetic:
- 760M @ 128k: 4 sequences x 131,072 = 524,288 tokens/step; cp = 8 (zigzag ring) -> 16,384 local tokens
  per GPU; dp = 1, 4 accumulation steps. Memory/GPU: 16 B/param x 0.84B = 13.4 GB of weights, grads and
  AdamW state; activations of 16k local tokens with checkpointing ~3 GB. Sized for 8 x H100 80GB.
- 1.3B @ 256k: 2 x 262,144 = 524,288 tokens/step; tp = 2, cp = 8 (hybrid: Ulysses over 4 GPUs in a node,
  ring over the 2 nodes) -> 32,768 local tokens; dp = 1, 2 accumulation steps. Weights etc. 16 B x 1.4B / tp
  = 11 GB per GPU. 32 heads / tp 2 = 16 local heads, divisible by the Ulysses degree 4. Sized for 2 x 8 H100.
- 1.3B @ 1M: 1 x 1,048,576 tokens/step; tp = 2, cp = 32 (Ulysses 4 in a node, ring over 8 nodes) ->
  32,768 local tokens; dp = 1, no accumulation. Sized for 8 x 8 H100 with InfiniBand: a ring step of 32k
  local tokens hides behind compute (the design notes' bound is ~12-24k tokens on IB).
"""

from foxdist.config import Config
from foxdist.model import preset

ACP_EPS = 4.5399929762484854e-05  # e^-10


def _long(model: str, seq_len: int, global_batch: int, tp: int, cp: int, mode: str, ulysses: int,
          steps: int) -> Config:
    cfg = Config()
    cfg.model = preset(model)
    cfg.model.activation_checkpointing = True
    cfg.data.source = "data/shards"
    cfg.data.seq_len = seq_len
    cfg.parallel.tp, cfg.parallel.cp = tp, cp
    cfg.parallel.cp_layout, cfg.parallel.cp_mode, cfg.parallel.ulysses_degree = "zigzag", mode, ulysses
    cfg.parallel.sequence_parallel = tp > 1
    cfg.train.global_batch_size = global_batch
    cfg.train.micro_batch_size = 1
    cfg.train.max_steps = steps
    cfg.train.eval_every = 500
    cfg.train.compile = True
    cfg.optim.lr = 2e-3
    cfg.optim.weight_decay = 0.1
    cfg.schedule.kind = "cosine"
    cfg.schedule.warmup_steps = (256 * 2**20) // (global_batch * seq_len)
    cfg.schedule.min_lr_ratio = 0.0
    cfg.checkpoint.every = 250
    cfg.kernels.acp_eps = ACP_EPS
    return cfg


def fox_pro_760m_128k() -> Config:
    return _long("fox-pro-760m", 131072, 4, tp=1, cp=8, mode="ring", ulysses=1, steps=29000)


def fox_pro_1p3b_256k() -> Config:
    return _long("fox-pro-1.3b", 262144, 2, tp=2, cp=8, mode="hybrid", ulysses=4, steps=50000)


def fox_pro_1p3b_1m() -> Config:
    cfg = _long("fox-pro-1.3b", 1048576, 1, tp=2, cp=32, mode="hybrid", ulysses=4, steps=25000)
    return cfg


def transformer_760m_16k_baseline() -> Config:
    """The Transformer at the same size, at the paper's 16k context (it has no context parallelism)."""
    cfg = _long("transformer-760m", 16384, 32, tp=1, cp=1, mode="ring", ulysses=1, steps=29000)
    cfg.kernels.acp_eps = None
    cfg.optim.lr = 1e-3
    return cfg
