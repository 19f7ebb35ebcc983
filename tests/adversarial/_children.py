"""What the adversarial scripts share: running trials in a child process
that may crash or hang, and pinning the crash on the trial it happened in.

A child prints ``start <i>`` before trial ``i`` and ``done <i> <outcome>``
after it; a child that dies or falls silent for ``hang_seconds`` leaves the
last ``start`` without its ``done``, and that trial is the culprit.  The
scripts run as ``python -P script.py``, which does not put their folder on
``sys.path``, so each inserts it before importing this module.

Scripts whose trials are numbered and independent give ``run_trials`` the
code of a ``trial(i)`` that returns an outcome ("FAIL ..." for a failure);
it runs them many per child, restarts a child after the trial it crashed or
hung in, and counts outcomes; ``print_summary`` reports them, and
``command_line`` is such a script's ``main``.  Scripts that draw a spec per
trial up front and whose child reports each trial's failures and how its
fit ended give the specs to ``run_specs``, and ``specs_command_line`` is
their ``main``.
"""
import argparse
import json
import os
import select
import subprocess
import sys
import time
from collections import Counter


def follow(code, args, env, on_done, hang_seconds):
    """Run ``python -P -c code *args`` and call ``on_done(index, outcome)``
    for every trial it finishes.

    Returns
    -------
    current : int or None
        The trial the child was in when it crashed or hung, else None.
    returncode : int
        The child's exit status (-9 when killed as hung).
    stderr : str
        The last 300 characters of its standard error.
    """
    # Unbuffered (bufsize=0): select() sees only the pipe, so a buffered
    # reader that took several lines at once would wait on an empty pipe
    # with a "done" and the next "start" unread, and blame the hang or crash
    # on the trial before.
    proc = subprocess.Popen([sys.executable, "-P", "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            bufsize=0)
    current, last = None, time.monotonic()
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline().decode()
            if not line:
                break
            last = time.monotonic()
            word, index, *rest = line.split(" ", 2)
            if word == "start":
                current = int(index)
                continue
            current = None
            on_done(int(index), rest[0].strip())
        elif time.monotonic() - last > hang_seconds:
            proc.kill()
            break
    proc.wait()
    stderr = proc.stderr.read().decode()[-300:]
    proc.stdout.close()
    proc.stderr.close()
    return current, proc.returncode, stderr


def report_all(names, run, trials, seed):
    """Run ``run(name, trials, seed)`` for each name, print each one's counts
    (a dict with ``trials`` and ``passed``) and the totals as JSON lines;
    the exit status: 0 when every trial passed."""
    total = passed = 0
    for name in names:
        counts = run(name, trials, seed)
        print(json.dumps(counts), flush=True)
        total += counts["trials"]
        passed += counts["passed"]
    print(json.dumps({"total_trials": total, "total_passed": passed}))
    return 0 if total == passed else 1


#: The end of every ``run_trials`` child: trials first .. first + count - 1
#: of the ``trial(i)`` defined above it, each reported as it happens; an
#: exception out of a trial is a failure.
_TRIAL_LOOP = r"""
import sys as _sys
first, count, seed = (int(a) for a in _sys.argv[1:4])
for i in range(first, first + count):
    print(f"start {i}", flush=True)
    try:
        outcome = trial(i)
    except Exception as exc:
        import os as _os, traceback as _tb
        _where = _tb.extract_tb(exc.__traceback__)[-1]
        outcome = (f"FAIL {type(exc).__name__}: {str(exc)[:150]!r} at "
                   f"{_os.path.basename(_where.filename)}:{_where.lineno}")
    print(f"done {i} {outcome}", flush=True)
"""


def run_trials(code, trials, seed, per_child, hang_seconds):
    """Run trials 0 .. trials - 1 of ``code`` (which defines ``trial(i)``,
    returning an outcome string, and may read the global ``seed``) in child
    processes of ``per_child`` trials each, with glibc's heap checks on so
    that a write past a buffer aborts the child near the trial that made it.

    Returns
    -------
    counts : dict
        Trials per outcome; every "FAIL ..." outcome counts as "failure",
        and each crash or hang as "crash/hang" (the child then restarts at
        the trial after it).
    failures : list of str
        A line per failure, naming its trial.
    """
    env = dict(os.environ, MALLOC_CHECK_="3", MALLOC_PERTURB_="165")
    counts, failures = {}, []

    def done(index, outcome):
        key = "failure" if outcome.startswith("FAIL") else outcome
        counts[key] = counts.get(key, 0) + 1
        if key == "failure":
            failures.append(f"trial {index}: {outcome}")

    start = 0
    while start < trials:
        count = min(per_child, trials - start)
        current, returncode, err = follow(code + _TRIAL_LOOP, [start, count, seed], env, done,
                                          hang_seconds)
        if current is not None:
            counts["crash/hang"] = counts.get("crash/hang", 0) + 1
            failures.append(f"trial {current}: crash or hang (exit {returncode}): {err}")
            start = current + 1
            continue
        if returncode != 0:
            failures.append(f"child exited {returncode}: {err}")
        start += count
    return counts, failures


def print_summary(counts, failures, seconds):
    """Print a ``run_trials`` run's trials run, passed and failed, its
    counts by outcome and its first 30 failures; the exit status: 0 when
    nothing failed."""
    done = sum(counts.values())
    bad = counts.get("failure", 0) + counts.get("crash/hang", 0)
    print(f"trials run: {done}, passed: {done - bad}, failures: {bad} ({seconds:.1f} s)")
    for key, value in sorted(counts.items()):
        print(f"  {key}: {value}")
    for line in failures[:30]:
        print("FAILURE", line)
    return 1 if failures else 0


def command_line(run, doc, default_trials, argv=None):
    """The ``main`` of a ``run_trials`` script: ``--trials N --seed S``, then
    ``run(trials, seed)``'s summary; the exit status."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--trials", type=int, default=default_trials)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts, failures = run(args.trials, args.seed)
    return print_summary(counts, failures, time.perf_counter() - start)


def run_specs(code, specs, per_child, hang_seconds, show=False):
    """Run one trial per spec in children of ``code``, ``per_child`` specs
    each (the child gets the first trial's index and the specs as JSON, and
    reports each trial's outcome as JSON ``{"fails": [...], "ended": ...}``);
    a child that crashed or hung restarts after the trial it was in.

    Returns
    -------
    counts : Counter
        ``trials``, ``passed``, and the failures by kind (``crash/hang``,
        ``child_failed`` and the kinds the children name).
    ended : Counter
        How the trials' fits ended.
    """
    counts, ended = Counter(trials=0, passed=0), Counter()

    def done(index, outcome):
        result = json.loads(outcome)
        counts["trials"] += 1
        ended[result["ended"]] += 1
        if not result["fails"]:
            counts["passed"] += 1
            return
        for kind in set(result["fails"]):
            counts[kind] += 1
        if show:
            print(json.dumps({"spec": specs[index], "fails": result["fails"]}))

    start = 0
    while start < len(specs):
        batch = specs[start:start + per_child]
        current, returncode, err = follow(code, [start, json.dumps(batch)], dict(os.environ),
                                          done, hang_seconds)
        if current is not None:  # it crashed or hung in this trial: go on after it
            counts["trials"] += 1
            counts["crash/hang"] += 1
            print(f"trial {current}: crash or hang (exit {returncode}): {err}", file=sys.stderr)
            start = current + 1
        elif returncode != 0:
            counts["child_failed"] += 1
            print(f"child exited {returncode}: {err}", file=sys.stderr)
            start += len(batch)
        else:
            start += len(batch)
    return counts, ended


def specs_command_line(run, doc, argv=None):
    """The ``main`` of a ``run_specs`` script: ``--trials N --seed S
    [--show]``, then ``run(trials, seed, show)``'s counts and endings; the
    exit status: 0 when every trial ran and passed."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", action="store_true", help="print each failing trial")
    args = parser.parse_args(argv)
    counts, ended = run(args.trials, args.seed, args.show)
    failures = {k: v for k, v in counts.items() if k not in ("trials", "passed")}
    print(f"trials {counts['trials']}, passed {counts['passed']}, failures by kind: "
          f"{failures or 'none'}")
    print(f"fits ended by: {dict(ended.most_common())}")
    return 0 if counts["passed"] == counts["trials"] == args.trials else 1
