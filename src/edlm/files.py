"""Output directories: checked before the work starts, written atomically, never over a user's data.

Every directory edlm writes for a user (converted models, checkpoints, final models, exports, the
demo models) goes through `write_dir_atomically`: the content is written to a temp dir beside the
target and renamed over it, so readers see the old directory or the new one, never a mix. Before
any model is loaded, `check_output_target` says whether OUT can be written at all and
`prepare_output_dir` whether it may be: never over the model being read, and with --force only over
an earlier checkpoint, so a mistyped OUT cannot empty a home directory. A write that fails (a full
disk, no permission) is one line naming the target, and leaves no temp dir behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from edlm.errors import EdlmError, first_line

# A dir holding one of these is a checkpoint, a run dir or an earlier edlm output: --force may replace it.
OUTPUT_SIGNS = ("config.json", "adapter_config.json", "trainer.json", "checkpoints")


def write_dir_atomically(out: str | Path, write: Callable[[Path], object]) -> Path:
    """Run write(tmp) on a fresh temp dir beside OUT, then replace OUT with it; returns OUT."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise write_failure(exc, out) from None
    try:
        write(tmp)
        publish_dir(tmp, out)
    except BaseException as exc:
        failure = write_failure(exc, out)  # measured before the clean-up frees the space again
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from None
        raise
    return out


def write_failure(exc: BaseException, target: str | Path) -> EdlmError | None:
    """The one-line error for a write to TARGET that raised EXC, or None when EXC is no I/O failure.

    torch.save on a full disk raises a bare RuntimeError ("[enforce fail at inline_container.cc]
    ... file write failed") and safetensors its own error type, neither with an errno: a write
    failure that leaves under 64 MB free is taken to be the full disk."""
    text = str(exc)
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text
    if isinstance(exc, EdlmError) or not isinstance(exc, Exception):
        return None
    if not (isinstance(exc, OSError) or full or any(sign in text for sign in _WRITE_FAILED)):
        return None
    free = _free_bytes(Path(target))
    if full or (free is not None and free < 64 * 2**20):
        room = f" ({free / 1e6:.0f} MB free)" if free is not None else ""
        return EdlmError(f"no space left on device writing {target}{room}")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
    return EdlmError(f"could not write {target}: {reason}")


_WRITE_FAILED = ("enforce fail", "file write failed", "failed writing", "IoError")


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def publish_dir(tmp: Path, out: Path) -> None:
    """Replace OUT with the finished TMP (same file system): the one rename every writer ends with.
    Multi-process writers (checkpoints: every rank saves its shard into TMP) call it directly."""
    tmp.chmod(0o777 & ~_umask())  # mkdtemp made it 0700: a model one user writes, another serves
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


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


def prepare_output_dir(out: str | Path, force: bool, **sources: str | Path) -> Path:
    """OUT for a command that writes a directory, checked before any work: writable, apart from
    every input in SOURCES (label=path, e.g. BASE=...), and empty, or with --force an earlier
    checkpoint or edlm output (never a user's other files)."""
    out = check_output_target(out)
    check_apart(out, **sources)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise EdlmError(f"output directory {out} is not empty (use --force to overwrite)")
        if not any((out / sign).exists() for sign in OUTPUT_SIGNS):
            raise EdlmError(f"refusing to replace {out}: it holds {_listing(out)} and is not an edlm output "
                            "or checkpoint (choose another OUT, or empty it yourself)")
    return out


def check_apart(out: str | Path, **sources: str | Path) -> None:
    """OUT may not be, contain or lie inside an input (symlinks resolved): replacing OUT would
    delete the model being read, or write into it."""
    where = Path(out).expanduser().resolve()
    for label, source in sources.items():
        if source is None:
            continue
        src = Path(source).expanduser().resolve()
        if where == src:
            raise EdlmError(f"OUT {out} is {label} {source}: OUT must differ from {label}")
        if src.is_relative_to(where):
            raise EdlmError(f"OUT {out} contains {label} {source}: writing it would delete {label}; "
                            "choose another output directory")
        if where.is_relative_to(src):
            raise EdlmError(f"OUT {out} lies inside {label} {source}: choose a directory outside it")


def _listing(out: Path, shown: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


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
