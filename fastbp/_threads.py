"""Thread and signal plumbing of the compiled calls.

``_blas_threads`` declares, per Python thread, how many threads its compiled
calls use; ``_BLAS`` (a ``_BlasThreads``) sets BLAS's process-wide count
around each compiled call that may reach BLAS, so Python threads that want
different counts take turns; ``_DeferredInterrupt`` holds Ctrl-C until a call
boundary.  Used by the model (predict, loss_and_grad), the fit driver
(``fastbp._fit``), the runner (``fastbp._runner``), the scikit-learn
estimators and Levenberg-Marquardt; it imports nothing of fastbp but the
compiled ``dense`` module, whose kernels take the thread count.
"""
from __future__ import annotations

import collections
import os
import signal
import threading

from threadpoolctl import ThreadpoolController

from ._ext import dense as _dense


class _DeferredInterrupt:
    """Hold Ctrl-C (SIGINT) until the next call boundary, so that the model,
    the optimizer's step count and the history always agree.  Only the main
    thread receives signals; in other threads this does nothing.  A second
    Ctrl-C interrupts at once.  None is lost: one that the block did not act
    on (it arrived during the last call, or the block ends with another
    exception) raises KeyboardInterrupt when the block ends."""

    def __enter__(self):
        self.requested = False
        self._armed = True
        self._previous = None
        # A process that ignores SIGINT (a background job of a shell, nohup)
        # keeps ignoring it: holding it would turn it into a
        # KeyboardInterrupt the process asked not to get.
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested and self._armed:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, exc_type, exc, tb):
        self._armed = False  # from here a Ctrl-C is only recorded
        if self._previous is not None:
            # signal.signal first runs the handler of a signal still pending
            signal.signal(signal.SIGINT, self._previous)
        if self.requested and not (exc_type is not None
                                   and issubclass(exc_type, KeyboardInterrupt)):
            raise KeyboardInterrupt("interrupted by Ctrl-C")
        return False


_CONTROLLER = []


def _controller():
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0]


_ACCESSORS = []


def _blas_accessors():
    """(get, set) functions of each BLAS library's thread count.

    threadpoolctl's setter for OpenBLAS without OpenMP obeys only the first
    Python thread that used it (the others' calls are silently dropped), so
    a fit in another thread would run at that thread's count: OpenBLAS's own
    (process-wide) functions are called directly instead, which also makes
    a read cost about 0.2 us instead of 2.
    """
    if not _ACCESSORS:
        _ACCESSORS.append([_accessors(lib) for lib in _controller().lib_controllers
                           if lib.user_api == "blas"])
    return _ACCESSORS[0]


