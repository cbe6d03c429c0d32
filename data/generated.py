"""Generated datasets (the embedded world, fashion): one folder per parameter set, written once, atomically.

write_once is common.files.write_folder with is_complete and lock=True: a temporary sibling folder is filled and
renamed into place under the folder's lock, so two processes never both generate a set and none ever reads a
half-written one.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from common.files import UnwritableFolder, leftover_of, process_gone, write_folder
from configs.errors import UserError


def write_once(folder: Path, is_complete: Callable[[Path], bool], write: Callable[[Path], None]) -> Path:
    """Returns folder, first filling it unless is_complete(folder) (see write_folder). Shared with
    data/fashion.py."""
    def write_after_sweep(tmp: Path) -> None:
        _remove_dead_generations(folder)
        write(tmp)

    try:
        return write_folder(folder, write_after_sweep, is_complete=is_complete, lock=True)
    except UnwritableFolder as err:
        raise UserError(f"cannot write in the dataset folder {folder.parent} ({err.strerror}); "
                        f"set data.root to a writable folder") from None


def _remove_dead_generations(folder: Path) -> None:
    """Temporaries of the same kind's other parameter sets whose process is gone: a killed 20,000-image
    generation leaves hundreds of MB that no other call would clear (write_folder clears folder's own)."""
    kind = folder.name.split("-", 1)[0]
    for path in folder.parent.iterdir():
        owner = leftover_of(path.name)
        if owner and owner[1] is not None and owner[0].split("-", 1)[0] == kind and process_gone(owner[1]):
            shutil.rmtree(path, ignore_errors=True)
