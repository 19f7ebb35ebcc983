"""The adversarial scripts' child runner (tests/adversarial/_children.py):
a crash or hang is pinned on the trial it happened in, whatever the pipe
delivered at once."""
from helpers import adversarial

_children = adversarial("_children")

# Trial 0 finishes, trial 1 hangs; the three lines reach the pipe in one
# write, so a reader that buffers them and then waits on the pipe for more
# never sees "done 0" and "start 1" before it gives up on the child.
_HANGS_IN_TRIAL_1 = r"""
import sys, time
sys.stdout.write("start 0\ndone 0 ok\nstart 1\n")
sys.stdout.flush()
time.sleep(60)
"""

_TRIALS = r"""
import os, time
def trial(i):
    if i == 2:
        os.abort()
    if i == 4:
        time.sleep(60)
    if i == 5:
        raise TypeError("boom")
    return "ok"
"""


def test_follow_pins_a_hang_on_the_trial_it_started_last():
    done = []
    current, returncode, _ = _children.follow(_HANGS_IN_TRIAL_1, [], None,
                                              lambda i, outcome: done.append((i, outcome)), 1)
    assert done == [(0, "ok")]
    assert (current, returncode) == (1, -9)


def test_run_trials_counts_each_trial_once_and_blames_only_the_bad_ones():
    counts, failures = _children.run_trials(_TRIALS, 7, 0, 100, 1)
    assert counts == {"ok": 4, "crash/hang": 2, "failure": 1}
    assert [f.split(":")[0] for f in failures] == ["trial 2", "trial 4", "trial 5"]
    assert "FAIL TypeError: 'boom'" in failures[2]


def test_an_adversarial_script_leaves_no_trace_on_the_import_path():
    """The scripts put their folder on sys.path for their own imports, and
    the tests imported them by their bare names: tests/adversarial/
    distributed.py then shadowed dask's ``distributed`` package for the
    rest of the session (test_distributed's dask test failed when it ran
    after test_reliability)."""
    import importlib.util
    import os
    import sys

    for name in ("architectures", "interrupts"):  # both insert their folder
        adversarial(name)
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adversarial")
    assert all(os.path.abspath(p or ".") != folder for p in sys.path), sys.path
    for name in ("architectures", "interrupts", "data_parallel", "threads", "progress"):
        spec = importlib.util.find_spec(name)
        assert spec is None or not (spec.origin or "").startswith(folder), (name, spec)
        assert name not in sys.modules or not (
            getattr(sys.modules[name], "__file__", "") or "").startswith(folder), name
