"""Reading files a user named: regular files only, never more than a stated number of bytes, one-line names.

Every reader of user input (images, foreign checkpoints) goes through `read_regular_file`, so a FIFO called
``x.png`` cannot block, ``/dev/zero`` cannot be read forever, and a file that is too large is refused from its
size before a byte is read. `printable` escapes control characters in a file name, so an error that names a
file such as ``"a\\nb.png"`` stays one line. Nothing here keeps state between calls.
"""

import os
import stat

__all__ = ["printable", "read_regular_file"]

_KINDS = ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def printable(name):
    """`name` (str, bytes or os.PathLike) as text without line breaks or control characters.

    Printable characters, spaces and non-ASCII letters are kept; the others are written as their ``repr``
    escapes (``\\n``, ``\\x1b``, ``\\udcff`` for an undecodable byte), so the result is always one line.
    """
    name = os.fspath(name)
    text = os.fsdecode(name) if isinstance(name, bytes) else str(name)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _kind(mode):
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "special file"


def read_regular_file(path, limit, error, what="file", name=None):
    """All bytes of the regular file `path`, refusing anything else with ``error("<name>: <problem>")``.

    limit  the largest size accepted, in bytes: a larger file is refused from its stat size, before reading,
           and at most limit + 1 bytes are ever read (in case the file grows meanwhile)
    error  the exception class to raise (a `lightcnn.errors.LightCNNError` subclass)
    what   what the file should have been, for messages ("an image file", "a checkpoint")
    name   how messages name the file (default: `printable(path)`)

    Directories, FIFOs, devices and sockets are refused after an ``os.stat`` that cannot block; the file is then
    opened non-blocking and checked again with ``fstat``, so swapping it for a FIFO in between does not hang.
    """
    name = printable(path) if name is None else name
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except (OSError, ValueError) as exc:  # ValueError: an embedded NUL byte
        raise error(f"{name}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    _check_stat(st, limit, error, what, name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            _check_stat(os.fstat(f.fileno()), limit, error, what, name)
            data = f.read(limit + 1)
    except OSError as exc:
        raise error(f"{name}: cannot read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise error(f"{name}: grew past the {limit}-byte limit for {what} while being read")
    return data


def _check_stat(st, limit, error, what, name):
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{name}: is a directory, not {what}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{name}: is a {_kind(st.st_mode)}, not a regular file; refused without reading it")
    if st.st_size > limit:
        raise error(f"{name}: {st.st_size} bytes, over the {limit}-byte limit for {what}")
