"""The rules for every file fastbp writes: model files (``fastbp.io``), CSV
logs (``callbacks.CSVLogger``) and figures (``plot_history``).

* Only a regular file is written or replaced.  A path that exists and is a
  FIFO, a device or a socket raises ValueError (opening a FIFO blocks until
  a reader comes, writing a device writes the device, and an atomic replace
  swaps the node itself for a file: run as root, saving to ``/dev/null``
  once replaced it); a folder raises IsADirectoryError.  Files are opened
  without blocking and checked again once open, so a FIFO slipped in
  between the check and the open is refused too.
* A symbolic link is written through: the file it points to is written,
  or, for an atomic save, replaced by a temporary file made in that file's
  folder (``os.replace`` over the link would replace the link and leave its
  target stale).
* A missing folder is named in the ``FileNotFoundError``, and so is a folder
  where no file can be created (``PermissionError``).
"""
import errno
import os
import stat

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}
_FLAGS = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
          "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND}


def _check_regular(path, st, what):
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {what} here: it is a folder", path)
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
    raise ValueError(f"cannot write {what} to {path!r}: it exists and is {kind}, not a regular "
                     "file; choose a file path")


def target(path, what):
    """The regular file that writing ``path`` writes (symbolic links
    followed), and its ``os.stat`` (None when it does not exist yet).

    Raises
    ------
    ValueError
        It exists and is not a regular file (nor a folder).
    IsADirectoryError
        It is a folder.
    FileNotFoundError
        Its folder does not exist (the error names the folder).
    """
    path = os.fsdecode(os.fspath(path))
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        folder = os.path.dirname(real)
        if not os.path.isdir(folder):
            raise FileNotFoundError(errno.ENOENT, f"cannot write {what}: no such folder",
                                    folder) from None
        return real, None
    _check_regular(path, st, what)
    return real, st


def folder_error(exc, folder, what):
    """``exc`` (an OSError from creating a file in ``folder``) re-raised as the
    same kind of error naming the folder, not the temporary file."""
    return type(exc)(exc.errno, f"cannot create {what} in this folder ({exc.strerror})", folder)


def open_regular(path, mode, what, **kwargs):
    """``open(path, mode, **kwargs)`` for a regular file only (see the module
    docstring); ``mode`` is "r", "w" or "a", with "b" for binary."""
    target(path, what)  # clear errors for the usual cases, before anything is created
    try:
        fd = os.open(path, _FLAGS[mode[0]] | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO with no reader, created since the check
            raise ValueError(f"cannot write {what} to {os.fsdecode(path)!r}: it is a FIFO, "
                             "not a regular file") from None
        raise
    try:
        _check_regular(os.fsdecode(path), os.fstat(fd), what)
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise
