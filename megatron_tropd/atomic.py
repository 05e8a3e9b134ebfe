"""Atomic writes: a directory (or file) is either absent or complete, never half-written.

    with atomic_directory(out_dir) as tmp:     # one writer: fill `tmp`, it becomes `out_dir` on success
        ...
    tmp = fresh_tmp(out_dir); ...; publish(tmp, out_dir)   # collective writers: rank 0 creates and publishes

The temporary sibling is `.{name}.tmp` in the same parent (so the final rename stays on one filesystem, where it
is atomic); one left over by an interrupted run is removed on the next attempt.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def tmp_sibling(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.tmp"


def fresh_tmp(out_dir: str | Path) -> Path:
    """An empty temporary sibling of `out_dir` (a stale one from an interrupted run is removed first)."""
    tmp = tmp_sibling(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: str | Path, out_dir: str | Path, overwrite: bool = False) -> None:
    """Rename the finished `tmp` to `out_dir`. An existing `out_dir` is replaced only with `overwrite`, and is
    moved aside first so that a reader never sees a mixture of old and new files."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists; remove it or pass overwrite=True")
        old = out_dir.parent / f".{out_dir.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; publish it as `out_dir` when the block finishes, remove it if it raises."""
    tmp = fresh_tmp(out_dir)
    try:
        yield tmp
        publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file through a temporary sibling and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
