"""Where Numba's cache goes (fastbp/_config.py)."""
import numba
import pytest

from fastbp import _config


@pytest.fixture
def restore_cache_dir(monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    before = numba.config.CACHE_DIR
    yield
    numba.config.CACHE_DIR = before


def test_writable_package_caches_beside_the_modules(monkeypatch, restore_cache_dir):
    monkeypatch.setattr(_config, "_writable", lambda path: True)
    numba.config.CACHE_DIR = ""
    assert _config._choose_cache() is True
    assert numba.config.CACHE_DIR == ""  # Numba's default: beside the source


def test_read_only_package_falls_back_to_a_user_cache(monkeypatch, tmp_path, restore_cache_dir):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(_config, "_writable", lambda path: str(tmp_path) in path)
    assert _config._choose_cache() is True
    assert numba.config.CACHE_DIR == str(tmp_path / "fastbp" / "numba")


def test_nothing_writable_disables_caching_instead_of_failing(monkeypatch, restore_cache_dir):
    monkeypatch.setattr(_config, "_writable", lambda path: False)
    assert _config._choose_cache() is False


def test_explicit_numba_cache_dir_is_respected(monkeypatch, restore_cache_dir):
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere")
    monkeypatch.setattr(_config, "_writable", lambda path: pytest.fail("no probing needed"))
    assert _config._choose_cache() is True


def test_writable_probe(tmp_path):
    assert _config._writable(str(tmp_path / "new" / "dir"))
    assert not _config._writable("/proc/fastbp-cannot-exist")
