import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _sigint_delivered():
    """Each test runs with Python's own Ctrl-C handler, as in a terminal.

    A process started as a shell's background job (as CI may start pytest)
    inherits SIGINT ignored, and fastbp respects an ignored SIGINT
    (tests/test_reliability.py checks that in a child); the tests that press
    Ctrl-C on this process would then test nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
