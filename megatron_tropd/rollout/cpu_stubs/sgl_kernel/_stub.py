"""Helpers for the import-only `sgl_kernel` stand-in: every function raises if it is ever called."""
from __future__ import annotations


def unavailable(name: str):
    def fn(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this is megatron-tropd's import-only sgl_kernel stand-in "
            "(megatron_tropd/rollout/cpu_stubs). SGLang's torch-native CPU path must not call kernels; install the real "
            "sgl-kernel for GPU/AMX CPU backends.")

    fn.__name__ = name
    fn.__qualname__ = name
    return fn
