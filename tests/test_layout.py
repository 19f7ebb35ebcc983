"""fastbp._layout: a built model's layers against its compiled program
(settings changed after build, shape changes, a layer in two models)."""
import copy
import gc
import weakref

import numpy as np
import pytest

import fastbp
from fastbp import callbacks as cb


def _built(seed=0):
    return fastbp.Sequential([fastbp.Dense(8, activation="tanh"), fastbp.Dense(3)],
                             seed=seed).build(4)


@pytest.mark.parametrize("change", ["narrower_last_layer", "wider_last_layer",
                                    "layer_appended", "layer_removed"])
def test_a_change_of_shape_after_build_is_refused_not_run(change):
    """The engine runs the program compiled at build; with a narrower last
    layer predict wrote past its output (a segfault or heap corruption),
    with a wider one it returned uninitialized columns."""
    net = _built()
    X = np.ones((5, 4), dtype=np.float32)
    if change == "narrower_last_layer":
        net.layers[-1].units = 1
    elif change == "wider_last_layer":
        net.layers[-1].units = 10
    elif change == "layer_appended":
        net.layers.append(fastbp.Dense(2))
    else:
        net.layers.pop()
    for call in (lambda: net.predict(X), lambda: net.evaluate(X, np.zeros((5, 3))),
                 lambda: net.fit(X, np.zeros((5, 3)), epochs=1, verbose=0), net.summary):
        with pytest.raises(ValueError, match="build"):
            call()


