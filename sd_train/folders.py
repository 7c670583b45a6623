"""Replacing a whole output folder (an export, a post-hoc snapshot, a prepared data set) so that a
complete one is there at every instant, and the words a refusal uses for what a folder holds.

`replace_folder(new, final)` swaps a finished folder in. Where the file system can exchange two
paths in one step (Linux `renameat2(RENAME_EXCHANGE)`: ext4, xfs, btrfs, tmpfs), `final` holds the
old complete folder up to the exchange and the new one from then on; the old one is deleted only
after. Elsewhere (NFS, macOS) the old folder is first renamed aside to `.<name>.old`, the new one
renamed in, and the old one deleted: for the instant between the two renames the complete old
folder is at the aside name, and the next replacement of the same folder puts it back if a crash
left it there. Nothing but the folder being replaced and our own aside name is ever deleted.

Torch-free: the startup checks and the data tools use it too.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _libc_renameat2():
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:  # no C library to load (not Linux)
        return None


_RENAMEAT2 = _libc_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one step; False where the system or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def aside_name(final: Path) -> Path:
    """Where the fallback path keeps the old folder between its two renames."""
    return final.with_name(f".{final.name}.old")


def replace_folder(new: Path, final: Path) -> None:
    """Put the complete folder `new` at `final` (same parent file system); an existing `final` is
    deleted only once `new` is in its place."""
    new, final = Path(new), Path(final)
    aside = aside_name(final)
    if aside.exists():
        if final.exists():
            shutil.rmtree(aside)  # a deletion that a crash interrupted: the new folder is in place
        else:
            os.rename(aside, final)  # a crash between the two renames: the old complete folder back
    if not final.exists():
        os.rename(new, final)
        return
    if exchange(new, final):
        shutil.rmtree(new)  # `new` now names the old folder
        return
    os.rename(final, aside)
    os.rename(new, final)
    shutil.rmtree(aside)


def write_then_replace(
    final: Path,
    write: Callable[[Path], None],
    ours: Callable[[str], bool],
    check: Callable[[Path], None] = lambda folder: None,
) -> None:
    """Write a whole new `final` with `write(staging)` into a staging folder beside it, then
    `replace_folder`. Entries of the old `final` whose name is not `ours` (and that the new one
    lacks) are copied over first, so replacing a folder never loses what another tool put there.
    `check(final)` runs again right before the swap; a failure anywhere removes the staging folder
    and leaves `final` as it was."""
    final = Path(final).resolve()
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # our own name: left by a crashed earlier attempt
    staging.mkdir(parents=True)
    try:
        write(staging)
        check(final)
        if final.is_dir():
            for entry in final.iterdir():
                if ours(entry.name) or (staging / entry.name).exists():
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, staging / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, staging / entry.name, follow_symlinks=False)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, final)


def listing(folder: Path, limit: int = 6) -> str:
    """What `folder` holds, for a refusal: up to `limit` names (folders with a slash), then a count."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(folder).iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_empty_or_missing(folder: Path) -> bool:
    folder = Path(folder)
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def refusal(folder: Path, what: str, fix: str) -> Optional[str]:
    """None when `folder` may be written as `what` (missing or empty), else the message that names
    what is inside and `fix`. A file where a folder should be counts as not ours too."""
    folder = Path(folder)
    if is_empty_or_missing(folder):
        return None
    inside = listing(folder) if folder.is_dir() else "a file"
    return f"{folder} is not {what} (it holds {inside}); refusing to replace it: {fix}"
