"""Shared fixtures and helpers of the test suite (tests/ is on sys.path: pytest's rootdir insertion)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_hf import save_tiny_pair  # noqa: E402


def pytest_report_header(config):
    """Free disk where the suite writes: a full run needs about 1 GB of temp files and model cache (the 0.5 GB
    SmolLM2 checkpoint and, for one module, a 0.5 GB temperature-folded copy of it; estimated from the files, not
    sampled), so a machine short of it fails with ENOSPC."""
    import tempfile

    from megatron_tropd.models.builtin import default_cache_dir

    cache = default_cache_dir()
    probe = cache if cache.exists() else cache.parent
    where = {"temp": Path(tempfile.gettempdir()), "model cache": probe}
    return "free disk: " + ", ".join(f"{name} {shutil.disk_usage(p).free / 2**30:.1f} GiB ({p})"
                                     for name, p in where.items() if p.exists())


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A 2-layer student and a 3-layer teacher, random, char tokenizer (HF dirs tiny_models/student, /teacher)."""
    return save_tiny_pair(tmp_path_factory.mktemp("tiny_models"))


def kill_after_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 600.0) -> int:
    """SIGKILL `proc` (a `tropd train` into `run_dir`) as soon as its checkpoint of `step` is complete (or when it
    ends first); returns the step of the newest checkpoint directory it left."""
    marker = run_dir / "checkpoints" / f"step_{step:06d}" / "COMPLETE"
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    return max(int(p.name.split("_")[1].split(".")[0]) for p in (run_dir / "checkpoints").iterdir())
