"""Atomic writes: a file or folder is written under a temporary name and renamed into place when complete, so a
reader (or a run killed half-way) sees the old version or the new one, never half of one.

write_folder is the one folder writer: checkpoints, the image cache, generated datasets and the feature store use
it. Its temporaries are siblings of the folder, `<name>.tmp-<pid>-<n>` (the writer fills it) and `<name>.old-<pid>-<n>`
(the version it replaces, set aside for the moment of the swap); a killed writer leaves them, and the next writer of
that folder removes those whose process is gone.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

# `<folder>.tmp-<pid>-<n>` / `.old-<pid>-<n>`; also the pid-less `<folder>.tmp` / `.old` of earlier versions.
_LEFTOVER = re.compile(r"(?P<base>.+)\.(?:tmp|old)(?:-(?P<pid>\d+)(?:-\w+)?)?")
_serial = itertools.count()   # with the pid, names this process's temporaries apart (threads writing one folder)


class UnwritableFolder(OSError):
    """The folder's parent, lock file or temporary folder could not be created: nothing was written. Callers turn
    it into a UserError naming the setting that chose the place."""


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """write(tmp) fills a temporary sibling of path, which then replaces path. The temporary name keeps path's
    suffix (PIL and safetensors read the format from it) and the process id (two writers never share it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_folder(folder: str | Path, write: Callable[[Path], object], *,
                 is_complete: Callable[[Path], bool] | None = None, lock: bool = False) -> Path:
    """Returns folder after write(tmp) filled an empty temporary sibling that then replaced it. A folder already
    there (an older version, or a half copy) is set aside and removed only after the rename; if write raises or
    the process is killed, folder is left as it was (but for a kill in the instant between the two renames, which
    leaves the old version as `<name>.old-<pid>-<n>`).

    is_complete: the folder is written once. If is_complete(folder) it is returned untouched (checked without the
    lock: a folder only becomes complete by a rename, and a finished one in a read-only place still serves); if
    another writer completes it while write runs, theirs is kept and ours dropped.
    lock: the check and the write happen under an flock on `.<name>.lock` beside folder, so of two processes (or
    threads) only one writes and the other waits, then finds it complete. Every writer of such a folder must
    pass lock=True: its holder removes all of the folder's leftovers, taking them for a killed writer's.
    Raises UnwritableFolder when the parent, lock file or temporary folder cannot be created.
    """
    folder = Path(folder)
    if is_complete is not None and is_complete(folder):
        return folder
    _make_parent(folder)
    with _locked(folder) if lock else nullcontext():
        if lock and is_complete is not None and is_complete(folder):   # another writer finished it while we waited
            return folder
        with temporary_folder(folder, all_leftovers=lock) as tmp:
            write(tmp)
            if not lock and is_complete is not None and is_complete(folder):
                return folder                                            # another writer finished first: keep theirs
            _move_into_place(tmp, folder)
    return folder


@contextmanager
def temporary_folder(folder: str | Path, *, all_leftovers: bool = False) -> Iterator[Path]:
    """An empty new `<name>.tmp-<pid>-<n>` beside folder (its parent created), removed on exit unless renamed
    away. Leftovers of folder whose process is gone are removed first (all_leftovers: every one, for a caller
    holding folder's lock)."""
    folder = Path(folder)
    _make_parent(folder)
    remove_leftovers(folder, all_leftovers=all_leftovers)
    while True:
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{next(_serial)}")
        try:
            tmp.mkdir()
            break
        except FileExistsError:   # a dead process's with our pid and number
            continue
        except OSError as err:
            raise UnwritableFolder(err.errno, err.strerror, str(tmp)) from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def leftover_of(name: str) -> tuple[str, int | None] | None:
    """(folder name, writer's pid) when name is a write_folder temporary (pid None for an earlier version's
    `<folder>.tmp` / `.old`), else None."""
    match = _LEFTOVER.fullmatch(name)
    return (match["base"], int(match["pid"]) if match["pid"] else None) if match else None


def process_gone(pid: int | None) -> bool:
    """Whether no process has this id (None: a pid-less leftover, whose writer is long gone)."""
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def remove_leftovers(folder: str | Path, *, all_leftovers: bool = False) -> None:
    """Removes folder's temporaries left by writers whose process is gone (all_leftovers: every one)."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return
    for path in folder.parent.iterdir():
        owner = leftover_of(path.name)
        if owner and owner[0] == folder.name and (all_leftovers or process_gone(owner[1])):
            shutil.rmtree(path, ignore_errors=True)


def _make_parent(folder: Path) -> None:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnwritableFolder(err.errno, err.strerror, str(folder.parent)) from None


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """flock on `.<name>.lock` beside folder (per folder: a small set is never held up by a big one being written).
    It is held per open file, so it also keeps apart two threads of one process."""
    try:
        handle = open(folder.with_name(f".{folder.name}.lock"), "a")
    except OSError as err:
        raise UnwritableFolder(err.errno, err.strerror, err.filename) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Renames tmp to folder. A folder already there is renamed aside first (a rename cannot replace a non-empty
    folder) and removed after; if another writer put its copy in between, that one is kept."""
    try:
        os.rename(tmp, folder)   # nothing there (or an empty folder)
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = folder.with_name(folder.name + ".old" + tmp.name[len(folder.name) + len(".tmp"):])
    try:
        os.rename(folder, old)
    except FileNotFoundError:   # another writer just set it aside
        old = None
    try:
        os.rename(tmp, folder)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            if old is not None and not folder.exists():
                os.rename(old, folder)   # put the old version back
            raise
        # another writer's copy landed in between: keep it (temporary_folder removes ours)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
