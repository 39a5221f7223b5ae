"""The write stage: every file vitport creates goes through here, all or nothing.

Guarantees, each enforced in this module only:

- **Atomic.** Output is built in a temporary sibling of the target (``.NAME.vitport-tmp-PID-XXXX``)
  and moved into place with ``rename`` once complete. Any exception (``KeyboardInterrupt`` and the
  ``Interrupted`` raised for SIGTERM/SIGHUP included) deletes the temporary and leaves the target as
  it was; the swap of an existing target runs with those signals blocked, and is rolled back if one
  arrived meanwhile.
- **Crash leftovers.** The temporary name carries the writer's pid, so the temporaries of a run
  killed outright (SIGKILL, power loss) are recognised and deleted by the next write into the same
  folder, once that pid is no longer running.
- **Overwriting.** ``force`` replaces only what vitport itself writes: a converted folder (its
  ``config.json`` carries the vitport format marker, nothing else is in it) or a regular weights
  file; never a device node, a symlink, a folder holding other files, or the source being read.
- **Permissions.** Output gets the usual permissions (0o777 / 0o666 less the umask), not the 0o700
  of ``tempfile.mkdtemp``.
- **Disk errors.** A full disk, a quota, a read-only folder: one ``OutputWriteError`` naming the
  target and the reason, and nothing left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from .errors import InvalidArgumentError, MissingFileError, OutputExistsError, OutputWriteError
from .validate import expand_user

FORMAT = "vitport"  # the marker in a converted folder's config.json
CONVERTED_FILES = frozenset({"config.json", "model.safetensors"})
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.vitport-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_SIGNALS = tuple(getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s))


# ----------------------------------------------------------------------------- signals


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; raised like Ctrl-C so every cleanup path runs."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


_received: list[int] = []  # signals seen since signals_raise() was entered


def received_signal() -> int | None:
    """The first signal seen under ``signals_raise`` (even if a library swallowed its exception)."""
    return _received[0] if _received else None


def _raise(signum, frame):
    _received.append(signum)
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """For a command-line run: SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` and are remembered.

    Remembering matters: some libraries wrap their imports in a bare ``except:``, which would
    swallow a Ctrl-C in the first second; a remembered signal still stops the commit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    old = {s: signal.signal(s, _raise) for s in _SIGNALS}
    old_hook = sys.unraisablehook

    def hook(unraisable):  # raised where Python can only print it (a gc callback): remembered, not printed
        if not isinstance(unraisable.exc_value, Interrupted):
            old_hook(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = old_hook
        for s, handler in old.items():
            signal.signal(s, handler)


def _check_not_interrupted() -> None:
    if _received:
        raise Interrupted(_received[0])


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP during a multi-step rename; they are delivered on exit."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ------------------------------------------------------------------------ what --force may replace


def is_converted_folder(path: Path) -> bool:
    """A folder vitport wrote: a vitport ``config.json`` and nothing but vitport's files."""
    try:
        names = set(os.listdir(path))
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    from .sharded import SAFETENSORS_INDEX, SHARD_NAME  # large folders are written in shards

    names = {n for n in names if not SHARD_NAME.match(n)} - {SAFETENSORS_INDEX}
    return names <= CONVERTED_FILES and isinstance(cfg, dict) and cfg.get("format") == FORMAT


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(path: str | os.PathLike, force: bool = False, *, kind: str = "dir",
                 reading: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output path vitport may not write; return it.

    ``kind`` is ``"dir"`` (a converted folder) or ``"file"`` (a weights file). ``reading`` lists
    the paths being read: the output may neither be one of them nor contain one.
    """
    path = expand_user(path)
    real = Path(os.path.realpath(path))
    for src in reading:
        src_real = Path(os.path.realpath(src))
        if _is_within(src_real, real):
            raise InvalidArgumentError(f"--out {path} is (or holds) the source being read ({src}); "
                                       "choose another output path")
    parent = path.parent
    if not parent.is_dir():
        raise MissingFileError(f"the folder {parent} does not exist (create it first, or choose another --out)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not force:
        raise OutputExistsError(f"{path} already exists; refusing to overwrite it "
                                "(pass --force / force=True to replace it)")
    if stat.S_ISLNK(st.st_mode):
        raise OutputExistsError(f"{path} is a symbolic link; --force does not replace links. "
                                "Remove it yourself or choose another --out")
    if kind == "dir":
        if stat.S_ISDIR(st.st_mode) and (not os.listdir(path) or is_converted_folder(path)):
            return path
        what = "a folder that holds files vitport did not write" if stat.S_ISDIR(st.st_mode) else _what(st)
        raise OutputExistsError(f"{path} is {what}; --force only replaces a folder written by "
                                "`vitport convert`. Remove it yourself or choose another --out")
    if stat.S_ISREG(st.st_mode):
        return path
    raise OutputExistsError(f"{path} is {_what(st)}; --force only replaces a regular file. "
                            "Remove it yourself or choose another --out")


def _what(st: os.stat_result) -> str:
    mode = st.st_mode
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISREG, "a file")):
        if test(mode):
            return name
    return "not a regular file"


# ---------------------------------------------------------------------------- leftovers


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed vitport runs left in ``folder``; returns what went.

    A run killed between moving an old output aside and moving the new one in leaves the old
    output under ``.NAME.vitport-old-PID-XXXX``: it is put back when ``NAME`` is free.
    """
    folder = Path(folder)
    cleaned = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return cleaned
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if not m or _pid_alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        original = folder / m["name"]
        if m["kind"] == "old" and not os.path.lexists(original):
            with contextlib.suppress(OSError):
                os.rename(path, original)
                continue
        _remove(path)
        cleaned.append(path)
    return cleaned


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.vitport-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


# ------------------------------------------------------------------------------- staging


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(target: Path, err: BaseException) -> OutputWriteError:
    """The one error for a failed write of ``target`` (or of a temporary file next to it)."""
    code = getattr(err, "errno", None)
    if code is None and "No space left" in str(err):
        code = errno.ENOSPC
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EFBIG: "the file size limit was reached", errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(
        code, getattr(err, "strerror", None) or str(err).splitlines()[0] if str(err) else type(err).__name__)
    fix = (f"free space in {target.parent}" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
           else f"check that {target.parent} is a folder you can write to")
    return OutputWriteError(f"could not write {target}: {reason} ({type(err).__name__}: {err}). Nothing was "
                            f"written there and no temporary file was left; {fix} or choose another --out, "
                            "then run again.")


def _is_write_failure(err: BaseException) -> bool:
    from .errors import VitportError

    if isinstance(err, VitportError):
        return False
    if isinstance(err, OSError):
        return True
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(err, SafetensorError)


def _commit(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` onto ``target`` (checked by ``check_output``).

    The renames run with signals held; one that arrived meanwhile undoes them (the old target
    comes back) before it is raised, so an interrupted run never ends with a changed target.
    """
    _check_not_interrupted()
    existed = os.path.lexists(target)
    aside = _sibling(target, "old") if existed else None
    done = False
    try:
        with _signals_blocked():
            if aside is not None:
                if tmp.is_file():  # keep the old file reachable until the new one is in
                    try:
                        os.link(target, aside)
                    except OSError:  # no hard links here: the replace stays atomic, without undo
                        aside = None
                else:
                    os.rename(target, aside)
            try:
                os.replace(tmp, target)
            except BaseException:
                if aside is not None and os.path.lexists(target):
                    _remove(aside)  # a hard link: the old file is still in place
                elif aside is not None:
                    os.rename(aside, target)
                raise
            done = True
    except KeyboardInterrupt:  # delivered when the signals were unblocked: roll back
        if done and (aside is not None or not existed):
            _remove(target)
            if aside is not None:
                os.replace(aside, target)
        raise
    if aside is not None:
        _remove(aside)


def _set_modes(tmp: Path, mask: int) -> None:
    if tmp.is_dir():
        os.chmod(tmp, 0o777 & ~mask)
        for p in tmp.rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(tmp, 0o666 & ~mask)


@contextlib.contextmanager
def _staged(target: Path, force: bool, kind: str, reading: Iterable) -> Iterator[Path]:
    target = check_output(target, force, kind=kind, reading=reading)
    clean_leftovers(target.parent)
    tmp = _sibling(target, "tmp")
    mask = _umask()
    try:
        if kind == "dir":
            tmp.mkdir(mode=0o700)
            os.chmod(tmp, 0o777 & ~mask)
        else:
            tmp.touch(mode=0o600)
            os.chmod(tmp, 0o666 & ~mask)
    except OSError as e:
        _remove(tmp)
        raise write_error(target, e) from None
    try:
        yield tmp
        _set_modes(tmp, mask)  # writers such as safetensors create their files 0o600
        check_output(target, force, kind=kind, reading=reading)  # nothing appeared meanwhile
        _commit(tmp, target)
    except BaseException as e:  # KeyboardInterrupt and Interrupted too: never leave a partial output
        _remove(tmp)
        if _is_write_failure(e):
            raise write_error(target, e) from None
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, force: bool = False, *,
               reading: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; on success it becomes ``target``."""
    with _staged(expand_user(target), force, "dir", reading) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, force: bool = False, *,
                reading: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; on success it replaces ``target``."""
    with _staged(expand_user(target), force, "file", reading) as tmp:
        yield tmp


# ------------------------------------------------------------------------------- formats


def _contiguous(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    # np.require, not np.ascontiguousarray, which turns a 0-d array (num_batches_tracked) into shape (1,)
    return {k: np.require(np.asarray(v), requirements="C") for k, v in tensors.items()}


def write_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write numpy-convertible arrays (bfloat16 included) to a safetensors file (not atomic:
    call it inside ``atomic_dir`` / ``atomic_file``)."""
    from safetensors.numpy import save_file

    save_file(_contiguous(tensors), str(path), metadata=dict(metadata) if metadata else None)


def write_safetensors_atomic(tensors: Mapping[str, Any], path: str | os.PathLike, *, force: bool = False,
                             metadata: Mapping[str, str] | None = None,
                             reading: Iterable[str | os.PathLike] = ()) -> Path:
    """``write_safetensors`` through ``atomic_file``: all or nothing."""
    with atomic_file(path, force, reading=reading) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return Path(path)


def write_json(data: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
