"""Checkpoints, resume and Ctrl-C: an interrupted run, resumed, ends with a
model bitwise identical to the uninterrupted run (same thread count)."""
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import fastbp


def _data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 10))
    y = (X[:, :3].sum(axis=1) > 0).astype(int) + (X[:, 3] > 1)
    return X, y


def _net(seed=3):
    return fastbp.Sequential([fastbp.Dense(32, activation="tanh"), fastbp.Dense(32, activation="relu"),
                              fastbp.Dense(3)], dtype="float64", seed=seed)


FIT = dict(loss="cross_entropy", batch_size=10, verbose=0)


def _reference(epochs, X, y):
    net = _net()
    net.fit(X, y, optimizer=fastbp.optim.Adam(lr=1e-3), epochs=epochs, **FIT)
    return net


@contextlib.contextmanager
def _crash_after_saves(n):
    """A crash (RuntimeError) right after the fit's n-th checkpoint is
    written; the block must end in it."""
    real_save, count = fastbp.Sequential.save, []

    def save_then_crash(self, p):
        real_save(self, p)
        count.append(1)
        if len(count) == n:
            raise RuntimeError("simulated crash")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastbp.Sequential, "save", save_then_crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            yield


def test_mid_epoch_checkpoint_resumes_bitwise(tmp_path):
    X, y = _data()
    ref = _reference(3, X, y)
    path = tmp_path / "run.fbp"
    saves = []
    real_save = fastbp.Sequential.save

    def crash_on_the_sixth_save(self, p):
        saves.append(self._position and dict(self._position))
        if len(saves) == 6:
            raise RuntimeError("simulated crash")
        real_save(self, p)

    net = _net()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastbp.Sequential, "save", crash_on_the_sixth_save)
        with pytest.raises(RuntimeError, match="simulated crash"):
            net.fit(X, y, optimizer=fastbp.optim.Adam(lr=1e-3), epochs=3, checkpoint=path,
                    checkpoint_every=70, **FIT)
    # 300 batches per epoch: saves after batches 70, 140, 210, 280, end of epoch 1, 70 of epoch 2
    assert saves[4] is None and saves[3]["batch"] == 280
    resumed = fastbp.load(path)  # the 5th save: end of epoch 1
    assert resumed.history.n_epochs == 1 and resumed._position is None
    resumed.fit(X, y, epochs=2, **FIT)
    np.testing.assert_array_equal(resumed.params, ref.params)

    # and from a checkpoint written in the middle of an epoch
    with _crash_after_saves(2):
        _net().fit(X, y, optimizer=fastbp.optim.Adam(lr=1e-3), epochs=3, checkpoint=path,
                   checkpoint_every=70, **FIT)
    mid = fastbp.load(path)
    assert mid._position["epoch"] == 1 and mid._position["batch"] == 140
    mid.fit(X, y, epochs=3 - mid.history.n_epochs, **FIT)
    np.testing.assert_array_equal(mid.params, ref.params)
    assert mid.optimizer.t == ref.optimizer.t == 900
    assert mid.history["loss"] == pytest.approx(ref.history["loss"], rel=1e-12)


def test_ctrl_c_stops_at_a_step_boundary_and_fit_continues_bitwise():
    X, y = _data()
    epochs = 200  # about 1.5 s: the interrupt lands well inside the fit
    ref = _reference(epochs, X, y)
    net = _net()
    timer = threading.Timer(0.25, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            net.fit(X, y, optimizer=fastbp.optim.Adam(lr=1e-3), epochs=epochs, **FIT)
    finally:
        timer.cancel()
    assert "interrupted" in net.history.stop_reason
    done = net.history.n_epochs
    assert done < epochs
    assert np.isfinite(net.params).all()
    assert net.optimizer.t == done * 300 + (net._position["batch"] if net._position else 0)
    net.fit(X, y, epochs=epochs - done, **FIT)
    np.testing.assert_array_equal(net.params, ref.params)
    assert net.history.n_epochs == epochs


def test_resume_with_other_data_is_refused(tmp_path):
    X, y = _data()
    net = _net()
    net._position = {"epoch": 1, "batch": 5, "rng_state": None, "loss_sum": 0.0,
                     "n_samples": 999, "batch_size": 10, "shuffle": True}
    with pytest.raises(ValueError, match="unfinished epoch"):
        net.fit(X, y, **FIT)
    net.discard_partial_epoch()
    net.fit(X, y, **FIT)


def test_checkpoint_every_needs_a_path():
    X, y = _data(100)
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpoint path"):
        _net().fit(X, y, checkpoint_every=3, **FIT)


CHILD = textwrap.dedent("""
    import sys, numpy as np, fastbp
    sys.path.insert(0, {tests!r})
    from test_checkpoint import _data, _net, FIT
    import time
    save = fastbp.Sequential.save

    def slow_save(self, path):  # keeps the run long enough to be killed inside it
        save(self, path)
        time.sleep(0.01)
    fastbp.Sequential.save = slow_save
    X, y = _data()
    net = _net()
    print("started", flush=True)
    net.fit(X, y, optimizer=fastbp.optim.Adam(lr=1e-3), epochs=100, checkpoint={path!r},
            checkpoint_every=50, **FIT)
""")


@pytest.mark.slow
def test_sigkill_during_training_then_resume_from_the_checkpoint(tmp_path):
    """A real crash: the training process is killed; the checkpoint it left
    loads, and finishing the run gives the uninterrupted run's weights."""
    X, y = _data()
    path = str(tmp_path / "ckpt.fbp")
    code = CHILD.format(tests=os.path.dirname(__file__), path=path)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"started"
    deadline = time.time() + 60
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.15)  # the child's 700 saves take > 7 s: the kill lands inside the run
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    net = fastbp.load(path)
    assert net.history.n_epochs < 100
    net.fit(X, y, epochs=100 - net.history.n_epochs, **FIT)
    ref = _reference(100, X, y)
    np.testing.assert_array_equal(net.params, ref.params)


