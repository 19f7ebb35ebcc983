"""One place for compiled-code settings: Numba flags and its cache location.

Numba options used by every kernel (never hard-coded per function):

* ``error_model="numpy"``: division follows IEEE rules instead of raising, which
  lets loops vectorize (the fused Adam loop ran 7x faster: 1.8 instead of
  13.5 us a step on a small network).
* no ``fastmath``: NaN and inf keep their meaning, so divergence checks work.
* ``cache=True`` when a safe, writable cache folder exists; if none does we
  compile without caching rather than fail at import.

Which cache folder, and why so careful
--------------------------------------
Numba unpickles the index files it finds in its cache folder, so a folder
that another local user can write lets that user run code as whoever next
imports fastbp.  A folder is *safe* when ``os.lstat`` shows a real directory
(not a symbolic link) owned by this process's effective user and writable
by no one else (no group or other write bit), and its parent is not one
where others could rename it away (writable by others without the sticky
bit).  Folders fastbp creates are made with mode 0700 and checked after
creation like any other (an existing one may have been planted).  In order:

1. ``NUMBA_CACHE_DIR`` (or ``numba.config.CACHE_DIR`` set before import,
   which a ``.numba_config.yaml`` in the working folder also does): the
   user's choice, which applies to all of the process's Numba code, if it
   is safe or does not exist yet.  If it exists and is not safe, fastbp's
   kernels are not cached at all, with a ``RuntimeWarning`` (the setting may
   come from a file someone else planted in a shared folder).
2. ``fastbp/_numba/__pycache__`` beside the modules, if it exists, is safe
   and writable.  It is never created here.  Its owner is whoever installed
   the package; a group-writable shared install (or one owned by another
   user, e.g. root running another user's virtual environment) is not used,
   even though whoever can write it can usually edit fastbp's modules too:
   each user then caches in a folder of their own.
3. ``$XDG_CACHE_HOME/fastbp/numba``, else ``~/.cache/fastbp/numba``
   (absolute paths only).
4. ``<temporary folder>/fastbp-numba-<uid>``: a predictable name in a folder
   everyone can write, so the check matters most here.
5. None: no caching (kernels compile at first use in every process).

The folder is decided once, at import, but Numba picks each kernel's cache
folder again when the kernel is created, from its configuration at that
moment, which it re-reads whenever the environment changes (and from the
working folder's ``.numba_config.yaml``).  fastbp's C entry points are
created at first use, so every kernel is checked when it is created
(``pin``): its cache must lie in the folder chosen here, and that folder
must still be safe; otherwise that kernel is compiled without a cache.

A candidate that exists but is not safe is skipped with a ``RuntimeWarning``
naming it and why (someone may have planted it), except the package's own
``__pycache__``, which is skipped silently.  On platforms without
``os.geteuid`` (Windows) ownership is not checked: the temporary folder there
is already per user.  Nor are the permission bits on Windows, where access is
governed by ACLs and ``os.stat`` reports every folder as writable by all
(mode 0777): checking them there would refuse every folder, warn at each
import and turn caching off.
"""
import os
import stat
import tempfile
import threading
import warnings

#: effective user id whose folders are trusted (None: not checked, Windows)
_EUID = os.geteuid() if hasattr(os, "geteuid") else None
#: whether st_mode's permission bits say who may write (not on Windows: ACLs)
_MODE_BITS = os.name != "nt"
#: Numba's own choice for the kernels' cache, beside their modules
_PACKAGE_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_numba", "__pycache__")


