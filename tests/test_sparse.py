"""A scipy.sparse X in Sequential's fit, predict, evaluate and loss_and_grad:
the same results, bit for bit, as its dense copy, without a dense copy of the
whole matrix (fit and predict densify a bounded piece of rows at a time)."""
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sparse

import fastbp
import fastbp._runner
from helpers import DTYPES, assert_close

FORMATS = {"csr": sparse.csr_matrix, "csc": sparse.csc_matrix, "coo": sparse.coo_matrix,
           "csr_array": sparse.csr_array, "lil": sparse.lil_matrix}


def _data(rng, n=300, d=12, density=0.3, classes=3):
    X = rng.normal(size=(n, d))
    X[rng.random(X.shape) > density] = 0
    return X, rng.integers(0, classes, n)


def _net(dtype, seed=1, dropout=False):
    layers = [fastbp.Dense(16, activation="relu")]
    if dropout:
        layers += [fastbp.Dropout(0.2), fastbp.BatchNorm()]
    return fastbp.Sequential(layers + [fastbp.Dense(3)], dtype=dtype, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("pieces", ["default", "one batch", "three batches"])
def test_fit_on_sparse_X_is_bitwise_the_fit_on_its_dense_copy(rng, monkeypatch, dtype, fmt,
                                                              pieces):
    """Each call into the engine densifies its rows in pieces of whole
    batches; whatever their size, the steps are those of the dense fit
    (shuffled or not, weighted, with dropout and BatchNorm)."""
    X, y = _data(rng)
    batch = 32
    if pieces != "default":
        count = {"one batch": 1, "three batches": 3}[pieces]
        monkeypatch.setattr(fastbp._runner, "_SPARSE_ELEMENTS", count * batch * X.shape[1])
    w = rng.random(len(y))
    for shuffle in (True, False):
        kw = dict(loss="cross_entropy", epochs=2, batch_size=batch, shuffle=shuffle,
                  sample_weight=w, grad_norms=True, clip_norm=1.0, verbose=0)
        dense, sp = _net(dtype, dropout=True), _net(dtype, dropout=True)
        dense.fit(X, y, **kw)
        sp.fit(FORMATS[fmt](X), y, **kw)
        np.testing.assert_array_equal(sp.params, dense.params)
        for metric in ("loss", "grad_norm"):
            assert sp.history[metric] == dense.history[metric]
        assert sp.optimizer.t == dense.optimizer.t


@pytest.mark.parametrize("dtype", DTYPES)
def test_predict_evaluate_and_validation_on_sparse_X(rng, dtype):
    """Bitwise the dense results while a piece holds a whole predict chunk
    (here: a narrow X)."""
    X, y = _data(rng)
    net = _net(dtype).build(X.shape[1])
    S = sparse.csc_matrix(X)
    np.testing.assert_array_equal(net.predict(S), net.predict(X))
    np.testing.assert_array_equal(net.predict_proba(S, loss="cross_entropy"),
                                  net.predict_proba(X, loss="cross_entropy"))
    assert net.evaluate(S, y, loss="cross_entropy") == net.evaluate(X, y, loss="cross_entropy")
    twin = _net(dtype).build(X.shape[1])
    kw = dict(loss="cross_entropy", epochs=2, verbose=0)
    net.fit(X, y, validation_data=(S, y), **kw)
    twin.fit(X, y, validation_data=(X, y), **kw)
    assert net.history["val_loss"] == twin.history["val_loss"]
    assert net.history["val_accuracy"] == twin.history["val_accuracy"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_predict_on_a_wide_sparse_X_works_in_smaller_pieces(rng, monkeypatch, dtype):
    """A wide X is made dense a few rows at a time (here 7): a dense X's
    calls of the kernels take as many, so the outputs are bitwise the same
    (products of another height may round differently: a wide sparse X's
    outputs differed from the dense one's in the last bit)."""
    X, _ = _data(rng)
    net = _net(dtype).build(X.shape[1])
    monkeypatch.setattr(fastbp.model, "_SPARSE_ELEMENTS", 7 * X.shape[1])
    got = net.predict(sparse.csr_matrix(X))
    assert got.tobytes() == net.predict(X).tobytes()



def test_loss_and_grad_and_gradcheck_on_sparse_X(rng):
    X, y = _data(rng, n=40)
    net = _net("float64")
    S = sparse.coo_matrix(X)
    assert fastbp.gradcheck(net, S, y, loss="cross_entropy") < 1e-6  # builds from S's width
    value, grad = net.loss_and_grad(S, y, loss="cross_entropy")
    value2, grad2 = net.loss_and_grad(X, y, loss="cross_entropy")
    assert value == value2
    np.testing.assert_array_equal(grad, grad2)


def test_a_full_batch_solver_takes_sparse_X(rng):
    X, _ = _data(rng, n=60, d=4)
    y = X @ np.array([1.0, -2.0, 0.5, 3.0])
    kw = dict(optimizer=fastbp.optim.LevenbergMarquardt, epochs=3, verbose=0)
    a = fastbp.Sequential([fastbp.Dense(1)], dtype="float64", seed=0)
    b = fastbp.Sequential([fastbp.Dense(1)], dtype="float64", seed=0)
    a.fit(X, y, validation_data=(X, y), **kw)
    b.fit(sparse.csr_matrix(X), y, validation_data=(sparse.csr_matrix(X), y), **kw)
    np.testing.assert_array_equal(a.params, b.params)


def test_divergence_in_the_update_rolls_back_across_pieces(rng, monkeypatch):
    """The replay from the epoch's snapshot runs through the sparse pieces
    too (here one batch a piece): the weights are exactly those after the
    last finite step (tests/test_model.py's dense case)."""
    monkeypatch.setattr(fastbp._runner, "_SPARSE_ELEMENTS", 10 * 5)
    X = rng.normal(size=(40, 5))
    y = rng.integers(0, 3, 40)
    X[:30] *= 1e-12
    X[30:] *= 1e300
    net = fastbp.Sequential([fastbp.Dense(3)], dtype="float64", seed=5).build(5)
    twin = fastbp.Sequential([fastbp.Dense(3)], dtype="float64", seed=5).build(5)
    with pytest.warns(RuntimeWarning, match="batch 4"):
        net.fit(sparse.csr_matrix(X), y, loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=1e10),
                epochs=1, batch_size=10, shuffle=False, verbose=0, on_divergence="warn")
    twin.fit(X[:30], y[:30], loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=1e10), epochs=1,
             batch_size=10, shuffle=False, verbose=0)
    np.testing.assert_array_equal(net.params, twin.params)
    assert net.optimizer.t == 3


