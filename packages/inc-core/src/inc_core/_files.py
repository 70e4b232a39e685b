"""Atomic file writes: an error never leaves a partial output behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from inc_core.errors import IncError, SaveError

__all__ = ["atomic_path", "atomic_write", "atomic_write_text", "check_output_path"]


def check_output_path(path: str | os.PathLike[str], *, what: str = "output") -> Path:
    """Validate that ``path``'s directory exists and is writable before any work is done."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise SaveError(
            f"Cannot write the {what} to {str(target)!r}: directory {str(parent)!r} does not exist. "
            "Create it first or choose another path."
        )
    if target.is_dir():
        raise SaveError(
            f"Cannot write the {what} to {str(target)!r}: a directory of that name exists, and inc never deletes a "
            "directory. Remove it first, or choose another path."
        )
    if not os.access(parent, os.W_OK):
        raise SaveError(f"Cannot write the {what} to {str(target)!r}: directory {str(parent)!r} is not writable.")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error remove it.

    Works for files and for directories (a SavedModel): whatever the body creates at the
    temporary path is moved into place in one rename.
    """
    target = check_output_path(path, what=what)
    _remove_stale_staging(target)
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(target)}{os.getpid()}.", dir=target.parent))
    except OSError as exc:
        raise _failed(what, target, exc) from exc
    tmp = tmp_dir / target.name
    try:
        yield tmp
        if not tmp.exists():
            raise SaveError(f"Writing the {what} produced no file at {str(target)!r}.")
        if target.is_dir() and tmp.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except IncError:
        raise
    except Exception as exc:  # a full disk, or a framework's writer failing: the user's path is left as it was
        raise _failed(what, target, exc) from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.inc-"


def _remove_stale_staging(target: Path) -> None:
    """Remove what a killed writer left beside ``target``: staging directories whose process is gone.

    A process killed mid-write (kill -9) cannot clean up; its staging directory carries its pid, so
    the next write to the same path removes it. Directories of live processes are left alone.
    """
    prefix = _staging_prefix(target)
    for entry in target.parent.glob(f"{prefix}*"):
        pid = entry.name[len(prefix) :].split(".", 1)[0]
        if entry.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _failed(what: str, target: Path, exc: BaseException) -> SaveError:
    return SaveError(
        f"Writing the {what} to {str(target)!r} failed ({type(exc).__name__}: {exc}); nothing was written there. "
        "Check the free space and permissions of the directory, or choose another path."
    )


def atomic_write_text(path: str | os.PathLike[str], text: str, *, what: str = "output") -> None:
    with atomic_path(path, what=what) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, what: str = "output") -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path, what=what) as tmp:
        write(tmp)
