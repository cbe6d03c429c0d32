"""Generated datasets (the embedded world, fashion): one folder per parameter set, written once, atomically.

write_once fills a temporary sibling folder and renames it into place under the folder's lock, so two processes
never both generate a set and none ever reads a half-written one.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from configs.errors import UserError

_LEFTOVER = re.compile(r"(?P<base>.+)\.(tmp|old)-(?P<pid>\d+)")   # what write_once leaves when killed


@contextmanager
def _locked(folder: Path):
    """One writer per dataset folder (pytest -n 2 workers, two runs); the other waits, then finds it done.

    Per folder, not per root: a tiny world is never held up by a 20,000-image one being drawn.
    """
    try:
        handle = open(folder.with_name(f".{folder.name}.lock"), "w")
    except OSError as err:
        raise UserError(f"cannot write in the dataset folder {folder.parent} ({err.strerror}); "
                        f"set data.root to a writable folder") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def _remove_leftovers(folder: Path) -> None:
    """Temp and set-aside copies left by killed runs: all of this folder's (the caller holds its lock, so nobody
    owns them), and those of the same kind's other parameter sets whose process is gone (a killed 20,000-image
    generation leaves hundreds of MB that no other call would clear)."""
    kind = folder.name.split("-", 1)[0]
    for path in folder.parent.iterdir():
        match = _LEFTOVER.fullmatch(path.name)
        if not match or match["base"].split("-", 1)[0] != kind:
            continue
        if match["base"] == folder.name or _pid_gone(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Renames tmp to folder; an incomplete folder already there (a half copy) is moved aside first, as a
    rename cannot replace a non-empty folder."""
    if folder.exists():
        old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def write_once(folder: Path, is_complete: Callable[[Path], bool], write: Callable[[Path], None]) -> Path:
    """Returns folder, first filling it unless is_complete(folder): write(tmp) fills an empty temporary sibling,
    which is renamed into place when done, all under the folder's lock, so two processes never both generate it
    and none ever reads a half-written set. Shared with data/fashion.py."""
    if is_complete(folder):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the dataset folder {folder.parent} ({err.strerror}); "
                        f"set data.root to a writable folder") from None
    with _locked(folder):
        if is_complete(folder):       # another process finished it while we waited
            return folder
        _remove_leftovers(folder)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        try:
            tmp.mkdir()
            write(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _move_into_place(tmp, folder)
    return folder
