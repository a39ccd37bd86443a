"""CPU compatibility layer for megatron-core (0.19): applied only when no GPU is present.

megatron-core's tensor-parallel layers, ``parallel_state`` and ``vocab_parallel_cross_entropy`` run
on CPU with gloo as they are, but a few code paths call ``torch.cuda`` directly and fail (or try to
initialize CUDA) on a machine without a GPU. :func:`apply_cpu_compat` patches exactly these, and
nothing when ``torch.cuda.is_available()``:

1. **Buffers allocated on "the current CUDA device".** ``tensor_parallel.mappings`` (the
   sequence-parallel all-gather / reduce-scatter and the last-dim gather), ``tensor_parallel.layers``
   (the sequence-parallel backward reduce-scatter buffer of the linear layers, GPU-side init),
   ``tensor_parallel.utils`` (1-D split/gather), ``tensor_parallel.data``, ``megatron.core.utils``
   (the global memory buffer used by the sequence-parallel forward all-gather) and
   ``parallel_state`` (``torch.cuda.synchronize`` around timeouts/barriers) look up
   ``torch.cuda.current_device()``. In those modules only, the global name ``torch`` is replaced by
   a thin proxy that forwards every attribute to the real ``torch`` except
   ``torch.cuda.current_device()`` (returns ``torch.device("cpu")``) and
   ``torch.cuda.synchronize()`` (a no-op). Tensors, dtypes, ``torch.distributed`` and everything
   else are the real objects.
2. **The RNG tracker** (``tensor_parallel.random``): ``model_parallel_cuda_manual_seed`` and
   ``CudaRNGStatesTracker`` save, seed and restore the CUDA generator
   (``torch.cuda.get_rng_state``/``manual_seed``, ``_get_cuda_rng_state``/``_set_cuda_rng_state``).
   On CPU the device generator *is* the CPU generator, so these are redirected to
   ``torch.get_rng_state``/``torch.manual_seed``/``torch.set_rng_state``. The tracker class is
   replaced by a subclass whose ``fork`` omits the "CPU RNG state changed within GPU RNG context"
   warning (on CPU, drawing random numbers inside a fork changes the CPU state by design).
   Result: ``model_parallel_cuda_manual_seed(seed)`` works and ``get_cuda_rng_tracker().fork()``
   gives per-tp-rank random streams that leave the default stream untouched.

3. **CPU autocast in the linear layers' backward.** ``LinearWithGradAccumulationAndAsyncCommunication``
   and ``LinearWithFrozenWeight`` (the autograd functions behind the column/row-parallel layers)
   are decorated with ``torch.amp.custom_fwd/custom_bwd(device_type="cuda")``, which restore the
   forward's autocast state in the backward for CUDA autocast only. Under ``torch.autocast("cpu",
   bf16)`` the backward would then multiply a bf16 gradient by an fp32 weight and fail. The
   undecorated ``forward``/``backward`` are re-decorated with ``device_type="cpu"``.

Not patched (not needed by foxdist on CPU): ``dist_checkpointing.save``, pipeline schedules,
megatron's DDP and optimizers (CUDA-only by design), TransformerEngine paths.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import torch

_PROXIED_MODULES = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.random",
)

_APPLIED = False


class _CpuCuda:
    """Stands in for ``torch.cuda`` inside the patched megatron modules."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None):
        return None

    # RNG: the CPU generator plays the device generator's role
    @staticmethod
    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)


class _TorchProxy:
    """Forwards to the real ``torch`` except ``.cuda`` (see :class:`_CpuCuda`)."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _make_tracker_class(base):
    class CpuRNGStatesTracker(base):
        """megatron's RNG tracker on the CPU generator, without the CPU-state-changed warning."""

        @contextlib.contextmanager
        def fork(self, name=None):
            from megatron.core.tensor_parallel import random as mrandom

            name = name or mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer = self.states_[outer_name]
                torch.set_rng_state(outer)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


def _cpu_autocast_linear_functions():
    import inspect

    from megatron.core.tensor_parallel import layers as mlayers

    for name in ("LinearWithGradAccumulationAndAsyncCommunication", "LinearWithFrozenWeight"):
        cls = getattr(mlayers, name, None)
        if cls is None:
            continue
        fwd, bwd = inspect.unwrap(cls.forward), inspect.unwrap(cls.backward)
        cls.forward = staticmethod(torch.amp.custom_fwd(device_type="cpu")(fwd))
        cls.backward = staticmethod(torch.amp.custom_bwd(device_type="cpu")(bwd))


def needed() -> bool:
    """True when there is no usable GPU (the only case in which the patches are applied)."""
    return not torch.cuda.is_available()


def apply_cpu_compat(force: bool = False) -> bool:
    """Apply the patches described in the module docstring when no GPU is present (idempotent).

    Returns True when the patches are active after the call. ``force=True`` applies them even
    with a GPU (tests only).
    """
    global _APPLIED
    if _APPLIED:
        return True
    if not (force or needed()):
        return False
    proxy = _TorchProxy()
    for name in _PROXIED_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy
    _cpu_autocast_linear_functions()
    mrandom = sys.modules["megatron.core.tensor_parallel.random"]
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    mrandom.CudaRNGStatesTracker = _make_tracker_class(mrandom.CudaRNGStatesTracker)
    # a tracker created before the patch would still hold the CUDA class
    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    _APPLIED = True
    return True


def is_applied() -> bool:
    return _APPLIED


__all__ = ["apply_cpu_compat", "is_applied", "needed"]
