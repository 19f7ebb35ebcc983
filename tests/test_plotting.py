"""fastbp.plot_history marks the epoch whose weights the model holds and says
why the fit stopped (tests/test_callbacks.py covers panels, files and
metrics)."""
import numpy as np
import pytest

import fastbp
from fastbp.callbacks import EarlyStopping


def _fit_with_early_stopping(restore):
    """A fit that overfits from its first epochs, stopped by EarlyStopping."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 10))
    y = (X[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(int)
    Xv = rng.normal(size=(100, 10))
    yv = (Xv[:, 0] + 0.5 * rng.normal(size=100) > 0).astype(int)
    net = fastbp.Sequential([fastbp.Dense(64, activation="relu"),
                             fastbp.Dense(64, activation="relu"), fastbp.Dense(2)], seed=0)
    stop = EarlyStopping(patience=3, restore_best_weights=restore)
    net.fit(X, y, loss="cross_entropy", epochs=100, optimizer=fastbp.optim.Adam(lr=1e-2),
            validation_data=(Xv, yv), callbacks=[stop], verbose=0)
    return net, stop


def _marks(fig):
    """Per panel: x of the dashed line, and the rings' (x, y) points."""
    out = []
    for ax in fig.get_axes():
        (line,) = [c for c in ax.collections if c.get_linestyle()[0][1] is not None]
        xs = {float(seg[0][0]) for seg in line.get_segments()}
        rings = [tuple(map(float, p)) for c in ax.collections if c is not line
                 for p in c.get_offsets()]
        out.append((xs, rings))
    return out


def test_the_restored_best_epoch_is_marked_not_the_last():
    """plot_history drew no mark: a reader could not tell that the model
    holds epoch 1's weights, not those of the last epoch plotted."""
    net, stop = _fit_with_early_stopping(restore=True)
    best, last = stop.best_epoch, net.history.epoch[-1]
    assert best < last  # (the data make it stop after its best epoch)
    assert net.history.weights_epoch == best
    fig = fastbp.plot_history(net)
    title = fig.get_suptitle()
    assert title.startswith(f"Weights held: epoch {best} (the best, restored by EarlyStopping)")
    for (xs, rings), ax in zip(_marks(fig), fig.get_axes()):
        assert xs == {best}
        i = net.history.epoch.index(best)
        expected = [(best, net.history[line.get_label()][i]) for line in ax.get_lines()]
        assert np.array(rings) == pytest.approx(np.array(expected))
    assert [line.get_label() for line in fig.get_axes()[0].get_lines()] == ["loss", "val_loss"]


def test_without_a_restore_the_last_epoch_is_marked():
    net, stop = _fit_with_early_stopping(restore=False)
    last = net.history.epoch[-1]
    assert net.history.weights_epoch is None
    fig = fastbp.plot_history(net.history)
    assert fig.get_suptitle().startswith(f"Weights held: epoch {last} (the last)")
    assert all(xs == {last} for xs, _ in _marks(fig))


def test_a_later_epoch_replaces_the_restored_one():
    net, stop = _fit_with_early_stopping(restore=True)
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(20, 10)), rng.integers(0, 2, 20)
    net.fit(X, y, epochs=1, validation_data=(X, y), verbose=0)
    assert net.history.weights_epoch is None
    assert "(the last)" in fastbp.plot_history(net).get_suptitle()


def test_the_stop_reason_is_in_the_title():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(64, 5)), rng.normal(size=(64, 3)) * 100
    net = fastbp.Sequential([fastbp.Dense(8, activation="tanh"), fastbp.Dense(3)],
                            dtype="float64", seed=0)
    with pytest.warns(RuntimeWarning):
        net.fit(X, y, optimizer=fastbp.optim.SGD(lr=100.0), epochs=500, verbose=0,
                on_divergence="warn")
    reason = net.history.stop_reason
    assert reason.startswith("training diverged")
    title = fastbp.plot_history(net).get_suptitle()
    lines = title.split("\n")
    assert len(lines) >= 3 and all(len(line) <= 80 for line in lines[1:])  # wrapped
    assert " ".join(lines[1:]) == f"Stopped: {reason}"


def test_a_pickled_history_from_before_weights_epoch_still_plots():
    net, _ = _fit_with_early_stopping(restore=False)
    del net.history.weights_epoch  # as unpickled from an older fastbp
    assert "(the last)" in fastbp.plot_history(net).get_suptitle()


def test_plot_history_that_fails_to_render_leaves_the_old_file(tmp_path, monkeypatch):
    """The file was opened (truncated) before the figure was drawn: a format
    that failed to render (pgf without LaTeX) left it empty."""
    X = np.random.default_rng(0).normal(size=(32, 3))
    y = X[:, :1]
    net = fastbp.Sequential([fastbp.Dense(4, activation='tanh'), fastbp.Dense(1)], seed=0)
    net.fit(X, y, epochs=2, loss='mse', batch_size=16, verbose=0)
    path = tmp_path / "curves.png"
    path.write_bytes(b"the old figure")
    import matplotlib.figure

    def failing(self, *args, **kwargs):
        raise RuntimeError("LaTeX is not installed")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing)
    with pytest.raises(RuntimeError, match="LaTeX"):
        fastbp.plot_history(net.history, path)
    assert path.read_bytes() == b"the old figure"


@pytest.mark.parametrize("metrics", [[["loss"]], [1], [None]])
def test_metrics_that_are_not_names_are_a_value_error(metrics):
    """A list in the list failed as unhashable (a TypeError), where the
    docstring promises a ValueError for metrics it cannot plot."""
    X = np.random.default_rng(0).normal(size=(32, 3))
    net = fastbp.Sequential([fastbp.Dense(2)], seed=0)
    net.fit(X, X[:, :2], epochs=1, loss="mse", verbose=0)
    with pytest.raises(ValueError, match="names of recorded metrics"):
        fastbp.plot_history(net.history, metrics=metrics)