def test_settings_changed_after_build_are_taken_up_with_the_weights_kept(tmp_path):
    """Freezing a layer (or changing its activation) after build: training,
    predict, save and summary all use the new settings (training used to
    run the old program while save wrote the new settings)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(32, 4))
    y = rng.normal(size=(32, 3))
    net = fastbp.Sequential([fastbp.Dense(8, activation="tanh"), fastbp.Dense(3)],
                            dtype="float64", seed=0).build(4)
    W0 = net.layers[0].W.copy()
    net.layers[0].trainable = False
    net.layers[1].activation = "relu"
    net.fit(X, y, epochs=2, batch_size=8, verbose=0)
    assert np.array_equal(net.layers[0].W, W0)  # frozen
    twin = fastbp.Sequential([fastbp.Dense(8, activation="tanh", trainable=False),
                              fastbp.Dense(3, activation="relu")], dtype="float64", seed=0)
    twin.fit(X, y, epochs=2, batch_size=8, verbose=0)
    assert net.params.tobytes() == twin.params.tobytes()
    assert np.array_equal(net.predict(X), twin.predict(X))
    net.save(tmp_path / "m.fbp")
    assert np.array_equal(fastbp.load(tmp_path / "m.fbp").predict(X), net.predict(X))
    table = net.summary()
    assert "trainable=False" in table
    assert "(27 trainable)" in table  # the frozen layer's 40 are not counted


def test_a_layer_serves_one_model():
    """A layer's W and b are views into its model's parameters: a layer put
    in a second model, or twice in one, is refused (the second build took
    the layer's W and b from the first model)."""
    d1, d2 = fastbp.Dense(8, activation="tanh"), fastbp.Dense(1)
    a = fastbp.Sequential([d1, d2]).build(4)
    with pytest.raises(ValueError, match="another built model"):
        fastbp.Sequential([d1, d2]).build(4)
    d = fastbp.Dense(4)
    with pytest.raises(ValueError, match="appears twice"):
        fastbp.Sequential([d, d, fastbp.Dense(1)]).build(4)
    assert np.shares_memory(a.layers[0].W, a.params)
    a.build(4)  # rebuilding its own model is fine
    del a
    import gc
    gc.collect()
    fastbp.Sequential([d1, d2]).build(4)  # and a layer of a model that is gone is free


def test_a_model_that_dies_runs_no_python_code():
    """The owner registry was a WeakKeyDictionary, whose callback ran when a
    layer died: a Ctrl-C landing in it is printed as "Exception ignored"
    and lost. A fit whose model dies with the function that made it lost
    one in CI that way (tests/adversarial/interrupts.py, fit-sigint)."""
    net = _built()
    net.fit(np.zeros((8, 4)), np.zeros(8, dtype=int), loss="cross_entropy", epochs=1,
            verbose=0)
    for obj in [net, *net.layers]:
        refs = weakref.getweakrefs(obj)
        assert all(ref.__callback__ is None for ref in refs), (obj, refs)
    # and the registry still forgets a dead model's layers
    layers = net.layers
    del net
    gc.collect()
    fastbp.Sequential(layers).build(4)


def test_a_layer_whose_id_is_reused_is_not_taken_for_its_predecessor():
    """The registry is keyed by id(layer): a new layer that gets the id of
    a dead layer whose model is still alive must not inherit that model.
    CPython's reuse of an address cannot be forced, so the registry is
    given the entry such a reuse leaves behind."""
    from fastbp import _layout

    net = _built()
    old = net.layers[0]
    net.layers[0] = fastbp.Dense(8, activation="tanh")
    net.build(4)
    dead = weakref.ref(old)
    del old
    gc.collect()
    assert dead() is None
    fresh = fastbp.Dense(8)
    _layout._OWNERS[id(fresh)] = (dead, weakref.ref(net))  # what a reused id finds
    assert not _layout.owned(fresh)
    fastbp.Sequential([fresh, fastbp.Dense(3)]).build(4)




def test_a_refused_setting_set_back_leaves_the_model_as_it_was():
    """A setting refused at the engine's check (a dropout rate of 1) left a
    half-published program: after setting it back, predict worked but fit
    still refused "rate 1.0"."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(32, 4)), rng.normal(size=(32, 1))
    net = fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.Dropout(0.2),
                             fastbp.Dense(1)], dtype="float64", seed=0).build(4)
    before = net.program["rate"].copy()
    net.layers[1].rate = 1.0
    with pytest.raises(ValueError):
        net.predict(X)
    assert np.array_equal(net.program["rate"], before)
    net.layers[1].rate = 0.2
    net.fit(X, y, epochs=1, batch_size=8, verbose=0)
    assert np.array_equal(net.program["rate"], before)


@pytest.mark.parametrize("layer, name, value", [
    (1, "momentum", 5.0), (1, "momentum", float("nan")), (1, "eps", float("inf")),
    (0, "kernel_regularizer", {"l2": -1.0}), (0, "kernel_regularizer", "x"),
    (0, "activation", "no_such_activation"), (0, "dropconnect", 1.5),
])
def test_settings_given_after_build_are_checked_as_the_constructor_does(layer, name, value):
    """They were compiled in unchecked (a BatchNorm momentum of NaN made
    predict return NaN), or failed with an AttributeError."""
    net = fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.BatchNorm(),
                             fastbp.Dense(1)], dtype="float64", seed=0).build(4)
    setattr(net.layers[layer], name, value)
    with pytest.raises(ValueError, match="not valid"):
        net.predict(np.ones((2, 4)))


def test_a_regularizer_given_as_a_dict_after_build_is_taken_as_the_constructor_takes_it():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(16, 4)), rng.normal(size=(16, 1))
    net = fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.Dense(1)],
                            dtype="float64", seed=0).build(4)
    net.layers[0].kernel_regularizer = {"l2": 0.5}
    value, _ = net.loss_and_grad(X, y)
    twin = fastbp.Sequential([fastbp.Dense(8, activation="relu", kernel_regularizer={"l2": 0.5}),
                              fastbp.Dense(1)], dtype="float64", seed=0).build(4)
    assert value == twin.loss_and_grad(X, y)[0]
    assert isinstance(net.layers[0].kernel_regularizer, fastbp.regularizers.L1L2)


def test_a_shallow_copy_is_a_model_of_its_own():
    """copy.copy took the layers from the original (which then refused every
    call) while sharing its arrays."""
    net = fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.Dense(2)],
                            seed=0).build(4)
    X = np.ones((3, 4), dtype=np.float32)
    twin = copy.copy(net)
    assert np.array_equal(twin.predict(X), net.predict(X))
    twin.layers[0].W[...] = 0
    assert not np.array_equal(twin.predict(X), net.predict(X))
    del twin
    gc.collect()
    net.fit(X, np.zeros((3, 2)), epochs=1, verbose=0)


def test_a_setting_changed_by_a_callback_takes_effect_at_the_next_call(tmp_path):
    """Freezing a layer from a callback after the first epoch: the layer
    stays as it is from then on in the same fit (it kept training until
    the next fit), and a run resumed from the checkpoint written then ends
    with the same bits as the uninterrupted one."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(64, 4)), rng.normal(size=(64, 1))

    class Freeze(cb.Callback):
        def __init__(self):
            self.W = None

        def on_epoch_end(self, net, epoch, logs):
            if epoch == 1:
                net.layers[0].trainable = False
                self.W = net.layers[0].W.copy()

    def model():
        return fastbp.Sequential([fastbp.Dense(8, activation="tanh"), fastbp.Dense(1)],
                                 dtype="float64", seed=0)
    freeze, net = Freeze(), model()
    path = tmp_path / "run.fbp"
    net.fit(X, y, epochs=3, batch_size=8, verbose=0, callbacks=[freeze], checkpoint=path)
    assert np.array_equal(net.layers[0].W, freeze.W)
    resumed = model()
    resumed.fit(X, y, epochs=1, batch_size=8, verbose=0, checkpoint=path)
    resumed.layers[0].trainable = False
    resumed.save(path)
    resumed = fastbp.load(path)
    resumed.fit(X, y, epochs=2, batch_size=8, verbose=0)
    assert resumed.params.tobytes() == net.params.tobytes()


def test_gradcheck_takes_up_a_regularizer_given_after_build():
    """gradcheck copied the model's penalty table from the build, so its twin
    was a network without a regularizer set since (its loss 2.6 where the
    model's was 388): it checked another function than the model's."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(16, 3)), rng.normal(size=(16, 1))

    def model():
        net = fastbp.Sequential([fastbp.Dense(5, activation="tanh"), fastbp.Dense(1)],
                                dtype="float64", seed=0).build(3)
        net.layers[0].kernel_regularizer = fastbp.regularizers.L1L2(l2=100.0)
        return net

    def twin_loss(net, sync):
        seen, real = [], fastbp.Sequential.loss_and_grad
        with pytest.MonkeyPatch.context() as mp:
            def spy(self, *args, **kwargs):
                out = real(self, *args, **kwargs)
                seen.append(out[0])
                return out
            mp.setattr(fastbp.Sequential, "loss_and_grad", spy)
            if not sync:  # the control: the model's table from the build
                mp.setattr(fastbp.Sequential, "_sync_layout", lambda self: False)
            assert fastbp.gradcheck(net, X, y, indices=[0]) < 1e-6
        return seen[0]

    net = model()
    assert twin_loss(net, sync=True) == pytest.approx(net.loss_and_grad(X, y)[0], rel=1e-12)
    assert twin_loss(model(), sync=False) < 0.1 * net.loss_and_grad(X, y)[0]


def test_two_threads_building_models_that_share_a_layer_one_is_refused():
    """The check that a layer is free and the record of its new owner were
    two steps: two threads building two models that share a layer both
    passed the check, and the layer's W became a view into only one of
    them (tests/adversarial: 34 of 40 trials built both, some failed with a
    TypeError from one build putting back attributes the other set)."""
    import sys
    import threading

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads as often as possible
    try:
        for trial in range(40):
            shared = fastbp.Dense(64)
            models = [fastbp.Sequential([shared, fastbp.Dense(1)], seed=s) for s in (0, 1)]
            barrier, outcome = threading.Barrier(2), {}

            def build(i):
                barrier.wait()
                try:
                    models[i].build(64)
                    outcome[i] = "built"
                except ValueError as exc:
                    outcome[i] = str(exc)
            threads = [threading.Thread(target=build, args=(i,)) for i in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            built = [i for i in (0, 1) if outcome[i] == "built"]
            assert len(built) == 1, (trial, outcome)
            assert "belongs to another built model" in outcome[1 - built[0]]
            assert np.shares_memory(shared.W, models[built[0]].params)
            assert not models[1 - built[0]].built
    finally:
        sys.setswitchinterval(interval)


def test_a_layer_a_model_no_longer_has_or_never_got_is_free():
    """The registry outlived ownership: a layer dropped from a model rebuilt
    with a new list of layers, and the layers of a build that failed, still
    counted as that model's ("belongs to another built model")."""
    kept, dropped = fastbp.Dense(3), fastbp.Dense(3)
    net = fastbp.Sequential([dropped, fastbp.Dense(1)], seed=0).build(2)
    net.layers = [kept, fastbp.Dense(1)]
    net.build(2)
    fastbp.Sequential([dropped, fastbp.Dense(1)], seed=0).build(2)

    class Failing(fastbp.Dense):
        def _initialize(self, rng):
            raise RuntimeError("an initializer's error")
    free = fastbp.Dense(3)
    with pytest.raises(RuntimeError):
        fastbp.Sequential([free, Failing(3), fastbp.Dense(1)], seed=0).build(2)
    fastbp.Sequential([free, fastbp.Dense(1)], seed=0).build(2)
    # a failed rebuild with a new list keeps the model's old layers its own
    old = net.layers
    net.layers = [fastbp.Dense(3), Failing(3), fastbp.Dense(1)]
    with pytest.raises(RuntimeError):
        net.build(2)
    with pytest.raises(ValueError, match="belongs to another built model"):
        fastbp.Sequential([old[0], fastbp.Dense(1)]).build(2)


def test_a_fork_while_another_thread_holds_the_registry_lock_can_build():
    """The registry's lock, held by another thread at fork(), stayed held
    in the child: its first build hung."""
    import os
    import signal
    from fastbp import _layout

    _layout._OWNERS_LOCK.acquire()   # as a thread inside a build would hold it
    try:
        pid = os.fork()
        if pid == 0:   # the child: a build must not wait for a thread that is not there
            signal.alarm(20)
            try:
                fastbp.Sequential([fastbp.Dense(2)]).build(3)
                os._exit(0)
            except BaseException:
                os._exit(1)
    finally:
        _layout._OWNERS_LOCK.release()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
