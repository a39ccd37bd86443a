"""Typed run configuration: dataclass sections, recipes (``FILE:FUNCTION``), ``--set`` overrides and
the derived values (data-parallel degree, accumulation steps, local sequence length).

A recipe is a plain Python function returning a :class:`Config`; recipes derive from each other by
calling one another and mutating the result. Every derived quantity is computed in
:func:`derive`, the one place that validates how the degrees and batch sizes fit together.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    arch: str = "fox"  # "fox" (forgetting attention) or "transformer" (RoPE + SDPA baseline)
    vocab_size: int = 257
    vocab_multiple: int = 64  # embedding rows are padded to a multiple of this (and of tp)
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads
    head_dim: int = 0  # 0: d_model // n_heads
    mlp_ratio: float = 3.5  # SwiGLU hidden = ratio * d_model * 2/3 (FLA/FoX convention: 4 matches a 4x GELU MLP)
    mlp_multiple: int = 64  # SwiGLU hidden size rounded up to a multiple of this
    token_shift: bool = True  # FoX Pro: data-dependent shift of k and v
    qk_norm: bool = True  # FoX Pro: per-head RMSNorm of q and k
    output_gate: bool = True  # FoX Pro: sigmoid output gate
    output_norm: bool = True  # FoX Pro: per-head RMSNorm of the attention output
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_embeddings: bool = False
    activation_checkpointing: bool = False


@dataclass
class ParallelConfig:
    tp: int = 1
    cp: int = 1
    cp_layout: str = "zigzag"  # "zigzag" or "contiguous"
    cp_mode: str = "ring"  # "ring", "ulysses" or "hybrid"
    ulysses_degree: int = 1
    cp_exchange: str = "acp"  # with ACP on: "acp" (never send pruned key blocks) or "ring" (dense one-way ring)
    cp_exchange_segments: int = 4  # key rows of a chunk are sent in this many tails (ACP exchange granularity)
    sequence_parallel: bool = False
    zero_stage: int = 0  # DeepSpeed ZeRO stage; 0 = plain data parallel
    backend: str = "auto"  # "auto" (nccl on GPU, gloo on CPU), "nccl", "gloo"
    timeout_s: int = 600


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" (the interpreter's own sources) or a `foxdist prepare` directory
    seq_len: int = 512
    document_masking: bool = False  # no attention across EOS-separated documents
    num_val_batches: int = 4
    skip_bad_frames: bool = False  # replace windows touching a damaged shard frame (warned, counted) instead of failing


@dataclass
class TrainConfig:
    max_steps: int = 200  # length of the schedule
    stop_at_step: int = 0  # stop early (with a checkpoint) at this step, e.g. to fit a time slot; 0: off
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    seed: int = 1234
    device: str = "auto"  # "auto", "cpu", "cuda"
    dtype: str = "auto"  # autocast dtype: "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp32"
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: no periodic validation
    max_skipped_steps: int = 5  # consecutive non-finite steps before stopping
    loss_spike_factor: float = 2.0  # log a loss spike when loss > factor x its running mean (0: off)
    compile: bool = False  # torch.compile each block (fuses the norms, gates and token shift around attention)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # "cosine" (warmup then cosine), "wsd" (warmup-stable-decay), "constant"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (a final one is always written)
    keep_last: int = 3
    keep_every: int = 0  # also keep every N-th step forever (0: off)
    resume: bool = True  # resume from the run directory's latest checkpoint when present
    overwrite: bool = False  # start over in a run dir whose checkpoints are another config's (or resume=false): deletes them


@dataclass
class LoggingConfig:
    run_dir: str = ""  # "" -> runs/<recipe>
    log_every: int = 1
    tensorboard: bool = True
    progress: str = "auto"  # "auto" (bar on a terminal), "bar", "lines"


@dataclass
class KernelsConfig:
    attention_impl: str = "auto"  # "auto", "reference", "triton"
    acp_eps: float | None = None  # adaptive computation pruning tolerance, e.g. 4.54e-5 (= e^-10)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    recipe: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        for name, value in d.items():
            if name == "recipe":
                cfg.recipe = value
                continue
            section = _section(cfg, name)
            for key, v in value.items():
                _field(section, name, key)
                setattr(section, key, v)
        return cfg


_CHOICES = {
    ("model", "arch"): ("fox", "transformer"),
    ("parallel", "cp_layout"): ("zigzag", "contiguous"),
    ("parallel", "cp_mode"): ("ring", "ulysses", "hybrid"),
    ("parallel", "cp_exchange"): ("acp", "ring"),
    ("parallel", "backend"): ("auto", "nccl", "gloo"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "dtype"): ("auto", "bf16", "fp32"),
    ("schedule", "kind"): ("cosine", "wsd", "constant"),
    ("logging", "progress"): ("auto", "bar", "lines"),
    ("kernels", "attention_impl"): ("auto", "reference", "triton"),
}


def _section(cfg: Config, name: str):
    sections = [f.name for f in dataclasses.fields(cfg) if f.name != "recipe"]
    if name not in sections:
        raise ValueError(f"unknown config section {name!r}; valid sections: {', '.join(sections)}")
    return getattr(cfg, name)


def _field(section, section_name: str, key: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ValueError(f"unknown key {section_name}.{key}; valid keys of [{section_name}]: {', '.join(fields)}")
    return fields[key]


def _parse_value(text: str, tp, where: str):
    hints = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else ()
    if hints:
        if text.lower() in ("none", "null", ""):
            if type(None) in hints:
                return None
        inner = [h for h in hints if h is not type(None)]
        return _parse_value(text, inner[0], where)
    try:
        if tp is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(float(text)) if ("e" in text.lower() and float(text).is_integer()) else int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
    except ValueError:
        pass
    raise ValueError(f"--set {where}={text!r}: expected a value of type {getattr(tp, '__name__', tp)}")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings, type-checked against the dataclass fields."""
    hints_cache = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set expects section.key=value (e.g. train.max_steps=50), got {item!r}")
        path, text = item.split("=", 1)
        name, key = path.strip().split(".", 1)
        section = _section(cfg, name)
        _field(section, name, key)
        cls = type(section)
        if cls not in hints_cache:
            hints_cache[cls] = typing.get_type_hints(cls)
        setattr(section, key, _parse_value(text.strip(), hints_cache[cls][key], path))
    return cfg