def _accessors(lib):
    if lib.internal_api == "openblas" and getattr(lib, "threading_layer", None) != "openmp":
        for prefix in ("", "scipy_"):
            for suffix in ("", "64_", "_64"):
                get = getattr(lib.dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
                set_ = getattr(lib.dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    return get, set_
    return lib.get_num_threads, lib.set_num_threads


def default_threads():
    """Threads a fit or predict uses with ``n_threads=None``: as many as BLAS
    has (all cores unless OPENBLAS_NUM_THREADS or threadpoolctl says
    otherwise); 0 if no BLAS is found (the kernels then use one)."""
    return _BLAS.own_count()


class _BlasThreads:
    """BLAS's thread count, shared by the Python threads that run compiled
    calls.

    OpenBLAS has one thread count for the whole process, and its results can
    change with it; ``openblas_set_num_threads_local`` does not help: in the
    pthreads builds that numpy and scipy ship it sets the same global count
    (a worker thread's call changes the main thread's).  So every compiled
    call that may reach BLAS runs holding this (``with _BLAS:``) for the
    count its Python thread declared (``_blas_threads``).  Calls that want
    the same count run together; a call that wants another waits until they
    have all ended, and while it waits no new call joins them, so groups
    take turns in arrival order.  BLAS is set to a group's count when it
    starts, and back to its own setting (BLAS's as the user left it) when
    the last call ends.  Between Python threads of one count, and in a
    single thread, nothing waits and BLAS is not touched.
    """

    def __init__(self):
        # the Condition's lock taken directly: its own __enter__ is a Python
        # call, and predict passes here twice per call
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._count = None  # the running group's count
        self._holders = 0  # calls in the running group
        self._queue = collections.deque()  # waiting calls: [count, admitted]
        self._own = None  # BLAS's own counts, per library, while changed

    def own_count(self):
        """BLAS's own thread count: its setting when no call changed it."""
        with self._lock:
            counts = self._own if self._own is not None else self._read()
        return max(counts, default=0)

    def __enter__(self):
        want = getattr(_DECLARED, "n", None)
        own = want is None or _DECLARED.own
        with self._lock:
            if want is None:
                want = max(self._own if self._own is not None else self._read(), default=0)
            if not self._queue and (self._holders == 0 or want == self._count):
                if self._holders == 0:
                    self._start(want, own)
                self._holders += 1
                return self
            ticket = [want, False]
            self._queue.append(ticket)
            try:
                while not ticket[1]:
                    self._cond.wait()
            except BaseException:  # Ctrl-C while waiting
                if ticket[1]:
                    self._release()
                else:
                    self._queue.remove(ticket)
                raise
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._release()
        return False

    def _release(self):
        self._holders -= 1
        if self._holders:
            return
        if not self._queue:
            self._set(self._own)
            self._own = self._count = None
            return
        want = self._queue[0][0]
        group = [ticket for ticket in self._queue if ticket[0] == want]
        self._queue = collections.deque(t for t in self._queue if t[0] != want)
        self._start(want, False)
        self._holders = len(group)
        for ticket in group:
            ticket[1] = True
        self._cond.notify_all()

    def _start(self, want, own):
        """Set BLAS to ``want`` threads for a new group (0: leave it).  With
        ``own`` (want is BLAS's own count, read by the caller) and nothing
        changed, BLAS is already there: no need to read it again."""
        self._count = want
        if want <= 0 or (own and self._own is None):
            return
        if self._own is None:
            current = self._read()
            if all(c == want for c in current):
                return
            self._own = current
        if all(c == want for c in self._own):
            self._set(self._own)
            self._own = None
        else:
            self._set([want] * len(self._own))

    def _after_fork(self):
        """In a forked child none of the parent's calls runs: start afresh
        (the lock may have been held by a thread that is not here), with
        BLAS's own setting back if a call had changed it."""
        own = self._own
        self.__init__()
        self._set(own)

    @staticmethod
    def _read():
        return [get() or 0 for get, _ in _blas_accessors()]

    @staticmethod
    def _set(counts):
        if counts is not None:
            for (_, set_), n in zip(_blas_accessors(), counts):
                set_(n)


_BLAS = _BlasThreads()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_BLAS._after_fork)
#: this Python thread's declared thread count (``_blas_threads``), as ``n``,
#: and ``own``: whether it is BLAS's own count (n_threads=None)
_DECLARED = threading.local()


class _blas_threads:
    """Context declaring, for this Python thread, how many threads its
    compiled calls use: n_threads, or with None the count of an enclosing
    declaration, else BLAS's own count.  fastbp's kernels take it per thread
    (``dense.set_threads``); BLAS is set to it only while a compiled call
    holds ``_BLAS``, so a fit beside another with a different count still
    runs at its own.  (A class, not a generator: predict enters it on every
    call.)"""

    def __init__(self, n_threads):
        self.n_threads = n_threads

    def __enter__(self):
        self.outer = getattr(_DECLARED, "n", None)
        self.outer_own = getattr(_DECLARED, "own", False)
        n, own = self.n_threads, False
        if n is None:
            n, own = ((self.outer, self.outer_own) if self.outer is not None
                      else (_BLAS.own_count(), True))
        _DECLARED.n, _DECLARED.own = n, own
        self.previous = _dense.set_threads(n)
        return self

    def __exit__(self, *exc):
        _dense.set_threads(self.previous)
        _DECLARED.n, _DECLARED.own = self.outer, self.outer_own
        return False