# -- the README's resume command (issue 13, item 9) ----------------------------------
SETTINGS = dict(loss="cross_entropy", batch_size=64, clip_norm=0.5, clip_value=2.0,
                shuffle=True, n_threads=1)
E = 3


def _crash_on_save(count, real_save):
    """A Sequential.save that raises at its ``count``-th call (after writing
    the ones before): a crash at a known checkpoint."""
    calls = []

    def save(self, path):
        calls.append(self._position and dict(self._position))
        if len(calls) == count:
            raise RuntimeError("simulated crash")
        real_save(self, path)
    return save, calls


@pytest.mark.parametrize("crash_at_save", [2, 3], ids=["mid-epoch", "end-of-epoch"])
def test_readme_resume_command_is_bitwise_exact(tmp_path, capsys, crash_at_save):
    """``fastbp.load("run.fbp").fit(X, y, epochs=E - net.history.n_epochs)``, as the
    README writes it, for a cross-entropy classifier trained with batch_size=64,
    clipping and shuffling: the loaded model resumes with the settings it was
    trained with (it used to raise: fit's default loss is mse; and the default
    batch size silently changed the run)."""
    X, y = _data(n=1000)  # 16 batches of 64 per epoch
    ref = _net()
    ref.fit(X, y, optimizer=fastbp.optim.Adam(lr=3e-3), epochs=E, verbose=0, **SETTINGS)
    path = str(tmp_path / "run.fbp")
    save, calls = _crash_on_save(crash_at_save + 1, fastbp.Sequential.save)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastbp.Sequential, "save", save)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _net().fit(X, y, optimizer=fastbp.optim.Adam(lr=3e-3), epochs=E, verbose=0,
                       checkpoint=path, checkpoint_every=6, **SETTINGS)
    # saves: after batches 6 and 12 of epoch 1, then at its end; the next one crashes
    assert [c and c["batch"] for c in calls] == [6, 12, None, 6][:crash_at_save + 1]
    net = fastbp.load(path)
    assert (net._position is not None) == (crash_at_save != 3)
    net.fit(X, y, epochs=E - net.history.n_epochs)  # the README's command, verbatim
    capsys.readouterr()
    np.testing.assert_array_equal(net.params, ref.params)
    assert net.optimizer.t == ref.optimizer.t == E * 16
    assert net.history["loss"] == pytest.approx(ref.history["loss"], rel=1e-12)


