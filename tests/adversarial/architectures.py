"""Random architectures against the engine's interface and the compiled program.

Each trial draws a network of every layer kind (Dense with any activation,
DropConnect, frozen, weight and activity penalties; Dropout; BatchNorm with
odd momentum and eps; Residual blocks, nested), sometimes an invalid one (a
block that changes its width, a last layer that is not Dense, an empty
block), a dtype and data, then checks what crosses the Python / compiled
boundary by name:

* ``net.program``: every column agrees with the layers (kinds, widths,
  activation codes, rates, momentum, eps, trainable, and the offsets, which
  must be where the layers' views sit), and is read-only;
* the engine against ``fastbp.reference`` driven by the same program:
  ``predict``, ``loss_and_grad``, and one epoch of SGD ``fit`` (dropout and
  DropConnect masks included) in float64 for networks without an activity
  penalty (see the comment at that check);
* ``summary()`` and ``str(net)``; a save / load round trip and a pickle
  round trip give the same program, buffers and predictions, with the
  layers' views bound to the new model's arrays.

Trials run in child processes, many per child, each outcome reported as it
happens, so a crash or hang is pinned on its trial.  Outcomes: "ok" (with
", fit checked" when the fit was held to the reference's) or "ValueError"
(an invalid architecture refused at construction or build); anything else,
a crash or a hang is a failure.

    python tests/adversarial/architectures.py --trials 1000
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

HANG_SECONDS = 60

CHILD = r"""
import io, os, pickle, random, sys, tempfile, warnings, numpy as np, fastbp
from fastbp import reference, regularizers
from fastbp._ext.engine import ACTIVITY_L1, Act, Kind
warnings.simplefilter("ignore")
# seed: set by the trial loop _children.run_trials appends
ACTS = [a.name.lower() for a in Act]
TMP = tempfile.mkdtemp()

def dense(rng, units):
    reg = lambda: rng.choice([None, regularizers.L1L2(l1=rng.choice([0, 1e-3]),
                                                      l2=rng.choice([0, 1e-2]))])
    return fastbp.Dense(units, activation=rng.choice(ACTS + [None]),
                        dropconnect=rng.choice([0.0, 0.0, 0.3, 0.9]),
                        trainable=rng.random() > 0.2, kernel_regularizer=reg(),
                        activity_regularizer=rng.choice([None, regularizers.L1L2(l1=1e-3)]))

def block(rng, width, depth):
    # layers that keep the width (a Residual's body), sometimes one that does not
    out = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["dense", "dropout", "batchnorm", "residual"] if depth < 2
                          else ["dense", "dropout", "batchnorm"])
        if kind == "dense":
            out.append(dense(rng, width if rng.random() > 0.05 else width + 1))
        elif kind == "dropout":
            out.append(fastbp.Dropout(rng.choice([0.0, 0.1, 0.5, 0.95])))
        elif kind == "batchnorm":
            out.append(fastbp.BatchNorm(momentum=rng.choice([1e-6, 0.1, 1.0]),
                                        eps=rng.choice([1e-12, 1e-5, 0.1, 3.0]),
                                        trainable=rng.random() > 0.2))
        else:
            out.append(fastbp.Residual(block(rng, width, depth + 1)))
    return out

def architecture(rng):
    # (layers, n_features)
    layers, width = [], rng.randint(1, 6)
    n_features = width
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["dense", "dense", "dropout", "batchnorm", "residual"])
        if kind == "dense":
            width = rng.randint(1, 9)
            layers.append(dense(rng, width))
        elif kind == "residual":
            layers.append(fastbp.Residual(block(rng, width, 0)))
        else:
            layers += block(rng, width, 2)[:1]
    if rng.random() > 0.05:  # else the last layer may not be Dense: refused
        layers.append(fastbp.Dense(rng.randint(2, 4)))
    return layers, n_features

