"""scikit-learn's own tests of its MLPs, run against fastbp's drop-ins.

``sklearn/neural_network/tests/test_mlp.py`` ships in scikit-learn's wheel.
It is read from the installed scikit-learn, its one import of the
estimators is swapped for fastbp's, and it runs in a child pytest with
scikit-learn's conftest (its fixtures, such as ``global_random_seed``).
Every test in it must pass: the drop-in promise, held to scikit-learn's own
words rather than to ours.
"""
import os
import re
import subprocess
import sys

import sklearn

IMPORT = "from sklearn.neural_network import MLPClassifier, MLPRegressor"


def test_scikit_learns_mlp_tests_pass_on_fastbp(tmp_path):
    source_path = os.path.join(os.path.dirname(sklearn.__file__), "neural_network", "tests",
                               "test_mlp.py")
    with open(source_path) as f:
        source = f.read()
    # Exactly one import to swap: if scikit-learn's file changes shape, this
    # fails loudly instead of testing scikit-learn against itself.
    assert source.count(IMPORT) == 1, "scikit-learn's test_mlp.py no longer imports its " \
                                      "MLPs in one line; update this test"
    assert "sklearn.neural_network import" not in source.replace(IMPORT, "")
    swapped = source.replace(IMPORT, "from fastbp import MLPClassifier, MLPRegressor")
    (tmp_path / "test_mlp_on_fastbp.py").write_text(swapped)
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-p", "sklearn.conftest", "-q", "-rfEsxX",
         "-p", "no:cacheprovider", "test_mlp_on_fastbp.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}
    # nothing failed, errored, skipped or xfailed; scikit-learn's file marks
    # none of its MLP tests to be skipped here (pandas is installed)
    assert set(counts) <= {"passed", "warnings", "warning"}, summary
    assert counts.get("passed", 0) >= 50, summary