def test_a_model_fitted_before_continues_with_its_settings():
    """In one process, as after loading: fit again with only the data."""
    X, y = _data(n=1000)
    ref = _net()
    ref.fit(X, y, optimizer=fastbp.optim.Adam(lr=3e-3), epochs=E, verbose=0, **SETTINGS)
    net = _net()
    net.fit(X, y, optimizer=fastbp.optim.Adam(lr=3e-3), epochs=1, verbose=0, **SETTINGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: nothing to warn about
        net.fit(X, y, epochs=1, verbose=0)
        net.fit(X, y, epochs=1, verbose=0, **SETTINGS)
    np.testing.assert_array_equal(net.params, ref.params)


def test_a_different_setting_on_resume_warns_and_is_used(tmp_path):
    X, y = _data(n=1000)
    net = _net()
    net.fit(X, y, optimizer=fastbp.optim.Adam(lr=3e-3), epochs=1, verbose=0,
            checkpoint=tmp_path / "run.fbp", **SETTINGS)
    loaded = fastbp.load(tmp_path / "run.fbp")
    with pytest.warns(fastbp.ResumeWarning, match=r"batch_size=32 \(it was trained with "
                                                  r"batch_size=64\)"):
        loaded.fit(X, y, epochs=1, verbose=0, batch_size=32)
    assert loaded.optimizer.t == 16 + 32  # 1000 rows in batches of 32
    with pytest.warns(fastbp.ResumeWarning, match="clip_norm=None.*shuffle=False|"
                                                  "shuffle=False.*clip_norm=None"):
        loaded.fit(X, y, epochs=1, verbose=0, shuffle=False, clip_norm=None)
    with pytest.warns(fastbp.ResumeWarning, match="sample weights"):
        loaded.fit(X, y, epochs=1, verbose=0, sample_weight=np.ones(len(y)))
    # the settings now recorded are the last fit's: no warning when they are kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.fit(X, y, epochs=1, verbose=0, sample_weight=np.ones(len(y)))


def test_a_resumed_unfinished_epoch_with_other_settings_is_refused(tmp_path):
    X, y = _data(n=1000)
    path = tmp_path / "run.fbp"
    save, _ = _crash_on_save(2, fastbp.Sequential.save)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastbp.Sequential, "save", save)
        with pytest.raises(RuntimeError):
            _net().fit(X, y, epochs=2, verbose=0, checkpoint=path, checkpoint_every=6,
                       **SETTINGS)
    net = fastbp.load(path)
    with pytest.raises(ValueError, match="unfinished epoch of 1000 samples in batches of 64"):
        net.fit(X, y, epochs=1, verbose=0, batch_size=100)
    net.fit(X, y, epochs=1, verbose=0)  # its own settings finish that epoch
    assert net._position is None and net.history.n_epochs == 1


def test_a_model_trained_with_grad_norms_saves_and_resumes_after_an_epoch(tmp_path):
    """grad_norm holds a list (a number per layer) each epoch, and the file
    format took numbers only: once an epoch had ended, save, a fit's
    checkpoint and ModelCheckpoint all failed ("must be a number, got
    list"); a checkpointed fit with grad_norms died at its first epoch's
    end. The test above only saved within the first epoch."""
    X, y = _data(n=600)
    ref = _net()
    ref.fit(X, y, optimizer=fastbp.optim.Adam(lr=1e-3), epochs=3, grad_norms=True, **FIT)
    path = tmp_path / "run.fbp"
    net = _net()
    with _crash_after_saves(2):   # the checkpoints after epochs 1 and 2, then a crash
        net.fit(X, y, optimizer=fastbp.optim.Adam(lr=1e-3), epochs=3, checkpoint=path,
                grad_norms=True, **FIT)
    mid = fastbp.load(path)
    assert mid.history.n_epochs == 2
    assert mid.history["grad_norm"] == ref.history["grad_norm"][:2]
    mid.fit(X, y, epochs=1, **FIT)
    np.testing.assert_array_equal(mid.params, ref.params)
    assert mid.history["grad_norm"] == ref.history["grad_norm"]
    ref.save(tmp_path / "ref.fbp")
    assert fastbp.load(tmp_path / "ref.fbp").history["grad_norm"] == ref.history["grad_norm"]


@pytest.mark.parametrize("through", ["file", "memory"])
def test_a_resumed_epoch_records_the_uninterrupted_grad_norms(tmp_path, through):
    """A mid-epoch position also holds the gradient norms summed so far and
    the updates made, so the resumed epoch's grad_norm is the mean over all
    of it, bit for bit (it covered only the batches after the position)."""
    X, y = _data()
    ref = _net()
    ref.fit(X, y, optimizer=fastbp.optim.Adam(lr=1e-3), epochs=2, grad_norms=True, **FIT)
    path = tmp_path / "run.fbp"
    net = _net()
    with _crash_after_saves(2):
        net.fit(X, y, optimizer=fastbp.optim.Adam(lr=1e-3), epochs=2, checkpoint=path,
                checkpoint_every=70, grad_norms=True, **FIT)
    mid = fastbp.load(path) if through == "file" else net
    assert mid._position["batch"] == 140 and mid._position["steps"] == 140
    assert len(mid._position["grad_norm_sums"]) == 3
    mid.fit(X, y, epochs=2 - mid.history.n_epochs, **FIT)
    np.testing.assert_array_equal(mid.params, ref.params)
    assert mid.history["grad_norm"] == ref.history["grad_norm"]
    assert mid.history["loss"] == ref.history["loss"]