def close(a, b, rtol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return False
    both = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return False
    scale = max(np.abs(b[both]).max(initial=0.0), 1.0)
    return np.abs(a[both] - b[both]).max(initial=0.0) <= rtol * scale

def offset(view, base):
    return (view.__array_interface__["data"][0]
            - base.__array_interface__["data"][0]) // base.itemsize

def check_program(net):
    p, dtype = net.program, net.dtype.type
    if p.rows.flags.writeable or p.floats.flags.writeable:
        return "program writable"
    for l, layer in enumerate(net.layers):
        if p["kind"][l] != layer.kind or p["n_in"][l] != layer.n_in or p["n_out"][l] != layer.units:
            return f"row {l}: kind or widths"
        if layer.kind == Kind.DENSE:
            if (p["act"][l] != fastbp.activations.code(layer.activation)
                    or p["rate"][l] != layer.dropconnect
                    or p["trainable"][l] != layer.trainable
                    or offset(layer.W, net.params) != p["w_off"][l]
                    or offset(layer.b, net.params) != p["b_off"][l]):
                return f"dense row {l}"
        elif layer.kind == Kind.DROPOUT:
            if p["rate"][l] != layer.rate:
                return f"dropout row {l}"
        elif layer.kind == Kind.BATCHNORM:
            if (p["momentum"][l] != layer.momentum or p["eps"][l] != float(dtype(layer.eps))
                    or offset(layer.gamma, net.params) != p["w_off"][l]
                    or offset(layer.beta, net.params) != p["b_off"][l]
                    or offset(layer.running_mean, net._buffers) != p["buf_off"][l]):
                return f"batchnorm row {l}"
        elif net.layers[p["w_off"][l]].kind not in (Kind.RES_BEGIN, Kind.RES_END):
            return f"residual row {l}: partner"
    if p.n_params != net.n_params or p.n_buffers != net._buffers.size:
        return "sizes"
    return None

def trial(i):
    rng = random.Random(seed * 1_000_003 + i)
    try:
        layers, d = architecture(rng)
        net = fastbp.Sequential(layers, dtype=rng.choice(["float32", "float64"]), seed=i)
        net.build(d)
    except ValueError:
        return "ValueError"
    dtype = net.dtype.name
    n, k = 2 * rng.randint(2, 12), net.n_outputs
    data = np.random.default_rng(i)
    X = data.normal(size=(n, d))
    y = data.integers(0, k, n)
    Y = np.eye(k)[y]
    for layer in net.layers:  # running statistics away from their start
        if layer.kind == Kind.BATCHNORM:
            layer.running_mean[...] = data.normal(size=layer.units)
            layer.running_var[...] = data.uniform(0.2, 3, layer.units)
    bad = check_program(net)
    if bad:
        return "FAIL program: " + bad
    rtol = 1e-4 if dtype == "float32" else 1e-9
    Xd = X.astype(dtype)
    ref_out = reference.forward_all(net._program, Xd, net.params, net._floats,
                                    buffers=net._buffers.copy())[0][-1]
    if not close(net.predict(X), ref_out, rtol):
        return "FAIL predict != reference"
    value, grad = net.loss_and_grad(X, y, loss="cross_entropy")
    ref_value, ref_grad = reference.loss_grad(Xd, Y.astype(dtype), net._program, net.params,
                                              "cross_entropy", reg=net._reg,
                                              floats=net._floats, buffers=net._buffers.copy())
    if not (close(value, ref_value, rtol) and close(grad, ref_grad, 100 * rtol)):
        return "FAIL loss_and_grad != reference"
    text = net.summary()
    if str(net) != text or len(text.splitlines()) != len(net.layers) + 3:
        return "FAIL summary"
    path = os.path.join(TMP, f"{i}.fbp")
    net.save(path)
    for twin in (fastbp.load(path), pickle.loads(pickle.dumps(net))):
        if not (np.array_equal(twin.program.rows, net.program.rows)
                and np.array_equal(twin.program.floats, net.program.floats)
                and np.array_equal(twin._buffers, net._buffers)
                and np.array_equal(twin.predict(X), net.predict(X))):
            return "FAIL round trip"
        bad = check_program(twin)
        if bad:
            return "FAIL round trip program: " + bad
    os.remove(path)
    # One epoch of SGD against the reference's, in float64.  Not with an
    # activity penalty: its subgradient c/m sign(a) jumps at a = 0, and a
    # Dense row whose weights DropConnect all dropped outputs its bias alone,
    # which is roundoff when a BatchNorm follows (the bias's true gradient is
    # 0): the two paths then differ by 2c in a step, legitimately.
    if dtype == "float64" and not net._reg[:, ACTIVITY_L1].any():
        batch = rng.choice([2, 4, n])
        params, counter = net.params.copy(), net._dropout_rng.copy()
        buffers = net._buffers.copy()
        def sgd(p, g):
            p -= 0.01 * g
        reference.train_batches(X, Y, np.arange(n), batch, net._program, params,
                                "cross_entropy", sgd, floats=net._floats, counter=counter,
                                reg=net._reg, buffers=buffers)
        try:
            net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=0.01), epochs=1,
                    batch_size=batch, shuffle=False, verbose=0)
        except fastbp.DivergenceError:
            if np.isfinite(params).all():
                return "FAIL diverged where the reference did not"
            return "ok, both diverged"
        if not (close(net.params, params, 1e-7) and close(net._buffers, buffers, 1e-7)):
            return "FAIL fit != reference"
        return "ok, fit checked"
    return "ok"
"""


def run(trials=1000, seed=0, per_child=250):
    """Returns (counts, failures) (``_children.run_trials``)."""
    return _children.run_trials(CHILD, trials, seed, per_child, HANG_SECONDS)


def main(argv=None):
    return _children.command_line(run, __doc__, 1000, argv)


if __name__ == "__main__":
    sys.exit(main())
