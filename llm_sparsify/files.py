"""Writing outputs so that an interrupted run never leaves something that looks finished."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output directory already holds something and overwriting was not asked for."""


def check_output(path: Path, overwrite: bool) -> None:
    """Fail early, before hours of work, if `path` would be overwritten without permission."""
    if path.exists() and (path.is_file() or any(path.iterdir())) and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another output or pass --overwrite")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; rename it to `path` only when the block succeeds."""
    path = Path(path)
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; outputs are ordinary directories
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)


def replace_directory(finished: Path, path: Path) -> None:
    """Rename the complete directory `finished` to `path`; an old `path` is moved aside first and removed
    last, so a crash at any point leaves either the old or the new output, never a mix."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        _remove(old)
        path.rename(old)
        finished.rename(path)
        _remove(old)
    else:
        finished.rename(path)


@contextmanager
def atomic_file(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it to `path` only when the block succeeds."""
    path = Path(path)
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes it private; outputs are ordinary files
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def disk_size(path: str | Path) -> int:
    """Bytes of a file, or of all files under a directory (symbolic links followed, as a loader reads them)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
