"""Atomic directory writes: a crash or Ctrl-C never leaves a half-written checkpoint or model dir.

Every directory edlm writes for a user (converted models, checkpoints, final models, exports, the
demo models) goes through `write_dir_atomically`: the content is written to a temp dir beside the
target and renamed over it, so readers see the old directory or the new one, never a mix.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from edlm.errors import EdlmError


def write_dir_atomically(out: str | Path, write: Callable[[Path], object]) -> Path:
    """Run write(tmp) on a fresh temp dir beside OUT, then replace OUT with it; returns OUT."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def publish_dir(tmp: Path, out: Path) -> None:
    """Replace OUT with the finished TMP (same file system): the one rename every writer ends with.
    Multi-process writers (checkpoints: every rank saves its shard into TMP) call it directly."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def copy_dir_atomically(src: str | Path, dst: str | Path) -> Path:
    """Publish a finished directory (a run's last model, a shipped demo model)."""
    return write_dir_atomically(dst, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


def prepare_output_dir(out: str | Path, force: bool) -> Path:
    """OUT for a command that writes a directory: refuse a file, or a non-empty dir without --force."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EdlmError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EdlmError(f"output directory {out} is not empty (use --force to overwrite)")
    return out
