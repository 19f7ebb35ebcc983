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
])
def test_counts_out_of_range_are_usage_errors_before_anything_runs(capsys, args, message):
    # they were tracebacks from inside the run (scikit-learn's seed check,
    # an empty median, the model's own checks), or MPI_Abort on every rank
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
