"""Atomic writes: a file or folder is written under a temporary name and renamed into place when complete, so a
reader (or a run killed half-way) sees the old version or the new one, never half of one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


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


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves a finished tmp folder to its final name; an older folder there is removed only afterwards."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_dir(folder: str | Path, write: Callable[[Path], object]) -> Path:
    """write(tmp) fills an empty `<folder>.tmp/`, which then replaces folder (see replace_dir)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    replace_dir(tmp, folder)
    return folder