def test_a_checkpoint_mid_epoch_continues_bitwise_on_sparse_X(rng, tmp_path):
    X, y = _data(rng)
    S = sparse.csr_matrix(X)
    whole = _net("float32")
    whole.fit(X, y, loss="cross_entropy", epochs=2, batch_size=16, verbose=0)
    path = tmp_path / "run.fbp"

    class StopMidEpoch:  # simulate an interrupted run: keep the mid-epoch checkpoint
        def on_epoch_end(self, net, epoch, logs):
            net.stop_training = True

    first = _net("float32")
    first.fit(S, y, loss="cross_entropy", epochs=1, batch_size=16, checkpoint=path,
              checkpoint_every=5, callbacks=[StopMidEpoch()], verbose=0)
    resumed = fastbp.load(path)
    resumed.fit(S, y, epochs=1, verbose=0)
    np.testing.assert_array_equal(resumed.params, whole.params)


def test_the_users_matrix_is_not_changed_even_when_not_canonical(rng):
    """Unsorted column indices and duplicate entries (which toarray adds up):
    fit canonicalizes a copy, never the matrix it was given."""
    data = np.array([1.0, 2.0, 3.0, -1.0, 0.5])
    indices = np.array([2, 0, 2, 1, 1])
    indptr = np.array([0, 3, 5])
    S = sparse.csr_matrix((data, indices, indptr), shape=(2, 3))
    assert not S.has_canonical_format
    before = (S.data.copy(), S.indices.copy(), S.indptr.copy())
    dense = S.toarray()
    a, b = _net("float64"), _net("float64")
    a.fit(S, [0, 2], loss="cross_entropy", epochs=3, verbose=0)
    b.fit(dense, [0, 2], loss="cross_entropy", epochs=3, verbose=0)
    np.testing.assert_array_equal(a.params, b.params)
    for got, want in zip((S.data, S.indices, S.indptr), before):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("make, message", [
    (lambda: sparse.csr_matrix(np.array([[0, np.nan, 1.0], [0, 0, 2.0]])),
     r"X contains NaN or infinity \(first at index \(0, 1\)\)"),
    (lambda: sparse.coo_matrix(np.array([[0, 0, 1.0], [0, 0, -np.inf]])),
     r"X contains NaN or infinity \(first at index \(1, 2\)\)"),
    (lambda: sparse.csc_matrix(np.array([[0, 0, 1.0], [1e39, 0, 0]])),
     r"X holds 1e\+39 at index \(1, 0\), beyond the range of the model's float32"),
    # duplicates whose sum overflows float32 (toarray would add them up to inf)
    (lambda: sparse.coo_matrix((np.array([3e38, 3e38]), (np.array([0, 0]), np.array([1, 1]))),
                               shape=(2, 3)),
     r"X holds 6e\+38 at index \(0, 1\), beyond the range of the model's float32"),
    # in float32, as toarray adds them: inf
    (lambda: sparse.csr_matrix((np.float32([3e38, 3e38]), [1, 1], [0, 2, 2]), shape=(2, 3)),
     r"X contains NaN or infinity \(first at index \(0, 1\)\)"),
    # in int8, as toarray adds them: -56 (X is what X.toarray() is)
    (lambda: sparse.csr_matrix((np.int8([100, 100]), [1, 1], [0, 0, 2]), shape=(2, 3)),
     "no error: int8's wrapped -56, as toarray gives"),
    (lambda: sparse.csr_matrix(np.ones((2, 3), dtype=complex)), "complex"),
    (lambda: sparse.csr_matrix(np.ones((2, 4))), "X has 4 features, but the model expects 3"),
    (lambda: sparse.csr_matrix((0, 3)), "X is empty"),
    (lambda: sparse.coo_array(np.ones(3)), r"X must be 2-D .*sparse array of shape \(3,\)"),
])
def test_bad_sparse_X_is_named_by_row_and_column(make, message):
    net = fastbp.Sequential([fastbp.Dense(2)], dtype="float32", seed=0).build(3)
    before = net.params.copy()
    X = make()
    if message.startswith("no error"):
        expected = net.predict(X.toarray())
        assert X.toarray()[1, 1] == -56
        np.testing.assert_array_equal(net.predict(X), expected)
        return
    for call in (lambda: net.fit(X, np.zeros((X.shape[0], 2)), verbose=0),
                 lambda: net.predict(X)):
        with pytest.raises(ValueError, match=message):
            call()
    np.testing.assert_array_equal(net.params, before)