def _unsafe(path):
    """Why ``path`` is not a safe cache folder (see the module docstring),
    or None if it is one."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if _EUID is not None and st.st_uid != _EUID:
        return f"is owned by uid {st.st_uid}, not by this user (uid {_EUID})"
    if not _MODE_BITS:
        return None
    if st.st_mode & 0o022:
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    parent = os.path.dirname(os.path.abspath(path))
    try:
        pst = os.stat(parent)
    except OSError as exc:
        return f"has a parent that cannot be examined ({exc.strerror})"
    if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
        return (f"lies in {parent}, which other users can write (mode "
                f"{stat.S_IMODE(pst.st_mode):04o}, no sticky bit): they could replace it")
    return None


def _create_private(path):
    """Create ``path`` and any missing parents, each with mode 0700.  Returns
    the folders created here (outermost first), or None if one could not be
    created (e.g. a read-only or missing home)."""
    missing, p = [], path
    while not os.path.lexists(p):  # lexists: a dangling link is not missing
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    missing.reverse()
    for p in missing:
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass  # made concurrently, perhaps by someone else: checked after
        except OSError:
            return None
    return missing


def _chain_unsafe(path, top, created):
    """Why the folder ``path`` must not be used: the first unsafe folder among
    those from ``top`` (the first one fastbp owns, e.g. ``~/.cache/fastbp``)
    down to ``path`` and the parents ``created`` on the way; None if all
    are safe."""
    chain, p = set(created), path
    while True:
        chain.add(p)
        if p == top or os.path.dirname(p) == p:
            break
        p = os.path.dirname(p)
    for p in sorted(chain, key=len):
        why = _unsafe(p)
        if why is not None:
            return why if p == path else f"has a parent {p} that {why}"
    return None


def _writable(path):
    """True if a file can be created in the existing folder ``path``."""
    try:
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".fastbp-probe-")
        probe.close()
        return True
    except OSError:
        return False


def _candidates():
    """(folder, first folder fastbp owns in it) for the per-user fallbacks,
    in order of preference; paths that cannot be determined are left out."""
    out = []
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):  # the XDG spec: relative paths are invalid
        home = os.path.expanduser("~")  # "~" itself when there is no home
        base = os.path.join(home, ".cache") if os.path.isabs(home) else ""
    if base:
        out.append((os.path.join(base, "fastbp", "numba"), os.path.join(base, "fastbp")))
    try:
        # FileNotFoundError when no temporary folder is usable at all.
        tmp = tempfile.gettempdir()
    except OSError:
        tmp = ""
    if os.path.isabs(tmp):
        uid = os.getuid() if hasattr(os, "getuid") else "user"  # Windows: a per-user TEMP
        folder = os.path.join(tmp, f"fastbp-numba-{uid}")
        out.append((folder, folder))
    return out


def _warn(path, why):
    warnings.warn(f"fastbp: not caching compiled kernels in {path}: it {why}. Numba loads "
                  "code from its cache folder, so only a folder of your own that no one else "
                  "can write is used (remove this one, or set NUMBA_CACHE_DIR)",
                  RuntimeWarning, stacklevel=2)


def _choose_cache():
    """Decide where Numba caches (see the module docstring); sets
    ``numba.config.CACHE_DIR`` for a fallback folder.  Returns the folder
    fastbp's kernels are cached in, or None for no caching."""
    import numba

    chosen = os.environ.get("NUMBA_CACHE_DIR") or numba.config.CACHE_DIR
    if chosen:
        chosen = os.path.abspath(chosen)
        why = _unsafe(chosen) if os.path.lexists(chosen) else None
        if why is not None:
            warnings.warn(f"fastbp: not caching compiled kernels in NUMBA_CACHE_DIR={chosen}: "
                          f"it {why}. Numba loads code from its cache folder, so other users "
                          "could run code in this process (use a folder of your own that no "
                          "one else can write)", RuntimeWarning, stacklevel=2)
            return None
        return chosen
    if _unsafe(_PACKAGE_CACHE) is None and _writable(_PACKAGE_CACHE):
        return _PACKAGE_CACHE
    for folder, top in _candidates():
        created = _create_private(folder)
        if created is None:
            continue
        why = _chain_unsafe(folder, top, created)
        if why is not None:
            _warn(folder, why)
        elif _writable(folder):
            numba.config.CACHE_DIR = folder
            return folder
    return None


def _inside(path, root):
    try:
        return os.path.commonpath([os.path.abspath(path), root]) == root
    except ValueError:  # different drives (Windows)
        return False


_PIN_LOCK = threading.Lock()


def pin(kernel):
    """Keep the cache of ``kernel`` (a Numba dispatcher or cfunc, created but
    not compiled yet: compiling reads and writes the cache) only if it lies
    in the folder chosen at import, and every folder from that one down to
    it is safe; otherwise it compiles without a cache.  Numba chose the
    kernel's folder when the kernel was created, from its configuration at
    that moment (see the module docstring).  Returns ``kernel``."""
    from numba.core.caching import NullCache

    cache = getattr(kernel, "_cache", None)
    if cache is None or isinstance(cache, NullCache):
        return kernel
    path = getattr(cache, "_cache_path", None)  # Numba's Cache: where it reads and writes
    if not (isinstance(path, str) and ROOT is not None and _inside(path, ROOT)
            and _chain_unsafe(os.path.abspath(path), ROOT, ()) is None):
        kernel._cache = NullCache()
    return kernel


def pin_module(namespace):
    """``pin`` every Numba dispatcher in a kernel module's namespace (at its
    import: a dispatcher compiles at its first call)."""
    from numba.core.dispatcher import Dispatcher

    for obj in list(namespace.values()):
        if isinstance(obj, Dispatcher):
            pin(obj)


def pinned_cfunc(func, signature, options):
    """``numba.cfunc(signature, cache=True, **options)(func)``, its cache in
    the folder chosen at import: created with Numba's cache settings put
    back to that choice (the environment, or a .numba_config.yaml in the
    working folder, may have changed them since, and Numba re-reads them),
    and ``pin``-ned before it compiles (``numba.cfunc`` compiles at once,
    reading the cache first).  One at a time: the settings are the
    process's."""
    import numba
    from numba.core import sigutils

    options = {k: v for k, v in options.items() if k != "cache"}
    try:
        from numba.core.ccallback import CFunc
    except ImportError:  # Numba moved it: no cache rather than an unchecked one
        return numba.cfunc(signature, **options)(func)
    kernel = CFunc(func, sigutils.normalize_signature(signature), locals={}, options=options)
    if ROOT is not None:
        with _PIN_LOCK:
            before = numba.config.CACHE_DIR, numba.config.CACHE_LOCATOR_CLASSES
            numba.config.CACHE_DIR = "" if ROOT == _PACKAGE_CACHE else ROOT
            numba.config.CACHE_LOCATOR_CLASSES = ""  # Numba's own order of locators
            try:
                kernel.enable_caching()
            finally:
                numba.config.CACHE_DIR, numba.config.CACHE_LOCATOR_CLASSES = before
        pin(kernel)
    kernel.compile()
    return kernel


#: the folder fastbp's kernels are cached in (None: not cached)
ROOT = _choose_cache()
CACHE = ROOT is not None

#: keyword arguments of every ``numba.njit`` / ``numba.cfunc`` in fastbp.
NJIT = dict(cache=CACHE, error_model="numpy", nogil=True)