def load_recipe(spec: str) -> Config:
    """Load ``FILE:FUNCTION`` (e.g. ``recipes/debug.py:cpu``) and return the Config it builds."""
    if ":" not in spec:
        raise ValueError(f"--recipe expects FILE:FUNCTION (e.g. recipes/debug.py:cpu), got {spec!r}")
    file, func = spec.rsplit(":", 1)
    path = Path(file)
    if not path.is_file():
        raise ValueError(f"recipe file {file!r} not found (from --recipe {spec!r}); paths are relative to the "
                         f"current directory {Path.cwd()}")
    mod_name = "foxdist_recipe_" + path.stem.replace("-", "_")
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, func, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == mod_name]
        raise ValueError(f"recipe function {func!r} not found in {file}; it defines: {', '.join(sorted(names))}")
    cfg = fn()
    if not isinstance(cfg, Config):
        raise ValueError(f"recipe {spec} returned {type(cfg).__name__}, expected foxdist.config.Config")
    cfg.recipe = spec
    return cfg


@dataclass(frozen=True)
class ModelDims:
    """Sizes that follow from :class:`ModelConfig` (and the tensor-parallel degree for vocab padding)."""

    head_dim: int
    n_kv_heads: int
    mlp_hidden: int
    padded_vocab: int


def model_dims(m: ModelConfig, tp: int = 1) -> ModelDims:
    """Head dim, kv heads, SwiGLU hidden size and padded vocabulary of a model config."""
    if m.d_model < 1 or m.n_layers < 1 or m.n_heads < 1:
        raise ValueError(f"model sizes must be positive: d_model={m.d_model}, n_layers={m.n_layers}, n_heads={m.n_heads}")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ValueError(f"model.d_model={m.d_model} is not divisible by n_heads={m.n_heads}; set model.head_dim")
    head_dim = m.head_dim or m.d_model // m.n_heads
    if m.arch == "transformer" and head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    n_kv = m.n_kv_heads or m.n_heads
    if m.n_heads % n_kv:
        raise ValueError(f"model.n_kv_heads={n_kv} must divide n_heads={m.n_heads}")
    mult = math.lcm(m.vocab_multiple, tp)
    padded_vocab = -(-m.vocab_size // mult) * mult
    mlp_hidden = -(-int(m.mlp_ratio * m.d_model * 2 / 3) // m.mlp_multiple) * m.mlp_multiple
    return ModelDims(head_dim=head_dim, n_kv_heads=n_kv, mlp_hidden=mlp_hidden, padded_vocab=padded_vocab)


@dataclass(frozen=True)
class Derived:
    """Quantities that follow from the config and the world size; computed only by :func:`derive`."""

    world_size: int
    tp: int
    cp: int
    dp: int
    grad_accum: int
    local_seq_len: int
    tokens_per_step: int
    dims: "ModelDims"


def derive(cfg: Config, world_size: int = 1) -> Derived:
    """Validate the config against ``world_size`` and compute derived values (errors show the arithmetic)."""
    m, p, t, d = cfg.model, cfg.parallel, cfg.train, cfg.data
    for (sec, key), choices in _CHOICES.items():
        val = getattr(getattr(cfg, sec), key)
        if val not in choices:
            raise ValueError(f"{sec}.{key}={val!r} is not one of {choices}")
    for name in ("tp", "cp", "ulysses_degree", "cp_exchange_segments"):
        if getattr(p, name) < 1:
            raise ValueError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    if world_size % (p.tp * p.cp):
        raise ValueError(f"world size {world_size} is not divisible by tp*cp = {p.tp}*{p.cp} = {p.tp * p.cp}; "
                         f"choose degrees whose product divides the number of processes")
    dp = world_size // (p.tp * p.cp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of micro_batch_size * dp = "
            f"{t.micro_batch_size} * {dp} = {t.micro_batch_size * dp} (dp = world {world_size} / (tp {p.tp} * cp {p.cp}))")
    accum = t.global_batch_size // (t.micro_batch_size * dp)
    chunks = 2 * p.cp if p.cp_layout == "zigzag" and p.cp > 1 else p.cp
    if d.seq_len % chunks:
        raise ValueError(f"data.seq_len={d.seq_len} must be divisible by the {p.cp_layout} layout's {chunks} chunks "
                         f"(cp={p.cp}{' x 2' if chunks != p.cp else ''}); {d.seq_len} % {chunks} = {d.seq_len % chunks}")
    if p.cp_mode in ("ulysses", "hybrid") and p.cp % p.ulysses_degree:
        raise ValueError(f"parallel.cp={p.cp} must be divisible by ulysses_degree={p.ulysses_degree}")
    dims = model_dims(m, p.tp)
    if m.n_heads % p.tp or dims.n_kv_heads % p.tp:
        raise ValueError(f"tensor parallel splits heads: n_heads={m.n_heads} and n_kv_heads={dims.n_kv_heads} must "
                         f"both be divisible by tp={p.tp}")
    if p.cp_mode != "ring":
        deg = p.cp if p.cp_mode == "ulysses" else p.ulysses_degree
        if (m.n_heads // p.tp) % deg:
            raise ValueError(f"Ulysses splits heads: n_heads/tp = {m.n_heads}/{p.tp} = {m.n_heads // p.tp} must be "
                             f"divisible by the Ulysses degree {deg}")
    if dims.mlp_hidden % p.tp:
        raise ValueError(f"MLP hidden size {dims.mlp_hidden} (= ceil({m.mlp_ratio} * {m.d_model} * 2/3 / {m.mlp_multiple}) * "
                         f"{m.mlp_multiple}) is not divisible by tp={p.tp}")
    if d.document_masking and p.cp > 1 and t.micro_batch_size != 1:
        raise ValueError(f"document masking with context parallelism packs one sequence per step: set "
                         f"train.micro_batch_size=1 (got {t.micro_batch_size})")
    if m.arch == "transformer" and p.cp > 1:
        raise ValueError("the Transformer baseline (model.arch=transformer) runs without context parallelism; set parallel.cp=1")
    if t.max_steps < 1:
        raise ValueError(f"train.max_steps must be >= 1, got {t.max_steps}")
    if cfg.schedule.warmup_steps < 0:
        raise ValueError(f"schedule.warmup_steps must be >= 0, got {cfg.schedule.warmup_steps}")
    if cfg.kernels.acp_eps is not None and not 0 < cfg.kernels.acp_eps < 1:
        raise ValueError(f"kernels.acp_eps must lie in (0, 1) or be none, got {cfg.kernels.acp_eps}")
    return Derived(world_size=world_size, tp=p.tp, cp=p.cp, dp=dp, grad_accum=accum,
                   local_seq_len=d.seq_len // p.cp, tokens_per_step=t.global_batch_size * d.seq_len, dims=dims)


def write_config(cfg: Config, derived: Derived, path: Path) -> None:
    """Write the resolved config plus derived values as JSON (atomically)."""
    payload = cfg.to_dict()
    payload["derived"] = dataclasses.asdict(derived)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
