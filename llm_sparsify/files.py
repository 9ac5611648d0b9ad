"""Writing outputs so that an interrupted run never leaves something that looks finished, and replacing only
what llm_sparsify wrote.

An existing output is replaced (with --overwrite) only if it is one of ours: a directory with the record
llm_sparsify.json (a finished prune, or an export of one) or the marker file `.llm_sparsify` (an export of a
checkpoint that has no record), a partial output `.NAME.partial` with its progress.json, an empty directory,
or a GGUF file whose metadata holds the key `llm_sparsify.version`. An output is never the input, inside it or
around it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llm_sparsify.errors import UserError

RECORD = "llm_sparsify.json"  # what a run did; marks a finished output (written by export/hf.py and stream.py)
PROGRESS = "progress.json"  # the finished layers of a partial output (stream.py)
MARKER = ".llm_sparsify"  # marks a directory output without a record, e.g. an export of a dense checkpoint
GGUF_KEY = "llm_sparsify.version"  # metadata key of the GGUF files that export/gguf.py writes


class OutputExistsError(UserError, FileExistsError):
    """The output already holds something, and overwriting was not asked for or may not replace it."""


class OutputOverlapError(OutputExistsError):
    """The output would be the input, lie inside it or contain it."""


def written_by_us(path: Path) -> bool:
    """Whether llm_sparsify wrote `path` (see the module docstring), so that --overwrite may replace it."""
    if path.is_dir():
        partial = path.name.startswith(".") and path.name.endswith(".partial") and (path / PROGRESS).is_file()
        return partial or (path / RECORD).is_file() or (path / MARKER).is_file() or not any(path.iterdir())
    try:
        with path.open("rb") as file:
            if file.read(4) != b"GGUF":
                return False
        from gguf import GGUFReader

        return GGUF_KEY in GGUFReader(path).fields
    except Exception:  # unreadable, truncated, not a GGUF file: not ours
        return False


def check_apart(output: Path, source: Path) -> None:
    """Refuse an output that is the input `source`, lies inside it or contains it: writing it would change the input."""
    out, src = Path(output).resolve(), Path(source).resolve()
    where = "is" if out == src else "lies inside" if src in out.parents else "contains" if out in src.parents else ""
    if where:
        raise OutputOverlapError(f"the output {output} {where} the input {source}; choose an output outside it")


def check_output(path: Path, overwrite: bool, source: Path | None = None) -> None:
    """Fail early, before hours of work, if writing `path` would touch the input `source`, replace something
    without permission, or replace something llm_sparsify did not write."""
    path = Path(path)
    if source is not None:
        check_apart(path, source)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another output or pass --overwrite")
    if not written_by_us(path):
        what = (f"is not an llm-sparsify output (it has no {RECORD})" if path.is_dir()
                else "is a file that llm-sparsify did not write")
        raise OutputExistsError(f"{path} {what}; --overwrite only replaces what llm-sparsify wrote: remove it "
                                "yourself or choose another output")


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
        if not (tmp / RECORD).exists():
            (tmp / MARKER).write_text("written by llm-sparsify: its --overwrite may replace this directory\n")
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(finished: Path, path: Path) -> None:
    """Rename the complete directory `finished` to `path`; an old `path` is moved aside first and removed
    last, so a crash at any point leaves either the old or the new output, never a mix."""
    if not path.exists():
        finished.rename(path)
        return
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not written_by_us(old):
        raise OutputExistsError(f"{old} is in the way and llm-sparsify did not write it; remove it yourself")
    _remove(old)  # the old output of a replacement that crashed before removing it
    path.rename(old)
    try:
        finished.rename(path)
    except BaseException:
        old.rename(path)
        raise
    _remove(old)


@contextmanager
def atomic_file(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it to `path` only when the block succeeds.

    `overwrite` lets it replace an existing file, any file: a caller that takes a user's --overwrite asks
    check_output first, which refuses what llm_sparsify did not write. A directory is never replaced by a file."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory; choose a file name for the output")
    if not overwrite:
        check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes it private; outputs are ordinary files
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def disk_size(path: str | Path) -> int:
    """Bytes of a file, or of all files under a directory (symbolic links followed, as a loader reads them)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def check_writable(path: str | Path) -> None:
    """Fail before any work when `path` could not be written: its nearest existing folder is read-only (an OSError
    with EROFS) or not writable by this user (EACCES)."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
        code = errno.EROFS if read_only else errno.EACCES
        raise OSError(code, os.strerror(code), str(folder))
