"""Where Numba's cache goes (fastbp/_config.py).

Numba unpickles the index files of its cache folder, so the folder must be
one only this user can write: the tests plant folders owned by someone else,
writable by others, behind symbolic links or in a folder anyone can rename
them in, and check that fastbp refuses them (and that a planted pickle does
not run in a real process).
"""
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numba
import pytest

from fastbp import _config

PACKAGE = Path(_config.__file__).parent
OTHER_UID = 12345


@pytest.fixture
def home(monkeypatch, tmp_path):
    """A clean environment for _choose_cache: no NUMBA_CACHE_DIR, the
    package cache at a missing folder, XDG_CACHE_HOME and the temporary
    folder under tmp_path; restores numba.config.CACHE_DIR after."""
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    before = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = ""
    monkeypatch.setattr(_config, "_PACKAGE_CACHE", str(tmp_path / "pkg" / "__pycache__"))
    (tmp_path / "pkg").mkdir(mode=0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)  # like /tmp: anyone may create entries, the sticky bit
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp))
    yield tmp_path
    numba.config.CACHE_DIR = before


def _fallback(tmp_path):
    return tmp_path / "tmp" / f"fastbp-numba-{os.getuid()}"


def _owned_by_someone_else(path, monkeypatch):
    """Make ``path`` belong to another user: chown as root, else pretend to
    be another user (fastbp compares owners with its _EUID)."""
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)
    else:
        monkeypatch.setattr(_config, "_EUID", OTHER_UID)


def _choose(expect_warning=None):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cached = _config._choose_cache()
    messages = [str(w.message) for w in seen]
    if expect_warning is None:
        assert not messages
    else:
        assert any(expect_warning in m for m in messages), messages
    return cached is not None  # the folder chosen, or None


def test_safe_package_cache_is_used_beside_the_modules(home):
    (home / "pkg" / "__pycache__").mkdir(mode=0o755)
    assert _choose() is True
    assert numba.config.CACHE_DIR == ""  # Numba's default: beside the source


@pytest.mark.parametrize("make", ["missing", "group_writable", "world_writable_parent"])
def test_unusable_package_cache_falls_back_to_a_private_user_cache(home, make):
    pkg = home / "pkg" / "__pycache__"
    if make == "group_writable":  # a shared install with umask 002
        pkg.mkdir()
        pkg.chmod(0o775)
    elif make == "world_writable_parent":
        pkg.mkdir(mode=0o755)
        (home / "pkg").chmod(0o777)
    assert _choose() is True  # silently: a shared install is not an attack
    want = home / "xdg" / "fastbp" / "numba"
    assert numba.config.CACHE_DIR == str(want)
    assert make != "missing" or not pkg.exists()  # never created by fastbp
    for folder in (want, want.parent):  # every folder fastbp made: 0700
        assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700


class _WindowsOs:
    """os as fastbp/_config.py would see it on Windows, where access is
    governed by ACLs: os.stat reports every folder as mode 0777."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def _as_windows(st):
        if stat.S_ISDIR(st.st_mode):
            return os.stat_result((st.st_mode | 0o777,) + tuple(st)[1:])
        return st

    def lstat(self, path):
        return self._as_windows(os.lstat(path))

    def stat(self, path):
        return self._as_windows(os.stat(path))


def test_windows_mode_bits_do_not_refuse_every_folder(home, monkeypatch):
    # Checking them there refused every folder: a warning at each import and
    # no cache (kernels compiled afresh in every process).
    monkeypatch.setattr(_config, "os", _WindowsOs())
    monkeypatch.setattr(_config, "_EUID", None)         # no os.geteuid on Windows
    monkeypatch.setattr(_config, "_MODE_BITS", False, raising=False)   # os.name == "nt"
    assert _choose() is True  # and silently
    assert numba.config.CACHE_DIR == str(home / "xdg" / "fastbp" / "numba")


def test_missing_parents_are_created_private(home, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "new" / "cache"))
    assert _choose() is True
    for folder in (home / "new", home / "new" / "cache", home / "new" / "cache" / "fastbp"):
        assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700


@pytest.mark.parametrize("plant", ["other_owner", "mode_0777", "mode_0720", "symlink",
                                   "file", "parent_other_owner"])
def test_planted_user_cache_is_refused(home, monkeypatch, plant):
    """A user cache folder that is not this user's alone is skipped, with a
    warning, for the temporary-folder fallback."""
    folder = home / "xdg" / "fastbp" / "numba"
    folder.mkdir(parents=True, mode=0o700)
    (home / "xdg" / "fastbp").chmod(0o700)
    if plant == "other_owner":
        _owned_by_someone_else(folder, monkeypatch)
    elif plant == "mode_0777":
        folder.chmod(0o777)
    elif plant == "mode_0720":
        folder.chmod(0o720)
    elif plant == "symlink":
        folder.rmdir()
        target = home / "elsewhere"
        target.mkdir(mode=0o700)
        folder.symlink_to(target)
    elif plant == "file":
        folder.rmdir()
        folder.write_bytes(b"")
    elif plant == "parent_other_owner":
        (home / "xdg" / "fastbp").chmod(0o777)
    if plant == "other_owner" and os.geteuid() != 0:
        # pretending to be someone else makes every folder foreign
        assert _choose(expect_warning=str(folder)) is False
        return
    assert _choose(expect_warning=str(folder)) is True
    assert numba.config.CACHE_DIR == str(_fallback(home))


@pytest.mark.parametrize("plant", ["other_owner", "mode_0777", "symlink"])
def test_planted_temporary_folder_is_refused_and_nothing_is_cached(home, monkeypatch, plant):
    """The predictable /tmp/fastbp-numba-<uid>, pre-created by another
    user: refused; with no other folder, kernels compile without a cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "file" / "cache"))
    (home / "file").write_bytes(b"")  # a home that cannot be created
    planted = _fallback(home)
    if plant == "symlink":
        target = home / "attacker"
        target.mkdir(mode=0o700)
        planted.symlink_to(target)
    else:
        planted.mkdir(mode=0o700)
        if plant == "other_owner":
            _owned_by_someone_else(planted, monkeypatch)
        else:
            planted.chmod(0o777)
    assert _choose(expect_warning=str(planted)) is False
    assert numba.config.CACHE_DIR == ""


