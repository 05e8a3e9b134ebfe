"""Import-only stand-in for `sgl_kernel` so the real SGLang 0.5.23 server runs on a CPU without the kernels.

SGLang imports `sgl_kernel` unconditionally on its CPU path, but its torch-native attention/sampling path
(`--device cpu --attention-backend torch_native`, `SGLANG_USE_CPU_ENGINE=1`) never calls these functions. Every
function here raises NotImplementedError if called, so a code path that does need a kernel fails loudly instead
of computing something wrong. Put `megatron_tropd/rollout/cpu_stubs` on PYTHONPATH only when launching a server on a machine
without the real kernels (`megatron_tropd.rollout.sglang_server` does this when `sglang.sgl_kernel_stub` says so).
"""
from sgl_kernel import allreduce, scalar_type  # noqa: F401  (submodules SGLang imports by attribute)
from sgl_kernel._stub import unavailable

__version__ = "0.0.0+tropd.stub"
TROPD_STUB = True  # lets tests and the launcher tell the stand-in from the real package

_NAMES = [
    # imported at start-up by SGLang's CPU code paths (mem cache / speculative decoding helpers)
    "copy_all_layer_kv_cache_cpu",
    "assign_req_to_token_pool_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "build_tree_kernel_efficient_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "verify_tree_greedy_cpu",
]
for _n in _NAMES:
    globals()[_n] = unavailable(_n)
del _n
