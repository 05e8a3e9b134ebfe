"""Run megatron-core 0.16 on CPU (gloo) for development and tests.

megatron-core assumes CUDA in four places that a CPU-only forward/backward and pipeline schedule reach.
`apply()` patches exactly those, and only when CUDA is unavailable; on a GPU it is never called
(`megatron_tropd.distributed.parallel.initialize` calls it only when `torch.cuda.is_available()` is False), so GPU
behaviour is unchanged. Each patch replaces the CUDA device with the CPU and nothing else:

1. `megatron.core.utils.GlobalMemoryBuffer.get_tensor` allocates its scratch buffer on
   `torch.cuda.current_device()` (used by sequence-parallel all-gathers and the TP linear layers).
   -> `megatron.core.utils` sees the `torch` proxy described under 3 + 4 (so does its
   `local_multi_tensor_l2_norm`, used for grad clipping without apex).
2. `tensor_parallel.random.CudaRNGStatesTracker` stores and swaps CUDA generator states (dropout under TP,
   `model_parallel_cuda_manual_seed`, weight init under `get_cuda_rng_tracker().fork()`).
   -> `CpuRNGStatesTracker`: the same named-state tracker over the CPU default generator. Seeds still come from
   megatron's `model_parallel_cuda_manual_seed` (model-parallel seed = seed + 2718 + tp_rank), so different TP
   ranks still draw different dropout masks inside `fork()`, as megatron-core intends.
3. `pipeline_parallel/schedules.py` creates `torch.zeros(..., device="cuda")` token counters.
4. `pipeline_parallel/p2p_communication.py` allocates receive buffers on `torch.cuda.current_device()` and calls
   `torch.cuda.synchronize()`.
   -> 3 and 4: those two modules see a `torch` proxy whose tensor factories map a CUDA device to the CPU and
   whose `cuda.current_device()` / `cuda.synchronize()` are the CPU equivalents. Every other attribute is the
   real `torch`, and no other module is touched.
Further spots, found beyond the four above once RoPE, the local-spec attention and the training stack run:
5. `models/common/embeddings/rotary_pos_embedding.py` moves RoPE's `inv_freq` to `torch.cuda.current_device()`
   on the first forward, and
6. `transformer/utils.py::get_default_causal_mask` builds the causal mask with `device="cuda"`, and
7. `tensor_parallel/mappings.py` allocates all-gather outputs on `torch.cuda.current_device()` (gathering
   logits in tests and baselines, sequence parallelism), and
7b. `tensor_parallel/layers.py`'s sequence-parallel backward (`LinearWithGradAccumulationAndAsyncCommunication`)
   all-gathers the input again on `torch.cuda.current_device()`
   -> all four get the same `torch` proxy.
8. The training stack: `distributed/param_and_grad_buffer.py` and `distributed/distributed_data_parallel.py`
   (DDP grad buffers on `torch.cuda.current_device()`), `optimizer/optimizer.py` and `optimizer/clip_grads.py`
   (`device='cuda'` scalars for the loss scale, found-inf flag and grad norm) -> the same `torch` proxy;
   `clip_grads.clip_grad_by_total_norm_fp32` asserts `grad.type() == 'torch.cuda.FloatTensor'` -> the same
   in-place scaling by max_norm / (total_norm + 1e-6), asserting float32 on any device (`_clip_grads_fp32`).

9. `tensor_parallel/random.py`'s activation recompute saves/restores the CUDA generator state
   -> an empty placeholder state and a no-op restore (the CPU generator and the tracker's states are still saved
   and restored by megatron itself).

Three more are scoped to the call that needs them (context managers below, no-ops with CUDA):
- `tensor_cuda_is_noop()` around GPTModel construction: with tied embeddings and PP > 1 megatron calls
  `weight.data.cuda()` before the embedding-group all-reduce;
- `dist_checkpoint_save()` around `dist_checkpointing.save`: CUDA calls in its writer and a spawned results queue;
- `cuda_tensor_type_names()` around `get_megatron_optimizer`: the DistributedOptimizer (and the mixed-precision
  optimizer) sort parameters by `param.type()` and accept only 'torch.cuda.{Float,Half,BFloat16}Tensor'; that is the
  only obstacle to megatron's DistributedOptimizer on gloo (measured with torch 2.14.1: gloo runs the
  reduce_scatter_tensor / all_gather_into_tensor / _coalescing_manager calls of its grad and param buffers).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import types

import torch

_APPLIED = False


# --- 2. RNG tracker ------------------------------------------------------------------------------------
class CpuRNGStatesTracker:
    """Named RNG states over the CPU default generator, with megatron's tracker interface."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