def test_temporary_folder_in_a_non_sticky_shared_folder_is_refused(home, monkeypatch):
    """Without the sticky bit, anyone could rename our folder and put theirs
    in its place after the check."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "file" / "cache"))
    (home / "file").write_bytes(b"")
    (home / "tmp").chmod(0o777)
    assert _choose(expect_warning="other users can write") is False


def test_own_temporary_folder_is_used(home, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "file" / "cache"))
    (home / "file").write_bytes(b"")
    assert _choose() is True
    assert numba.config.CACHE_DIR == str(_fallback(home))
    assert stat.S_IMODE(os.lstat(_fallback(home)).st_mode) == 0o700


def test_no_temporary_folder_at_all_disables_caching_instead_of_failing(home, monkeypatch):
    """tempfile.gettempdir raises FileNotFoundError when no candidate is
    writable (read-only root, no tmpfs): import must still work."""
    def none_usable():
        raise FileNotFoundError("No usable temporary directory found")
    monkeypatch.setattr(tempfile, "gettempdir", none_usable)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "file" / "cache"))
    (home / "file").write_bytes(b"")
    assert _choose() is False


def test_no_home_does_not_create_a_tilde_folder(home, monkeypatch):
    """Without HOME (and no passwd entry) expanduser("~") is "~": a relative
    path, which must not become a folder in the working directory."""
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)
    monkeypatch.chdir(home)
    assert _choose() is True
    assert numba.config.CACHE_DIR == str(_fallback(home))
    assert not (home / "~").exists()


def test_nothing_writable_disables_caching_instead_of_failing(home, monkeypatch):
    monkeypatch.setattr(_config, "_writable", lambda path: False)
    (home / "pkg" / "__pycache__").mkdir(mode=0o755)
    assert _choose() is False


def test_explicit_numba_cache_dir_is_respected(home, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(home / "somewhere"))
    monkeypatch.setattr(_config, "_writable", lambda path: pytest.fail("no probing needed"))
    assert _config._choose_cache() == str(home / "somewhere")


def test_unsafe_explicit_numba_cache_dir_is_refused_with_a_warning(home, monkeypatch):
    """NUMBA_CACHE_DIR (or a .numba_config.yaml planted in a shared working
    folder, which sets the same) naming a folder others can write: fastbp's
    kernels are not cached there."""
    shared = home / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(shared))
    assert _choose(expect_warning=f"not caching compiled kernels in NUMBA_CACHE_DIR={shared}") \
        is False


def _kernel(numba_cache_dir):
    """A cached Numba kernel created while Numba's cache folder is
    ``numba_cache_dir`` (as after Numba re-read its configuration)."""
    before = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = str(numba_cache_dir)
    try:
        return numba.njit(cache=True)(_config._inside)
    finally:
        numba.config.CACHE_DIR = before


def test_pin_keeps_a_cache_in_the_chosen_folder_only(tmp_path, monkeypatch):
    from numba.core.caching import NullCache

    chosen = tmp_path / "chosen"
    chosen.mkdir(mode=0o700)
    monkeypatch.setattr(_config, "ROOT", str(chosen))
    kept = _config.pin(_kernel(chosen))
    assert not isinstance(kept._cache, NullCache)
    assert _config._inside(kept._cache._cache_path, str(chosen))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    assert isinstance(_config.pin(_kernel(elsewhere))._cache, NullCache)
    monkeypatch.setattr(_config, "ROOT", None)  # nothing chosen: nothing cached
    assert isinstance(_config.pin(_kernel(chosen))._cache, NullCache)


def test_pin_refuses_the_chosen_folder_once_it_is_unsafe(tmp_path, monkeypatch):
    from numba.core.caching import NullCache

    chosen = tmp_path / "chosen"
    chosen.mkdir(mode=0o700)
    monkeypatch.setattr(_config, "ROOT", str(chosen))
    kernel = _kernel(chosen)
    chosen.chmod(0o777)
    assert isinstance(_config.pin(kernel)._cache, NullCache)


def _add(a, b):
    return a + b


@pytest.mark.parametrize("settings", ["CACHE_DIR", "CACHE_LOCATOR_CLASSES"])
def test_pinned_cfunc_caches_in_the_chosen_folder_whatever_numba_reads_now(
        tmp_path, monkeypatch, settings):
    """Numba's settings changed since import (by the environment, or a
    .numba_config.yaml): the cfunc is created with the chosen folder anyway,
    the settings are left as they were found, and it is pinned before it
    compiles (numba.cfunc compiles at once, reading the cache first)."""
    chosen = tmp_path / "chosen"
    chosen.mkdir(mode=0o700)
    monkeypatch.setattr(_config, "ROOT", str(chosen))
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "changed-since-import"))
    if settings == "CACHE_LOCATOR_CLASSES":
        monkeypatch.setattr(numba.config, "CACHE_LOCATOR_CLASSES", "UserWideCacheLocator")
    before = (numba.config.CACHE_DIR, numba.config.CACHE_LOCATOR_CLASSES)
    kernel = _config.pinned_cfunc(_add, "float64(float64, float64)", {"cache": True})
    assert (numba.config.CACHE_DIR, numba.config.CACHE_LOCATOR_CLASSES) == before
    assert _config._inside(kernel._cache._cache_path, str(chosen))
    assert list(chosen.rglob("*.nbi")), "compiled into the chosen folder"
    assert not (tmp_path / "changed-since-import").exists()
    assert kernel.ctypes(2.0, 3.0) == 5.0


def test_pin_refuses_a_cache_folder_others_can_write_below_the_chosen_one(tmp_path,
                                                                       monkeypatch):
    """The chosen folder is safe, but the folder Numba made in it is not
    (created under umask 000): the kernel is not cached there."""
    from numba.core.caching import NullCache

    chosen = tmp_path / "chosen"
    chosen.mkdir(mode=0o700)
    monkeypatch.setattr(_config, "ROOT", str(chosen))
    kernel = _kernel(chosen)
    os.chmod(kernel._cache._cache_path, 0o777)
    assert isinstance(_config.pin(kernel)._cache, NullCache)


def test_writable_probe(tmp_path):
    assert _config._writable(str(tmp_path))
    assert not _config._writable(str(tmp_path / "missing"))
    assert not _config._writable("/proc/fastbp-cannot-exist")


# -- in a real process ---------------------------------------------------------------

class _Payload:
    """A pickle that creates ``marker`` when it is loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