def test_fit_on_sparse_X_holds_a_piece_not_the_whole_matrix_dense(rng):
    """A 20,000 x 2,000 matrix with 0.1% non-zeros is 160 MB dense in
    float32 (320 MB in float64, toarray's dtype): fit's peak of traced
    memory (numpy reports its buffers to tracemalloc) stays at its 16 MB
    piece plus small change."""
    n, d = 20_000, 2_000
    S = sparse.random(n, d, density=0.001, format="csr", random_state=0, dtype=np.float32)
    y = rng.integers(0, 2, n)
    net = fastbp.Sequential([fastbp.Dense(4, activation="relu"), fastbp.Dense(2)], seed=0)
    net.fit(S[:512], y[:512], loss="cross_entropy", batch_size=256, verbose=0)  # warm up
    tracemalloc.start()
    try:
        net.fit(S, y, loss="cross_entropy", epochs=1, batch_size=256, verbose=0)
        net.predict(S)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dense_bytes = n * d * 4
    assert peak < dense_bytes / 4, f"peak {peak / 1e6:.1f} MB"
    assert net.history.n_epochs == 2


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
@pytest.mark.parametrize("source", ["float64", "float32", "int8", "int64"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_duplicates_and_unsorted_indices_are_taken_as_toarray_takes_them(fmt, source, dtype):
    """fastbp summed duplicate entries itself, in float64 after scipy's
    sort (whose order is not toarray's), and converted an unsorted matrix
    through float64: its X differed from X.toarray() (float64 COO by an ulp,
    1e8 + 1 - 1e8 in float32 gave 1 against 0, int8 100 + 100 gave 200
    against -56, an overflowing float32 sum was accepted), against the
    promise of bitwise toarray results (tests/adversarial: 8,280 of 36,000
    random matrices)."""
    from fastbp._validation import check_sparse_X

    rng = np.random.default_rng(7)
    for trial in range(20):
        n, d, nnz = 5, 4, 40
        rows, cols = rng.integers(0, n, nnz), rng.integers(0, d, nnz)
        if source.startswith("int"):
            values = rng.integers(-120, 120, nnz)
        else:
            values = rng.choice([1e8, 1.0, -1e8, 0.1, -0.0, 3e-8, 1e16, -1e16], nnz)
        values = values.astype(source)
        X = sparse.coo_matrix((values, (rows, cols)), shape=(n, d))
        if fmt != "coo":   # duplicates and unsorted indices kept, as stored
            major, minor = (rows, cols) if fmt == "csr" else (cols, rows)
            order = np.argsort(major, kind="stable")
            indptr = np.concatenate([[0], np.cumsum(np.bincount(major, minlength=X.shape[
                0 if fmt == "csr" else 1]))])
            cls = sparse.csr_matrix if fmt == "csr" else sparse.csc_matrix
            X = cls((values[order], minor[order], indptr), shape=(n, d))
        with np.errstate(over="ignore", invalid="ignore"):
            dense = X.toarray().astype(dtype)
        if not np.isfinite(dense).all():
            with pytest.raises(ValueError, match="NaN or infinity|beyond"):
                check_sparse_X(X, np.dtype(dtype))
            continue
        got = check_sparse_X(X, np.dtype(dtype))
        assert got.has_canonical_format
        assert got.toarray().tobytes() == dense.tobytes(), (trial, X.toarray(), got.toarray())


def test_predict_on_a_wide_sparse_X_is_bitwise_the_dense_ones():
    """At the default sizes: 167 rows of 50,000 features make pieces of 83
    rows, and the last row's outputs (and evaluate) differed from the
    dense X's in the last bit."""
    Xs = sparse.random(167, 50_000, density=0.01, format="csr", dtype=np.float32,
                       random_state=0)
    y = np.random.default_rng(0).integers(0, 3, 167)
    net = fastbp.Sequential([fastbp.Dense(16, activation="relu"), fastbp.Dense(3)],
                            seed=0).build(50_000)
    assert net.predict(Xs).tobytes() == net.predict(Xs.toarray()).tobytes()
    assert (net.evaluate(Xs, y, loss="cross_entropy")
            == net.evaluate(Xs.toarray(), y, loss="cross_entropy"))
