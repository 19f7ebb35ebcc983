"""The README's main job: ``fastbp demo`` trains on the bundled digits data."""
import subprocess
import sys

import pytest

from fastbp import cli


def test_demo_trains_and_reports_accuracy_and_speed(tmp_path):
    # Run from an empty folder so the installed package is what gets imported.
    proc = subprocess.run([sys.executable, "-m", "fastbp", "demo", "--epochs", "15"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    epoch_lines = [l for l in out.splitlines() if l.startswith("epoch ")]
    assert len(epoch_lines) == 15 and epoch_lines[-1].startswith("epoch 15/15")
    accuracy = float(out.split("test accuracy: ")[1].split()[0])
    assert accuracy > 0.9
    assert "samples/s" in out.split("training speed:")[1]


def test_unknown_command_fails_with_usage(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastbp", "train-everything"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "usage" in proc.stderr


def test_version(tmp_path):
    import fastbp

    proc = subprocess.run([sys.executable, "-m", "fastbp", "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fastbp {fastbp.__version__}"


def test_demo_takes_a_list_of_hidden_widths(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastbp", "demo", "--epochs", "2",
                           "--hidden", "32,16"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert "epoch 2/2" in proc.stdout, proc.stderr
    assert "(64, 32)" in proc.stdout and "(32, 16)" in proc.stdout   # summary's W shapes
    bad = subprocess.run([sys.executable, "-m", "fastbp", "demo", "--hidden", "32,x"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "comma-separated widths such as 128,64" in bad.stderr


@pytest.mark.parametrize("args,message", [
    (["demo", "--epochs", "0"], "--epochs: 0 is less than 1"),
    (["demo", "--batch-size", "-3"], "--batch-size: -3 is less than 1"),
    (["demo", "--seed", "-1"], "--seed: -1 is less than 0"),
    (["demo", "--seed", str(2 ** 32)], "--seed: 4294967296 is more than 4294967295"),
    (["demo", "--hidden", "100000000000"], "each from 1 to 2**31 - 1"),
    (["demo", "--epochs", "x"], "--epochs: 'x' is not an integer"),
    (["mpi-demo", "--sync-every", "0"], "--sync-every: 0 is less than 1"),
    (["mpi-bench", "--rounds", "0"], "--rounds: 0 is less than 1"),
    (["mpi-bench", "--epochs", "-1"], "--epochs: -1 is less than 1"),
    # above the library's bounds: tracebacks from inside the run
    (["demo", "--epochs", str(10 ** 26)], "--epochs: 1" + "0" * 26 + " is more than"),
    (["demo", "--batch-size", str(10 ** 30)], "is more than 2147483647"),
    (["bench", "--threads", str(10 ** 20)], "--threads: 1" + "0" * 20 + " is more than"),
    (["bench", "--threads", "3000000000"], "is more than 2147483647"),
    # checked before the benchmark runs, not after it
    (["bench", "--plot", "/no/such/folder/x.png"], "--plot: "),
    (["bench", "--plot", "chart.xyz"], "cannot write a figure as 'xyz'"),
])
def test_counts_out_of_range_are_usage_errors_before_anything_runs(capsys, args, message):
    # they were tracebacks from inside the run (scikit-learn's seed check,
    # an empty median, the model's own checks), or MPI_Abort on every rank
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_network_too_large_is_an_error_message_not_a_traceback(capsys):
    assert cli.main(["demo", "--epochs", "1", "--hidden", "100000,100000"]) == 1
    err = capsys.readouterr().err
    assert "not enough memory for this network" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [["demo", "--epochs", "100000"],
                                  ["bench", "--digits", "--rounds", "50", "--epochs", "300"]])
def test_ctrl_c_ends_a_command_with_one_line_and_status_130(tmp_path, args):
    """Ctrl-C ended demo and bench with a KeyboardInterrupt traceback, and
    bench --digits went on: the estimators turn it into a warning, and the
    cut-short fit was timed as a round."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "fastbp", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                             signal.default_int_handler))
    time.sleep(8)   # well inside the run (imports and first compiles done)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "fastbp: interrupted" in err and "Traceback" not in err, err