_LOAD_A_KERNEL = (
    "import numba, fastbp._config as c; from fastbp._numba.losses import loss_cfunc; "
    "loss_cfunc('mse', 'float64'); print(c.CACHE, numba.config.CACHE_DIR)")


def _env(root, tmp):
    """No NUMBA_CACHE_DIR, a home that cannot be created, the package copy
    at ``root`` (no bytecode written) and TMPDIR=tmp."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1", TMPDIR=str(tmp),
               HOME=str(root / "not-a-folder" / "home"))
    return env


def _run(root, tmp, code=_LOAD_A_KERNEL):
    return subprocess.run([sys.executable, "-P", "-c", code], env=_env(root, tmp), cwd=root,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def primed(tmp_path_factory):
    """A copy of the package whose own cache folder is unusable (a file where
    the folder would be: no write permission stops root), and a Numba cache
    of one kernel written by a first process into the fallback."""
    root = tmp_path_factory.mktemp("install")
    shutil.copytree(PACKAGE, root / "fastbp", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "fastbp" / "_numba" / "__pycache__").write_bytes(b"")
    (root / "not-a-folder").write_bytes(b"")
    tmp = root / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    done = _run(root, tmp)
    assert done.returncode == 0, done.stderr
    cache = tmp / f"fastbp-numba-{os.getuid()}"
    assert done.stdout.split() == ["True", str(cache)], done.stdout
    index = sorted(p.relative_to(cache) for p in cache.rglob("*.nbi"))
    assert index, "the first process wrote no Numba index file"
    return root, cache, index


@pytest.mark.parametrize("plant", ["own_folder", "other_owner", "mode_0777", "symlink"])
def test_a_planted_pickle_does_not_run(primed, tmp_path, plant):
    """Another user pre-creates <tmp>/fastbp-numba-<uid> with index files
    that run code when unpickled.  With a folder of our own (the control:
    only we could have planted it) Numba loads them, so the payload is
    real; any other way, fastbp does not use the folder."""
    root, cache, index = primed
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    planted = tmp / cache.name
    source = tmp_path / "attacker" if plant == "symlink" else planted
    shutil.copytree(cache, source)
    marker = tmp_path / "payload-ran"
    for name in index:
        (source / name).write_bytes(pickle.dumps(_Payload(str(marker))))
    for folder in [source, *(p for p in source.rglob("*") if p.is_dir())]:
        folder.chmod(0o777 if plant == "mode_0777" else 0o700)
    if plant == "symlink":
        planted.symlink_to(source)
    code = _LOAD_A_KERNEL
    if plant == "other_owner" and os.geteuid() == 0:
        for p in [source, *source.rglob("*")]:
            os.chown(p, OTHER_UID, OTHER_UID, follow_symlinks=False)
    elif plant == "other_owner":  # not root: the victim pretends to be someone else
        code = "import os; os.geteuid = lambda: %d; " % OTHER_UID + code
    done = _run(root, tmp, code)
    assert done.returncode == 0, done.stderr
    if plant == "own_folder":
        assert marker.exists(), "the control: a planted index in a trusted folder is loaded"
        return
    assert not marker.exists(), "a pickle planted by another user ran"
    assert done.stdout.split() == ["False"], done.stdout  # and no CACHE_DIR
    assert f"not caching compiled kernels in {planted}" in done.stderr


@pytest.mark.parametrize("through", ["fastbp", "numba_alone"])
def test_a_kernel_created_after_numba_rereads_its_settings_ignores_a_planted_folder(
        primed, tmp_path, through):
    """Numba re-reads its settings (the environment, and the working folder's
    .numba_config.yaml, which anyone can plant in a shared folder) when it
    compiles, and picks a kernel's cache folder when the kernel is created.
    fastbp's C entry points are created at first use: after import, a
    setting pointing at a planted folder of index files that run code.
    Created through fastbp, the kernel does not look there; the control
    ("numba_alone": the same wrapper made a cached cfunc by Numba itself)
    shows that the planted files are found and run."""
    root, cache, index = primed
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    planted = tmp_path / "planted"
    shutil.copytree(cache, planted)
    marker = tmp_path / "payload-ran"
    for name in index:
        (planted / name).write_bytes(pickle.dumps(_Payload(str(marker))))
    for folder in [planted, *(p for p in planted.rglob("*") if p.is_dir())]:
        folder.chmod(0o777)
    make = ("loss_cfunc('mse', 'float64')" if through == "fastbp" else
            "numba.cfunc(L._signature(numba.types.float64), cache=True, "
            "error_model='numpy')(L._C_WRAPPERS['mse'])")
    code = ("import numba, fastbp._config as c\n"
            "import fastbp._numba.losses as L\n"
            "from fastbp._numba.losses import loss_cfunc\n"
            f"numba.config.CACHE_DIR = {str(planted)!r}  # what Numba's re-read would set\n"
            f"{make}\n"
            "print(c.CACHE, numba.config.CACHE_DIR)\n")
    done = _run(root, tmp, code)
    assert done.returncode == 0, done.stderr
    if through == "numba_alone":
        assert marker.exists(), "the control: Numba loads the planted index"
        return
    assert not marker.exists(), "a pickle planted in a folder named by Numba's settings ran"
    # the setting is left as it was found; the kernel went to fastbp's folder
    assert done.stdout.split() == ["True", str(planted)], done.stdout


def test_import_and_fit_with_nothing_writable(primed, tmp_path):
    """Read-only root, no tmpfs: tempfile.gettempdir() raises, the home and
    the package folder cannot be written.  fastbp imports, compiles without
    a cache and trains."""
    root, _, _ = primed
    code = ("import tempfile\n"
            "def none():\n"
            "    raise FileNotFoundError('No usable temporary directory found')\n"
            "tempfile.gettempdir = none\n"
            "import numpy as np, numba, fastbp, fastbp._config as c\n"
            "X = np.random.default_rng(0).normal(size=(32, 3))\n"
            "net = fastbp.Sequential([fastbp.Dense(4, activation='tanh'), fastbp.Dense(1)], "
            "seed=0)\n"
            "net.fit(X, X[:, 0], epochs=2, verbose=0)\n"
            "print(c.CACHE, repr(numba.config.CACHE_DIR), np.isfinite(net.params).all())\n")
    done = _run(root, root / "missing-tmp", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "''", "True"], done.stdout
