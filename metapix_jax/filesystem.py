"""File-system errors as one line naming the path and what to do; the early workdir check.

A read-only workdir, a `--workdir` that is a file or lies under one, a full disk: each
ends the run with one line (cli.run calls `describe`), not a traceback from wherever the
first write happened to be. `check_writable` finds the first three before anything is
compiled. A disk that fills mid-run can only be found when a write fails; every file the
run keeps is written atomically (Orbax's checkpoints, `write_atomically` for the rest), so
the last good checkpoint stays readable and the same command resumes once space is freed.

Errors from TensorStore (Orbax's array writer) are not OSErrors but carry the system's
text ("No space left on device"); `os_errno` finds the errno either way.
"""

import contextlib
import errno
import os
import tempfile

# The system's wording of the errors that matter here, as TensorStore and others quote it.
STRERRORS = {
    errno.ENOSPC: "No space left on device",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EROFS: "Read-only file system",
    errno.EACCES: "Permission denied",
}
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _chain(error: BaseException) -> list[BaseException]:
    """The error and its causes and contexts, each once."""
    seen: list[BaseException] = []
    while error is not None and all(error is not e for e in seen):
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def os_errno(error: BaseException) -> int | None:
    """The errno behind an error: an OSError's in its chain, or one named in a message."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno:
            return e.errno
    for e in _chain(error):
        for number, text in STRERRORS.items():
            if text.lower() in str(e).lower():
                return number
    return None


def is_no_space(error: BaseException) -> bool:
    """Whether a write failed because the disk (or the quota) is full."""
    return os_errno(error) in NO_SPACE


def _path_of(error: BaseException, workdir: str) -> str:
    for e in _chain(error):
        if isinstance(e, OSError) and e.filename:
            return os.fsdecode(e.filename)
    return workdir


def _file_above(path: str) -> str | None:
    """The first part of `path` that exists and is not a directory (why ENOTDIR)."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        candidate = os.sep.join(parts[:i])
        if os.path.lexists(candidate) and not os.path.isdir(candidate):
            return candidate
    return None


def describe(error: BaseException, workdir: str) -> str:
    """One line for a file-system error: the path, the problem and what to do."""
    number = os_errno(error)
    path = _path_of(error, workdir)
    where = "the workdir " + path if os.path.abspath(path) == os.path.abspath(workdir) else path
    if number in NO_SPACE:
        same = os.path.abspath(path) == os.path.abspath(workdir)
        folder = path if same or os.path.isdir(path) else os.path.dirname(path) or workdir
        what = "no space left" if number == errno.ENOSPC else "disk quota exceeded"
        return f"{what} on {folder}; free space and run the same command to resume"
    if number == errno.EROFS:
        return (
            f"cannot write to {where} (read-only file system); choose a --workdir you can write to"
        )
    if number in (errno.EACCES, errno.EPERM):
        return (
            f"cannot write to {where} (permission denied); give write permission or choose "
            "another --workdir"
        )
    if number == errno.ENOTDIR:
        above = _file_above(path)
        if above:
            return (
                f"cannot create {path}: {above} is a file, not a directory; move it or "
                "choose another path"
            )
        return f"{path} is not a directory; move it or choose another path"
    if number == errno.EEXIST and os.path.lexists(path) and not os.path.isdir(path):
        return (
            f"{where} is a file, not a directory; give a --workdir that is a directory or "
            "a new path"
        )
    if number == errno.EISDIR:
        return f"cannot write to {path}: it is a directory, not a file; move it away"
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return f"{first} (under {workdir}); fix the path and run the same command"


def check_writable(directory: str) -> None:
    """Creates `directory` if needed and writes (then removes) a file in it.

    Raises the OSError that the run's first write would meet (read-only file system, no
    permission, a file in the way), before anything is compiled.
    """
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), directory)
    os.makedirs(directory, exist_ok=True)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_check_", dir=directory)
    except OSError as e:  # Name the directory, not the probe's random name.
        raise OSError(e.errno, e.strerror, directory) from e
    try:
        os.write(fd, b"metapix")
    finally:
        os.close(fd)
        os.remove(probe)


def write_atomically(path: str, text: str) -> None:
    """Writes a text file whole or not at all: a kill or a full disk never leaves half of it
    (a temporary file beside it, renamed over it when complete; made by open(), so it has
    the permissions any file of the run has)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
