"""The parallel layout: tensor (tp), context (cp) and data (dp) parallel degrees and their groups.

Ranks are laid out with tp innermost, then cp, then dp (megatron-core's ``"tp-cp-ep-dp-pp"`` order):
global rank ``r = tp_rank + tp * (cp_rank + cp * dp_rank)``. With 8 GPUs per node, tp=4 and cp=2 keep
both inside a node. The process groups themselves come from megatron-core's ``parallel_state`` so
that its tensor-parallel layers and ours see the same groups; they are also handed out explicitly
(``dims.tp_group`` ...) to every layer that needs one.

Everything that can be checked without communication is validated in :meth:`ParallelDims.validate`
*before* any group exists, and every failure is a ``ValueError`` that shows the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from ..config import Config, model_dims


@dataclass
class ParallelDims:
    """Degrees of a run and (after :meth:`init_groups`) its process groups.

    Build it with :meth:`from_config` (validates the config against the world size), then call
    :meth:`init_groups` once ``torch.distributed`` is initialized.
    """

    world_size: int
    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    dp: int = field(init=False)
    _groups: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        for name in ("world_size", "tp", "cp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.world_size % (self.tp * self.cp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by tp*cp = {self.tp}*{self.cp} = {self.tp * self.cp}: "
                f"dp = world / (tp*cp) must be a whole number; {self.world_size} % {self.tp * self.cp} = "
                f"{self.world_size % (self.tp * self.cp)}")
        self.dp = self.world_size // (self.tp * self.cp)
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence parallelism shards activations over the tensor-parallel group: it needs tp > 1, "
                             "got tp=1 (set parallel.sequence_parallel=false or parallel.tp >= 2)")

    # ------------------------------------------------------------------ validation
    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> "ParallelDims":
        """Validate ``cfg`` against ``world_size`` (see :meth:`validate`) and return the layout."""
        dims = cls(world_size=world_size, tp=cfg.parallel.tp, cp=cfg.parallel.cp,
                   sequence_parallel=cfg.parallel.sequence_parallel)
        dims.validate(cfg)
        return dims

    def validate(self, cfg: Config) -> None:
        """Check that the model and sequence fit this layout; raises ``ValueError`` with the arithmetic.

        - heads, kv heads and the SwiGLU hidden size split evenly over tp;
        - the padded vocabulary (padded to ``lcm(vocab_multiple, tp)``) splits evenly over tp;
        - the sequence splits into the context-parallel layout's chunks (``2*cp`` for zigzag);
        - with sequence parallelism, each rank's local sequence splits evenly over tp.
        """
        m, p = cfg.model, cfg.parallel
        if (p.tp, p.cp) != (self.tp, self.cp):
            raise ValueError(f"config has tp={p.tp}, cp={p.cp} but the layout has tp={self.tp}, cp={self.cp}")
        md = model_dims(m, self.tp)
        if m.n_heads % self.tp:
            raise ValueError(f"tensor parallelism splits attention heads: n_heads={m.n_heads} is not divisible by "
                             f"tp={self.tp} ({m.n_heads} % {self.tp} = {m.n_heads % self.tp})")
        if md.n_kv_heads % self.tp:
            raise ValueError(f"tensor parallelism splits kv heads: n_kv_heads={md.n_kv_heads} is not divisible by "
                             f"tp={self.tp} ({md.n_kv_heads} % {self.tp} = {md.n_kv_heads % self.tp})")
        if md.mlp_hidden % self.tp:
            raise ValueError(f"tensor parallelism splits the SwiGLU hidden size: {md.mlp_hidden} (= ceil({m.mlp_ratio} * "
                             f"{m.d_model} * 2/3 / {m.mlp_multiple}) * {m.mlp_multiple}) is not divisible by tp={self.tp}")
        if md.padded_vocab % self.tp:  # model_dims pads to lcm(vocab_multiple, tp); guard against changes there
            raise ValueError(f"padded vocabulary {md.padded_vocab} is not divisible by tp={self.tp}")
        seq = cfg.data.seq_len
        chunks = 2 * self.cp if (p.cp_layout == "zigzag" and self.cp > 1) else self.cp
        if seq % chunks:
            raise ValueError(f"data.seq_len={seq} must be divisible by the {p.cp_layout} layout's {chunks} chunks "
                             f"(cp={self.cp}{' x 2' if chunks != self.cp else ''}); {seq} % {chunks} = {seq % chunks}")
        if self.sequence_parallel:
            local = seq // self.cp
            if local % self.tp:
                raise ValueError(f"sequence parallelism splits each rank's {local} tokens (seq_len {seq} / cp {self.cp}) "
                                 f"over tp={self.tp}: {local} % {self.tp} = {local % self.tp}")
        if m.arch == "transformer" and self.cp > 1:
            raise ValueError("the Transformer baseline (model.arch=transformer) runs without context parallelism; "
                             "set parallel.cp=1")

    # ------------------------------------------------------------------ coordinates
    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(tp_rank, cp_rank, dp_rank)`` of a global rank (tp innermost, then cp, then dp)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        return rank % self.tp, (rank // self.tp) % self.cp, rank // (self.tp * self.cp)

    # ------------------------------------------------------------------ groups
    def init_groups(self) -> "ParallelDims":
        """Create the groups through megatron-core's ``parallel_state`` (collective: call on every rank).

        Requires an initialized default process group of exactly ``world_size`` ranks. On machines
        without a GPU the megatron-core CPU compatibility layer is applied first.
        """
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call dist.init_process_group first")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"the layout was built for world size {self.world_size} but torch.distributed has "
                             f"{dist.get_world_size()} ranks")
        try:
            from megatron.core import parallel_state as ps
        except ImportError:
            if self.tp > 1:
                raise ImportError("tensor parallelism needs megatron-core: pip install 'foxdist[parallel]'") from None
            return self._init_torch_groups()

        from .megatron_compat import apply_cpu_compat

        apply_cpu_compat()
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=self.tp, context_parallel_size=self.cp,
                                     order="tp-cp-ep-dp-pp", create_gloo_process_groups=False)
        self._groups = {
            "tp": ps.get_tensor_model_parallel_group(),
            "cp": ps.get_context_parallel_group(),
            "dp": ps.get_data_parallel_group(with_context_parallel=False),
            "dp_cp": ps.get_data_parallel_group(with_context_parallel=True),
        }
        rank = dist.get_rank()
        expect = self.coords(rank)
        got = (ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank(),
               ps.get_data_parallel_rank(with_context_parallel=False))
        if got != expect:  # megatron changed its rank order: fail loudly rather than mis-shard
            raise RuntimeError(f"rank {rank}: megatron-core coordinates (tp, cp, dp) = {got}, expected {expect}")
        return self

    def _init_torch_groups(self) -> "ParallelDims":
        """Same layout with plain ``torch.distributed.new_group`` (used when megatron-core is absent)."""
        rank, groups = dist.get_rank(), {}
        coords = [self.coords(r) for r in range(self.world_size)]
        # every rank creates every group, in the same order
        for name, key in (("tp", lambda c: (c[1], c[2])), ("cp", lambda c: (c[0], c[2])),
                          ("dp", lambda c: (c[0], c[1])), ("dp_cp", lambda c: (c[0],))):
            members: dict = {}
            for r, c in enumerate(coords):
                members.setdefault(key(c), []).append(r)
            for ranks in members.values():
                g = dist.new_group(ranks)
                if rank in ranks:
                    groups[name] = g
        self._groups = groups
        self._torch_groups = True
        return self

    def destroy_groups(self) -> None:
        if getattr(self, "_torch_groups", False):
            for g in set(self._groups.values()):
                dist.destroy_process_group(g)
            self._groups = {}
            return
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        self._groups = {}

    @property
    def has_groups(self) -> bool:
        """Whether :meth:`init_groups` has created this layout's process groups."""
        return bool(self._groups)

    def _group(self, name):
        if not self._groups:
            raise RuntimeError("process groups not created yet: call ParallelDims.init_groups() first")
        return self._groups[name]

    @property
    def tp_group(self):
        return self._group("tp")

    @property
    def cp_group(self):
        return self._group("cp")

    @property
    def dp_group(self):
        """Pure data-parallel group (same tp and cp rank): key the data loader by its rank."""
        return self._group("dp")

    @property
    def dp_cp_group(self):
        """Data x context parallel group: replicated parameters reduce their gradients over it."""
        return self._group("dp_cp")

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(self.cp_group)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    def describe(self) -> str:
        return (f"world={self.world_size} = tp {self.tp} x cp {self.cp} x dp {self.dp}"
                f"{' (+ sequence parallel)' if self.sequence_parallel else ''}")


def padded_vocab_for(cfg_model, tp: int) -> int:
    """Padded vocabulary of the tensor-parallel model: a multiple of ``lcm(vocab_multiple, tp)``."""
    return model_dims(cfg_model, tp).padded_vocab


__all__ = ["ParallelDims", "padded_vocab_for"]
