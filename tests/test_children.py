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
