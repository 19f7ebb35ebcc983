"""The cases fastbp is held to torch on, shared by the tests and the script
that records torch's results (``tests/fixtures/make_torch_fixtures.py``).

The ordinary test suite does not need torch: that script runs each case
below in torch 2.13.0 and writes torch's inputs and results to
``tests/fixtures/torch_*.npz``; the tests run fastbp on the recorded inputs
and compare with the recorded results.  ``.ci/run`` installs torch,
regenerates the files and fails if they differ from the committed ones, so
they cannot go stale.

Every recorded case carries its *spec* (a JSON string of everything that
defines it).  A test computes the spec from the case lists here and checks it
against the recorded one, so a case changed here without regenerating fails
with the command to run, instead of comparing against another case's numbers.

Nothing here imports torch.
"""
import json
from pathlib import Path

import numpy as np

#: the torch release the fixtures are recorded with (the ``test`` extra's pin before)
TORCH_VERSION = "2.13.0"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REGENERATE = ("pip install torch==2.13.0 && python tests/fixtures/make_torch_fixtures.py "
              "(from the repository root)")


# --- recorded files ----------------------------------------------------------------
def load(name, folder=FIXTURES):
    """All arrays of ``<folder>/<name>.npz`` as a dict (read without pickle)."""
    with np.load(Path(folder) / f"{name}.npz", allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def spec_json(spec):
    """The canonical text of a case's spec (tuples become lists, keys sorted)."""
    return json.dumps(spec, sort_keys=True)


def check_spec(fixture, key, spec):
    """Fail unless ``fixture`` records the case ``key`` with exactly this spec."""
    recorded = fixture.get(f"{key}/spec")
    assert recorded is not None, f"no recorded torch result for {key!r}: run {REGENERATE}"
    assert str(recorded) == spec_json(spec), (
        f"the recorded torch result for {key!r} is of another case "
        f"({recorded} != {spec_json(spec)}): run {REGENERATE}")


# --- weights in fastbp's layout ------------------------------------------------------
def chain(n_in, units):
    """(n_in, n_out) of each Dense layer of a plain stack."""
    sizes = [n_in, *units]
    return list(zip(sizes[:-1], sizes[1:]))


def initial_weights(shapes, seed, dtype="float64"):
    """Flat initial weights: per layer W (n_in, n_out) row-major, then b, each
    uniform in +-1/sqrt(n_in) (torch.nn.Linear's default range; non-zero
    biases, so their path is exercised from the first step)."""
    rng = np.random.default_rng(seed)
    parts = []
    for n_in, n_out in shapes:
        bound = 1.0 / np.sqrt(n_in)
        parts += [rng.uniform(-bound, bound, size=n_in * n_out),
                  rng.uniform(-bound, bound, size=n_out)]
    return np.concatenate(parts).astype(dtype)


def unflatten(flat, shapes):
    """[(W (n_in, n_out), b (n_out,)), ...] views of a flat vector in that layout."""
    out, at = [], 0
    for n_in, n_out in shapes:
        W = flat[at:at + n_in * n_out].reshape(n_in, n_out)
        at += n_in * n_out
        out.append((W, flat[at:at + n_out]))
        at += n_out
    assert at == flat.size, f"{flat.size} weights for layers {shapes}"
    return out


# --- optimizers: training runs (tests/test_torch_equivalence.py) ----------------------
# (id, class name (same in fastbp.optim and torch.optim), kwargs valid for both)
CONFIGS = [
    ("sgd-defaults", "SGD", dict()),
    ("sgd", "SGD", dict(lr=0.1)),
    ("sgd-wd", "SGD", dict(lr=0.1, weight_decay=0.05)),
    ("sgd-momentum", "SGD", dict(lr=0.05, momentum=0.9)),
    ("sgd-momentum-dampening-wd", "SGD", dict(lr=0.05, momentum=0.8, dampening=0.3,
                                              weight_decay=0.02)),
    ("sgd-nesterov-wd", "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam-defaults", "Adam", dict()),
    ("adam", "Adam", dict(lr=0.01)),
    ("adam-betas-wd", "Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("adam-beta1-above-half", "Adam", dict(lr=0.01, betas=(0.3, 0.9))),  # lerp's 2nd formula
    ("adam-amsgrad-wd", "Adam", dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    ("adamw-defaults", "AdamW", dict()),
    ("adamw", "AdamW", dict(lr=0.01)),
    ("adamw-amsgrad", "AdamW", dict(lr=0.02, betas=(0.7, 0.95), weight_decay=0.2, amsgrad=True)),
    ("rmsprop-defaults", "RMSprop", dict()),
    ("rmsprop-centered", "RMSprop", dict(lr=0.01, alpha=0.9, centered=True)),
    ("rmsprop-centered-alpha-below-half", "RMSprop", dict(lr=0.01, alpha=0.3, centered=True)),
    ("rmsprop-momentum-wd", "RMSprop", dict(lr=0.01, momentum=0.9, weight_decay=0.05)),
    ("rmsprop-centered-momentum-wd", "RMSprop", dict(lr=0.005, alpha=0.95, eps=1e-6,
                                                     centered=True, momentum=0.5,
                                                     weight_decay=0.01)),
    ("rprop-defaults", "Rprop", dict()),
    ("rprop-etas-clipped", "Rprop", dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(0.02, 0.1))),
    ("adagrad-defaults", "Adagrad", dict()),
    ("adagrad", "Adagrad", dict(lr=0.1)),
    ("adagrad-decay-wd-init", "Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.01,
                                              initial_accumulator_value=0.5)),
    ("adagrad-eps", "Adagrad", dict(lr=0.05, initial_accumulator_value=0.1, eps=1e-3)),
]
#: the configs also run in float32
FLOAT32_CONFIGS = [c for c in CONFIGS if c[0] in ("adam", "adam-amsgrad-wd", "adamw")]

# Network variants: hidden widths and activations, and the loss they train with.
NETS = {
    "tanh-ce": dict(sizes=[8, 3], acts=["tanh", None], loss="cross_entropy"),
    "relu-mse": dict(sizes=[8, 6, 3], acts=["relu", "relu", None], loss="mse"),
}
N_IN, N_SAMPLES, BATCH, EPOCHS = 5, 40, 8, 4   # 5 batches per epoch, 20 steps
INIT_SEED, DATA_SEED = 100, 1


def net_spec(net_name, dtype):
    return dict(net=NETS[net_name], n_in=N_IN, dtype=dtype, init_seed=INIT_SEED)


def data_spec(net_name):
    return dict(loss=NETS[net_name]["loss"], n=N_SAMPLES, n_in=N_IN,
                k=NETS[net_name]["sizes"][-1], seed=DATA_SEED)


def train_spec(config, net_name, dtype):
    _, cls, kwargs = config
    return dict(optimizer=cls, kwargs=kwargs, batch=BATCH, epochs=EPOCHS,
                **net_spec(net_name, dtype), data=data_spec(net_name))


def data(loss, n, n_in, k, seed):
    """X (n, n_in) and targets for ``loss``: class indices, soft [0, 1] targets or reals."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in))
    if loss == "cross_entropy":
        return X, rng.integers(0, k, n)
    if loss == "binary_cross_entropy":
        return X, rng.random(size=(n, k))
    return X, rng.normal(size=(n, k))


# (id, class, kwargs, {epoch: changes applied before it}): settings changed
# during training, from a callback (fastbp) and on param_groups (torch).
CHANGES = [
    ("sgd-momentum-on-after-5-steps", "SGD", dict(lr=0.05, dampening=0.3, weight_decay=0.02),
     {2: dict(momentum=0.8)}),
    ("sgd-nesterov-on", "SGD", dict(lr=0.05), {3: dict(momentum=0.9, nesterov=True)}),
    ("sgd-momentum-off-then-on", "SGD", dict(lr=0.05, momentum=0.9),
     {2: dict(momentum=0.0), 3: dict(momentum=0.5)}),
    ("adamw-amsgrad-off-then-on", "AdamW", dict(lr=0.01, amsgrad=True),
     {2: dict(amsgrad=False), 3: dict(amsgrad=True)}),
    ("adam-amsgrad-on", "Adam", dict(lr=0.01), {2: dict(amsgrad=True)}),
    ("rmsprop-centered-then-momentum-on", "RMSprop", dict(lr=0.01),
     {2: dict(centered=True), 3: dict(momentum=0.5)}),
]
CHANGES_NET = "tanh-ce"


def change_spec(case):
    _, cls, kwargs, changes = case
    return dict(optimizer=cls, kwargs=kwargs, changes={str(e): c for e, c in changes.items()},
                batch=BATCH, epochs=EPOCHS, **net_spec(CHANGES_NET, "float64"),
                data=data_spec(CHANGES_NET))


#: Rprop given a NaN gradient at its second step (torch.sign(nan) == 0)
RPROP_NAN = dict(lr=0.01, p=[1.0, 2.0, 3.0],
                 grads=[[0.5, -0.5, 0.2], [float("nan"), -0.3, -0.1], [0.4, -0.2, 0.3]])


def rprop_nan_spec():
    return dict(RPROP_NAN, grads=[[repr(g) for g in row] for row in RPROP_NAN["grads"]])


# --- one loss and gradient against autograd ------------------------------------------
LOSS_CASES = [
    ("mse", "tanh"),
    ("cross_entropy", "tanh"),
    ("cross_entropy_probs", "relu"),   # 2-D y: rows of class probabilities
    ("binary_cross_entropy", "sigmoid"),
]
LOSS_UNITS, LOSS_N, LOSS_INIT_SEED = [8, 3], 16, 4


def loss_of(case):
    return "cross_entropy" if case == "cross_entropy_probs" else case


def loss_grad_spec(case, act):
    return dict(case=case, act=act, units=LOSS_UNITS, n=LOSS_N, n_in=N_IN,
                init_seed=LOSS_INIT_SEED, data_seed=2, probs_seed=3, x_scale=2.0)


def loss_grad_data(case):
    X, y = data(loss_of(case), LOSS_N, N_IN, LOSS_UNITS[-1], seed=2)
    if case == "cross_entropy_probs":
        y = np.random.default_rng(3).dirichlet(np.ones(LOSS_UNITS[-1]), size=LOSS_N)
    # a scale that puts logits where the softmax / sigmoid is not saturated nor linear
    return 2.0 * X, y


# --- learning-rate schedules (tests/test_callbacks.py) -------------------------------
# (id, class name (same in fastbp.callbacks and torch.optim.lr_scheduler), kwargs of both)
SCHEDULES = [
    ("step3-0.5", "StepLR", dict(step_size=3, gamma=0.5)),
    ("step2", "StepLR", dict(step_size=2)),
    ("step1-0.9", "StepLR", dict(step_size=1, gamma=0.9)),
    ("exp0.9", "ExponentialLR", dict(gamma=0.9)),
    ("exp0.77", "ExponentialLR", dict(gamma=0.77)),
    ("cos7", "CosineAnnealingLR", dict(T_max=7)),
    ("cos5-min", "CosineAnnealingLR", dict(T_max=5, eta_min=1e-3)),
]
SCHEDULE_EPOCHS, SCHEDULE_LR = 20, 0.05


def schedule_spec(case):
    _, name, kwargs = case
    return dict(scheduler=name, kwargs=kwargs, epochs=SCHEDULE_EPOCHS, lr=SCHEDULE_LR)


PLATEAU = [
    dict(),
    dict(patience=0),
    dict(patience=1, cooldown=2),
    dict(patience=2, factor=0.5, threshold=0.1),
    dict(patience=1, threshold=0.05, threshold_mode="abs", min_lr=2e-3),
    dict(mode="max", patience=1, factor=0.3),
    dict(mode="max", patience=0, threshold=0.01, threshold_mode="abs", cooldown=1),
    dict(patience=1, threshold=0.0, factor=0.9),  # the 1e-13 steps count as improvements
    dict(patience=1, threshold=0.0, factor=0.9, threshold_mode="abs", mode="max"),
]
PLATEAU_LR = 0.1


def plateau_id(kwargs):
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"


def plateau_spec(kwargs):
    return dict(kwargs=kwargs, lr=PLATEAU_LR, metric_seed=7)


def plateau_metric(kwargs):
    """A metric that improves, stalls, jitters and improves again (by 1e-13 at the end)."""
    rng = np.random.default_rng(7)
    vals = np.concatenate([np.linspace(1.0, 0.5, 5), 0.5 + 0.01 * rng.random(8),
                           np.linspace(0.49, 0.3, 4), 0.3 + 0.05 * rng.random(13),
                           0.29 - 1e-13 * np.arange(6), [0.29 - 5e-13] * 3])
    return 1 - vals if kwargs.get("mode") == "max" else vals


# --- layers and clipping (test_batchnorm.py, test_residual.py, test_regularization.py) --
#: Dense 8 relu, BatchNorm, Dense 6 tanh, BatchNorm(momentum=0.3), Dense 3, on 5 inputs
#: (momentum None: each library's default, which must agree)
BATCHNORM = dict(dense=chain(5, [8, 6, 3]), acts=["relu", "tanh", None], momentum=[None, 0.3],
                 n=64, batch=16, epochs=2, lr=0.1, init_seed=10, data_seed=12345)
#: Dense 5 tanh, Residual([Dense 5 relu, Dense 5]), Dense 2, on 3 inputs
RESIDUAL = dict(dense=[(3, 5), (5, 5), (5, 5), (5, 2)], n=32, batch=8, lr=0.01, init_seed=11,
                data_seed=12345)
#: one flat gradient (the size of a 5-8-6-3 net) clipped to a global norm
CLIP = dict(n_params=sum(i * o + o for i, o in chain(5, [8, 6, 3])), scale=3.0, max_norm=1.5,
            seed=12345)


def classes_data(n, n_in, k, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_in)), rng.integers(0, k, n)
