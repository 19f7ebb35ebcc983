"""What the adversarial scripts share: running trials in a child process
that may crash or hang, and pinning the crash on the trial it happened in.

A child prints ``start <i>`` before trial ``i`` and ``done <i> <outcome>``
after it; a child that dies or falls silent for ``hang_seconds`` leaves the
last ``start`` without its ``done``, and that trial is the culprit.  The
scripts run as ``python -P script.py``, which does not put their folder on
``sys.path``, so each inserts it before importing this module.
"""
import select
import subprocess
import sys
import time


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
    proc = subprocess.Popen([sys.executable, "-P", "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
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
    import json

    total = passed = 0
    for name in names:
        counts = run(name, trials, seed)
        print(json.dumps(counts), flush=True)
        total += counts["trials"]
        passed += counts["passed"]
    print(json.dumps({"total_trials": total, "total_passed": passed}))
    return 0 if total == passed else 1
