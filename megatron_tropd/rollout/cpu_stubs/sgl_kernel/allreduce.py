"""Stand-in for `sgl_kernel.allreduce` (custom all-reduce kernels; unused on one CPU process)."""
from sgl_kernel._stub import unavailable


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return unavailable(f"allreduce.{name}")
