"""Cache directory, content hashing and crash-safe writes."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def cache_dir(*parts: str) -> Path:
    """``$CALIBRANT_CACHE`` (default ``~/.cache/calibrant``) joined with ``parts``, created."""
    root = Path(os.environ.get("CALIBRANT_CACHE", Path.home() / ".cache" / "calibrant")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# ---------------------------------------------------------------- temporaries a kill -9 may leave behind
# Every temporary calibrant writes beside an output (or in the cache) carries its owner in its name,
# ``.<final>.<pid>@<host>.<random>.tmp``, and is listed in ``$CALIBRANT_CACHE/inflight/`` while it
# exists. A process killed with SIGKILL cannot clean up; the next calibrant command that starts
# (:func:`sweep_stale`, from the CLI) or writes beside the same output removes what a dead owner left.
# Only names carrying a dead owner's tag are ever removed, never a user's files.
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_TAGGED = re.compile(r"\.(\d+)@([0-9a-f]{6})\.")


def owner_tag(pid: int | None = None) -> str:
    return f"{os.getpid() if pid is None else pid}@{HOST}"


def _dead_owner(name: str) -> bool:
    """True when ``name`` carries the tag of a process of this host that no longer runs."""
    m = _TAGGED.search(name)
    if not m or m[2] != HOST:
        return False
    pid = int(m[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


@contextlib.contextmanager
def tracked(path: Path) -> Iterator[None]:
    """List ``path`` (a tagged temporary) in the cache's ``inflight`` register for the duration."""
    marker = None
    try:
        folder = cache_dir("inflight")
        fd, name = tempfile.mkstemp(prefix=f"{owner_tag()}.", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(str(path.resolve()))
        marker = Path(name)
    except OSError:  # an unwritable cache must not stop the work; the sibling sweep still applies
        pass
    try:
        yield
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)


def _clean(path: Path) -> str | None:
    """Remove (or, for a swapped-out ``.old``, restore) a dead owner's temporary; what was done, or None."""
    if not _dead_owner(path.name) or not (path.exists() or path.is_symlink()):
        return None
    if path.name.endswith(".old"):  # killed between moving the old output aside and the new one in
        final = path.with_name(path.name[1:_TAGGED.search(path.name).start()])
        if not final.exists():
            os.replace(path, final)
            return f"restored {final} (a replacement was interrupted)"
    _remove(path)
    return f"removed {path}"


def sweep_stale() -> list[str]:
    """Remove the temporaries that killed calibrant processes of this host left (see ``inflight``);
    returns one line per action. Never raises: cleanup must not stop a command."""
    done: list[str] = []
    try:
        markers = list(cache_dir("inflight").iterdir())
    except OSError:
        return done
    for marker in markers:
        if not _dead_owner("." + marker.name):
            continue
        try:
            path = Path(marker.read_text().strip())
            if path.name and (line := _clean(path)):
                done.append(line)
            marker.unlink(missing_ok=True)
        except OSError:
            continue
    return done


def _sweep_siblings(final: Path) -> None:
    """Dead owners' temporaries of this same output (the register may live in another cache)."""
    try:
        for path in final.parent.glob(f".{glob.escape(final.name)}.*"):
            _clean(path)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(final: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``final``.

    Works for files and directories: the caller writes whatever it wants at the yielded path. On
    an exception (SIGINT and SIGTERM included, see :mod:`calibrant.interrupts`) the temporary is
    removed and ``final`` is untouched, so a crash never leaves a half-written output that looks
    whole; after a SIGKILL, the next calibrant command removes it (:func:`sweep_stale`).
    """
    from calibrant.interrupts import deferred

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_siblings(final)
    tag = owner_tag()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}.", suffix=".tmp", dir=final.parent))
    tmp.rmdir()  # the caller decides whether it is a file or a directory
    old = final.with_name(f".{final.name}.{tag}.old")
    try:
        with tracked(tmp):
            yield tmp
            if final.exists():
                if not overwrite:  # someone else created it while this ran: keep this result beside it
                    from calibrant.errors import OutputExistsError

                    kept = final.with_name(f"{final.name}.{os.getpid()}")
                    os.replace(tmp, kept)
                    raise OutputExistsError(f"{final} appeared while this command ran (written by another process); "
                                            f"this result is kept as {kept} instead")
                with tracked(old), deferred():  # a signal waits until the swap is done
                    _remove(old)
                    os.replace(final, old)
                    try:
                        os.replace(tmp, final)
                    except BaseException:
                        os.replace(old, final)  # the user's earlier output goes back in place
                        raise
                    _remove(old)
            else:
                os.replace(tmp, final)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_CLAIMS: dict[str, Any] = {}  # outputs this process is writing: resolved path -> open, locked file


def claim_output(path: str | Path, flag: str = "--out") -> None:
    """Make this process the only calibrant process writing ``path`` until :func:`release_output` (or exit).

    A second command given the same output is refused at once, naming the process that holds it, rather
    than both working for hours and one result replacing the other. The lock lives in the cache
    (``locks/``, keyed by the resolved path), so nothing is added beside the output. POSIX only.
    """
    key = str(Path(path).absolute().resolve())
    if key in _CLAIMS:
        return
    from calibrant.errors import OutputExistsError

    try:
        f, holder = try_lock(cache_dir("locks") / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.lock")
    except (OSError, ImportError):  # an unwritable cache or no fcntl (Windows): the final rename still refuses
        return
    if f is None:
        raise OutputExistsError(f"{flag} {path} is being written by {holder or 'another calibrant process'}; wait "
                                f"for it to finish or choose another {flag}")
    _CLAIMS[key] = f


def try_lock(path: Path, note: str = "") -> tuple[Any, str]:
    """Take an exclusive, non-blocking lock on ``path`` (POSIX ``flock``), held while the returned file
    stays open; the file then says who holds it (``pid … on host`` + ``note``). Returns (file, "") or,
    when another process holds it, (None, what that process wrote)."""
    import fcntl

    f = open(path, "a+")  # noqa: SIM115 - held for the lock's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        return None, holder
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}{note}")
    f.flush()
    return f, ""


def release_output(path: str | Path) -> None:
    f = _CLAIMS.pop(str(Path(path).absolute().resolve()), None)
    if f is not None:
        f.close()  # closing the file drops the lock


def check_space(path: str | Path, needed: int, flag: str, fix: str | None = None) -> None:
    """Refuse, before the long work, an output whose disk has less than ``needed`` bytes (+5 %) free.

    The old output an ``--overwrite`` replaces stays until the new one is complete, so it frees nothing. What a
    killed run of this same output left (a dead owner's temporary) is removed first: it would be anyway, and
    it may be what fills the disk.
    """
    path = Path(path).absolute()
    if path.parent.is_dir():
        _sweep_siblings(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < needed * 1.05:
        from calibrant.errors import CalibrantError

        raise CalibrantError(f"not enough disk space for {flag} {path}: it needs about {human_bytes(needed)} and "
                             f"{parent} has {human_bytes(free)} free; {fix or f'free some space or choose another {flag}'}")


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Serialise a critical section (e.g. acquiring an asset) between processes; POSIX only, else a no-op."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the given loggers to ``level`` for the duration (libraries that log what calibrant reports)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars (loading weights, converting a GGUF) on or off for the duration:
    ``quiet`` commands print nothing of their own, and neither do the libraries they call."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