# --- 8. grad clipping without the CUDA type assertion --------------------------------------------------
def _clip_grads_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    for g in grads:
        assert g.dtype == torch.float32, f"expected float32 main grads, got {g.dtype}"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


# --- 3 + 4. torch proxy for the pipeline modules --------------------------------------------------------
def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


def _wrap_factory(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return factory


class _CudaOnCpu(types.SimpleNamespace):
    """`torch.cuda` as the pipeline modules use it, on the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _make_torch_proxy():
    proxy = types.ModuleType("torch_cpu_proxy")
    proxy.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    for name in ("zeros", "ones", "empty", "full", "tensor", "arange"):
        setattr(proxy, name, _wrap_factory(getattr(torch, name)))
    proxy.cuda = _CudaOnCpu(current_device=lambda: torch.device("cpu"), synchronize=lambda *a, **k: None)
    return proxy


_PROXIED_MODULES = (
    "utils",  # 1. GlobalMemoryBuffer, and local_multi_tensor_l2_norm (grad clipping)
    "pipeline_parallel.schedules",
    "pipeline_parallel.p2p_communication",
    "models.common.embeddings.rotary_pos_embedding",
    "transformer.utils",
    "tensor_parallel.mappings",
    "tensor_parallel.layers",  # sequence-parallel backward all-gathers into torch.cuda.current_device()
    "distributed.param_and_grad_buffer",
    "distributed.distributed_data_parallel",
    "optimizer.optimizer",
    "optimizer.clip_grads",
)


def apply() -> None:
    """Patch megatron-core's CUDA-only spots for CPU execution. Idempotent. Never call on a GPU machine."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.apply() must not be used when CUDA is available")
    import importlib
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # 9. activation recompute (`CheckpointFunction`) saves and restores the CUDA generator beside the CPU one and
    # the tracker's states; on CPU there is no CUDA generator: an empty placeholder state, restored as a no-op.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None
    proxy = _make_torch_proxy()
    for name in _PROXIED_MODULES:
        importlib.import_module(f"megatron.core.{name}").torch = proxy
    importlib.import_module("megatron.core.optimizer.optimizer").clip_grad_by_total_norm_fp32 = _clip_grads_fp32
    _APPLIED = True


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default and model-parallel RNG states with megatron-core's own offsets, on CPU or GPU."""
    from megatron.core.tensor_parallel import random as mcore_random

    torch.manual_seed(seed)
    mcore_random.model_parallel_cuda_manual_seed(seed)


# --- scoped workarounds (context managers; no-ops where CUDA is available) ------------------------------------------
@contextlib.contextmanager
def tensor_cuda_is_noop():
    """With tied embeddings and PP > 1, megatron's `setup_embeddings_and_output_layer` moves the shared weight with
    `weight.data.cuda()` before all-reducing it over the embedding group; without CUDA keep it on the CPU."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


@contextlib.contextmanager
def dist_checkpoint_save():
    """Two CPU-only obstacles in megatron's torch_dist writer, lifted for the duration of a save:
    - it forks writer processes, and the ranks `testing.run_distributed` spawns are daemonic (so they die with the
      launcher); Python forbids daemonic processes to have children. megatron joins its writers before returning.
    - `preload_tensors` calls `torch.cuda.synchronize()` and the finalisation puts a flag on
      `torch.cuda.current_device()`: without CUDA, synchronise nothing and use the CPU.
    - its write-results queue is a `multiprocessing.Manager` queue from a *spawned* server (a fresh interpreter that
      re-imports torch, ~20 s); a synchronous save writes and reads it in this process, so a plain queue does."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    proc = multiprocessing.current_process()
    was = proc._config.get("daemon", False)
    sync, current = torch.cuda.synchronize, torch.cuda.current_device
    proc._config["daemon"] = False
    cpu = not torch.cuda.is_available()
    if cpu:
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.current_device = lambda: "cpu"
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        proc._config["daemon"] = was
        torch.cuda.synchronize, torch.cuda.current_device = sync, current


_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def cuda_tensor_type_names():
    """While building megatron's optimizer: `t.type()` (no arguments) of a CPU float32/float16/bfloat16 tensor names
    the CUDA tensor type of that dtype, as megatron's optimizers check (`distrib_optimizer.py`
    `_build_model_and_main_param_groups` and `__init__`, `optimizer.py` `Float16OptimizerWithFloat16Params`).
    `t.type(dtype)` conversions and every other tensor are unchanged; nothing after construction calls it."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, *args, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original
