"""Every file marlwatch writes, except the live recording, goes through `atomic_output`.

An output path is whatever the user typed, and it may be the recording being read (`export X -o X`),
a symlink to `/proc/self/fd/1` (a pipe into `head`), `/dev/null` or a FIFO. So:

- a regular file, or a path that does not exist yet, is written to a temporary file beside it and
  renamed into place once the writing succeeded: a failure or a Ctrl-C leaves what was there before,
  never half a file;
- a symlink is followed: the file it points to is replaced, the link itself stays;
- anything else that exists (a character device, a FIFO, a socket) is written straight through:
  nothing to rename, nothing to remove;
- `-` is standard output;
- the only path ever removed or renamed is the temporary file this module created;
- an output that is one of the command's inputs (the same file, through any name) is refused
  before anything is written.

The live recording is appended to while the run goes on, so it cannot be renamed into place at
the end: `new_file` makes it appear with its first bytes (the schema) already in it, never empty,
and never on a name that is taken (unless overwriting was asked for). `numbered` gives the
candidate names (`x.arrow`, `x-2.arrow`, ...) for a name that must be new.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO

__all__ = ["OutputError", "OutputExists", "atomic_output", "check_not_input", "new_file", "numbered", "write_text"]

STDOUT = "-"


class OutputError(Exception):
    """An output that cannot be written (before anything was written); one line for the user."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = path, reason


def check_not_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Raise OutputError when `path` is the same file as one of `inputs` (through any link)."""
    for inp in inputs:
        try:
            same = os.path.samefile(path, inp)
        except OSError:  # one of them does not exist: they cannot be the same file
            continue
        if same:
            raise OutputError(path, f"it is the input {inp}; choose another output")


@contextmanager
def atomic_output(path: str | os.PathLike, *, binary: bool = False, inputs: Iterable[str | os.PathLike] = (),
                  encoding: str = "utf-8", newline: str | None = None) -> Iterator[IO]:
    """Open `path` for writing under the rules above; yields a file object.

    Raises OutputError when the output cannot be opened (a directory, a missing folder, no
    permission, one of `inputs`); an OSError raised while writing propagates after the temporary
    file is removed, and the target is left as it was."""
    kw = {} if binary else {"encoding": encoding, "newline": newline}
    if os.fspath(path) == STDOUT:
        stream = sys.stdout.buffer if binary else sys.stdout
        yield stream
        stream.flush()
        return
    target = Path(path)
    check_not_input(target, inputs)
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None  # new, or a dangling symlink: created where the link points
    except OSError as e:
        raise OutputError(target, e.strerror or str(e)) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(target, "is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        # A device, FIFO or socket: there is no file to replace, and it must never be removed.
        try:
            f = open(target, "wb" if binary else "w", **kw)  # noqa: SIM115 - closed by `with` below
        except OSError as e:
            raise OutputError(target, e.strerror or str(e)) from None
        with f:
            yield f
        return
    final = Path(os.path.realpath(target))  # through a symlink: the link stays, its file is replaced
    fd, tmp = _create_temp(target, final)
    try:
        if st is not None:  # keep the replaced file's permissions, as `>` would
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
        f = os.fdopen(fd, "wb" if binary else "w", **kw)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        yield f
        if not f.closed:  # a writer (pyarrow's CSV writer) may have closed it already
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data does
            f.close()
        os.replace(tmp, final)
    except BaseException:
        try:
            f.close()
        except OSError:
            pass
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _create_temp(target: Path, final: Path) -> tuple[int, str]:
    """A new file of ours beside `final` (same filesystem, so the rename is atomic), mode 0666 & ~umask."""
    for _ in range(100):
        tmp = final.parent / f".{final.name[:100]}.{os.urandom(4).hex()}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), str(tmp)
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(target, e.strerror or str(e)) from None
    raise OutputError(target, f"no free temporary name in {final.parent}")


class OutputExists(OutputError):
    """`new_file`'s path holds a file already, and overwriting it was not asked for."""


def new_file(path: str | os.PathLike, head: Callable[[BinaryIO], None], *, unique: bool = False,
             overwrite: bool = False) -> tuple[BinaryIO, Path]:
    """Create a file that stays open for appending (the live recording), never visible empty.

    `head(f)` writes its first bytes to a temporary file beside `path`, which then appears at
    `path` in one step: exclusively (a hard link, which fails when the name is taken; the first
    free one of `numbered(path)` with `unique`), or replacing the file `path` names with
    `overwrite`. An existing device or FIFO is written straight through. Returns the open file
    and the path it got. Raises OutputExists, OutputError, or what `head` raises."""
    target = Path(path)
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(target, e.strerror or str(e)) from None
    if st is not None and stat.S_ISDIR(st.st_mode) and not unique:
        raise OutputError(target, "is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode) and not unique:
        try:
            f = open(target, "wb")  # noqa: SIM115 - the caller's
        except OSError as e:
            raise OutputError(target, e.strerror or str(e)) from None
        _call(head, f)
        return f, target
    if st is not None and not unique and not overwrite:
        raise OutputExists(target, "exists already")
    final = Path(os.path.realpath(target)) if overwrite else target
    fd, tmp = _create_temp(target, final)
    f = os.fdopen(fd, "wb")
    try:
        head(f)
        if overwrite and not unique:
            os.replace(tmp, final)
            return f, target
        for candidate in numbered(target) if unique else (target,):
            try:
                os.link(tmp, candidate)  # atomic, and never onto an existing name
            except FileExistsError:
                continue
            except OSError as e:
                raise OutputError(candidate, e.strerror or str(e)) from None
            return f, candidate
        raise OutputExists(target, "exists already")  # taken since the check above
    except BaseException:
        f.close()
        raise
    finally:
        try:
            os.unlink(tmp)  # ours; gone already after a replace
        except OSError:
            pass


def _call(head: Callable[[BinaryIO], None], f: BinaryIO) -> None:
    try:
        head(f)
    except BaseException:
        f.close()
        raise


def write_text(path: str | os.PathLike, text: str, *, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Write `text` to `path` with `atomic_output`."""
    with atomic_output(path, inputs=inputs) as f:
        f.write(text)


def numbered(path: str | os.PathLike) -> Iterator[Path]:
    """`path`, then `stem-2.suffix`, `stem-3.suffix`, ...: candidates for a name that must be new."""
    p = Path(path)
    yield p
    n = 2
    while True:
        yield p.with_name(f"{p.stem}-{n}{p.suffix}")
        n += 1
