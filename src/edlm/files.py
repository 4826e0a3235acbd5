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


def check_output_target(out: str | Path) -> Path:
    """Fail fast, before any model is loaded, when OUT cannot be written; returns OUT.

    OUT must be a dir or not exist yet, and its nearest existing ancestor a writable dir on a real
    file system: creating and removing a temp dir there is the only check that also catches
    read-only mounts, /proc and /sys (where even root cannot create entries)."""
    out = Path(out)
    resolved = out.expanduser().resolve()
    if resolved.exists() and not resolved.is_dir():
        raise EdlmError(f"output path {out} exists and is not a directory")
    if any(resolved.is_relative_to(p) for p in _PSEUDO_FS):
        raise EdlmError(f"cannot write {out}: {resolved.parents[-2]} is a kernel pseudo-file system")
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EdlmError(f"cannot write {out}: {ancestor} is a file, not a directory")
    try:
        Path(tempfile.mkdtemp(prefix=".edlm-probe-", dir=ancestor)).rmdir()
    except OSError as e:
        raise EdlmError(f"cannot write {out}: {ancestor} is not writable ({e.strerror})") from None
    return out


_PSEUDO_FS = (Path("/proc"), Path("/sys"))  # not /dev: /dev/shm is a real tmpfs


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


LOCK_NAME = ".lock"


def take_run_lock(out: str | Path) -> Path:
    """One job per run directory: create OUT/.lock (pid, host) atomically; returns its path.

    A lock held by a live process, or by any process on another host (which cannot be checked
    from here), is an EdlmError naming the holder; a lock left by a dead process on this host is
    taken over with a notice."""
    import json
    import os
    import socket
    import time

    lock = Path(out) / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None:
                continue  # removed (or being written) meanwhile: try again
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                print(f"edlm: taking over {lock}: its holder (pid {pid} on {host}) is no longer running")
                lock.unlink(missing_ok=True)
                continue
            raise EdlmError(f"{out} is in use by another job (pid {pid} on {host} since {holder.get('since')}); "
                            f"wait for it, choose another --out, or delete {lock} if that job is gone") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise EdlmError(f"could not take the lock {lock}: it keeps changing; is another job starting in {out}?")


def release_run_lock(lock: Path) -> None:
    """Remove OUT/.lock if this process still holds it."""
    import os

    holder = _read_lock(lock)
    if holder is not None and holder.get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def _read_lock(lock: Path) -> dict | None:
    import json

    try:
        data = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {"pid": None, "host": "unknown host", "since": "unknown (unreadable lock file)"}
    return data if isinstance(data, dict) else {"pid": None, "host": "unknown host", "since": "?"}


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
