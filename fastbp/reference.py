"""The same math as the compiled kernels, in plain NumPy.

This module is the specification: every compiled kernel has a function of
the same name and signature here, and the tests hold the two against each
other in float32 and float64.  It is written to be read: each layer's
forward stands beside its backward.  It is also the baseline the benchmarks
compare with.

Shapes: X (m, n_in), W (n_in, n_out), b (n_out,), outputs and their
gradients (m, n_out).  Activations are given by their integer code
(``fastbp.activations.ACTIVATION_CODES``) or name.
"""
import numpy as np

from . import activations as _act
from ._ext.engine import (ACT, ACTIVITY_L1, B_OFF, BUF_OFF, EPS, KIND, L1, L2, MOMENTUM, N_IN,
                          N_OUT, RATE, TRAINABLE, W_OFF, Act, Kind)

LEAKY_SLOPE, ELU_ALPHA, SOFTPLUS_THRESHOLD = 0.01, 1.0, 20.0


# --- activations: forward, and derivative in terms of the output a = f(x) ---

def activation(x, act):
    act = _act.code(act)
    if act == Act.IDENTITY:
        return x
    if act == Act.SIGMOID:
        return 0.5 * (1 + np.tanh(0.5 * x))  # = 1 / (1 + e^-x), without overflow
    if act == Act.TANH:
        return np.tanh(x)
    if act == Act.RELU:
        return np.maximum(x, 0)
    if act == Act.LEAKY_RELU:
        return np.where(x > 0, x, x.dtype.type(LEAKY_SLOPE) * x)
    if act == Act.ELU:
        return np.where(x > 0, x, ELU_ALPHA * np.expm1(np.minimum(x, 0)))
    if act == Act.SOFTPLUS:
        return np.where(x > SOFTPLUS_THRESHOLD, x, np.log1p(np.exp(np.minimum(x, SOFTPLUS_THRESHOLD))))
    raise ValueError(act)


def activation_derivative(a, act):
    act = _act.code(act)
    if act == Act.IDENTITY:
        return np.ones_like(a)
    if act == Act.SIGMOID:
        return a * (1 - a)
    if act == Act.TANH:
        return 1 - a * a
    if act == Act.RELU:
        return (a > 0).astype(a.dtype)
    if act == Act.LEAKY_RELU:
        return np.where(a > 0, 1, LEAKY_SLOPE).astype(a.dtype)
    if act == Act.ELU:
        return np.where(a > 0, 1, a + ELU_ALPHA).astype(a.dtype)
    if act == Act.SOFTPLUS:
        return np.where(a > SOFTPLUS_THRESHOLD, 1, -np.expm1(-a)).astype(a.dtype)
    raise ValueError(act)


def bias_activation(z, b, act):
    """f(z + b): the epilogue that follows the GEMM in the forward pass."""
    return activation(z + b, act).astype(z.dtype, copy=False)


def activation_backward(g, a, act):
    """dL/d(pre-activation) from g = dL/d(output) and the output a."""
    return g * activation_derivative(a, act)


# --- one dense layer ---------------------------------------------------------

def gemm(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b)."""
    return (a.T if trans_a else a) @ (b.T if trans_b else b)


def dense_forward(x, w, b, act):
    """out = f(x @ w + b)."""
    return bias_activation(x @ w, b, act)


def dense_backward(x, w, a, g, act):
    """Given g = dL/d(out) and the output a: returns (dW, db, dX)."""
    d = activation_backward(g, a, act)   # dL / d(x @ w + b)
    return x.T @ d, d.sum(axis=0), d @ w.T


# --- losses; write G = dL/dZ, return the weighted mean loss -------------------
# w: sample weights (m,).  fastbp's losses: torch.nn definitions with mean
# reduction, a weighted mean when weights are given.

def mse_loss_grad(Z, Y, w, G):
    wc = w[:, None]
    G[...] = 2 * wc * (Z - Y) / (w.sum(dtype=np.float64) * Z.shape[1])
    return float(np.sum(wc * (Z.astype(np.float64) - Y) ** 2) / (w.sum(dtype=np.float64) * Z.shape[1]))


def binary_cross_entropy_loss_grad(Z, Y, w, G):
    wc = w[:, None]
    sigmoid = 0.5 * (1 + np.tanh(0.5 * Z))
    G[...] = wc * (sigmoid - Y) / (w.sum(dtype=np.float64) * Z.shape[1])
    z = Z.astype(np.float64)
    per = np.maximum(z, 0) - z * Y + np.log1p(np.exp(-np.abs(z)))
    return float(np.sum(wc * per) / (w.sum(dtype=np.float64) * Z.shape[1]))


def _softmax(Z):
    e = np.exp(Z - Z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy_loss_grad(Z, Y, w, G):
    wc = w[:, None]
    G[...] = wc * (_softmax(Z) * Y.sum(axis=1, keepdims=True) - Y) / w.sum(dtype=np.float64)
    shifted = Z.astype(np.float64) - Z.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-np.sum(wc * Y * log_softmax) / w.sum(dtype=np.float64))


# scikit-learn's MLP losses (sklearn/neural_network/_base.py) on the last
# layer's pre-activation Z; G is sklearn's delta w (act(Z) - Y) / sum(w).

def _sk(Z, Y, w, G, prob):
    G[...] = w[:, None] * (prob - Y) / w.sum(dtype=np.float64)


def sk_squared_error_loss_grad(Z, Y, w, G):
    _sk(Z, Y, w, G, Z)
    return float(0.5 * np.average((Y.astype(np.float64) - Z) ** 2, weights=w, axis=0).mean())


def sk_log_loss_loss_grad(Z, Y, w, G):
    p = _softmax(Z)
    _sk(Z, Y, w, G, p)
    eps = np.finfo(Z.dtype).eps
    logp = np.log(np.clip(p, eps, 1 - eps).astype(np.float64))
    return float(-np.average(np.where(Y != 0, Y * logp, 0.0), weights=w, axis=0).sum())


def sk_binary_log_loss_loss_grad(Z, Y, w, G):
    p = 0.5 * (1 + np.tanh(0.5 * Z))
    _sk(Z, Y, w, G, p)
    eps = np.finfo(Z.dtype).eps
    pc = np.clip(p, eps, 1 - eps).astype(np.float64)
    per = np.where(Y != 0, Y * np.log(pc), 0.0) + np.where(Y != 1, (1 - Y) * np.log(1 - pc), 0.0)
    return float(-np.average(per, weights=w, axis=0).sum())


def sk_poisson_loss_grad(Z, Y, w, G):
    p = np.exp(Z)
    _sk(Z, Y, w, G, p)
    y = Y.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ylogy = np.where(y != 0, y * np.log(y / p), 0.0)
    return float(np.average(ylogy - y + p, weights=w, axis=0).sum())


LOSS_KERNELS = {"mse": mse_loss_grad, "binary_cross_entropy": binary_cross_entropy_loss_grad,
                "cross_entropy": cross_entropy_loss_grad,
                "sk_squared_error": sk_squared_error_loss_grad,
                "sk_log_loss": sk_log_loss_loss_grad,
                "sk_binary_log_loss": sk_binary_log_loss_loss_grad,
                "sk_poisson": sk_poisson_loss_grad}


# --- optimizers (torch.optim equations; update p and state in place) -----------

def _lerp(start, end, weight):
    return start + weight * (end - start) if weight < 0.5 else end - (end - start) * (1 - weight)


def sgd_step(p, g, buf, t, lr, momentum, dampening, nesterov, weight_decay, momentum_start=1):
    T = p.dtype.type
    d = g + T(weight_decay) * p if weight_decay else g.copy()
    if momentum:  # the buffer is born at step momentum_start, a copy of that gradient
        buf[...] = d if t == momentum_start else buf * T(momentum) + T(1 - dampening) * d
        d = d + T(momentum) * buf if nesterov else buf.copy()
    p -= T(lr) * d
    return bool(np.isfinite(p).all())


def adam_step(p, g, m, v, vmax, t, lr, beta1, beta2, eps, weight_decay, amsgrad, decoupled):
    T = p.dtype.type
    d = g
    if weight_decay:
        if decoupled:
            p *= T(1 - lr * weight_decay)
        else:
            d = g + T(weight_decay) * p
    m[...] = _lerp(m, d, T(1 - beta1))
    v[...] = v * T(beta2) + T(1 - beta2) * d * d
    if amsgrad:
        np.maximum(vmax, v, out=vmax)
    vhat = vmax if amsgrad else v
    denom = np.sqrt(vhat) / T((1 - beta2 ** t) ** 0.5) + T(eps)
    p -= (T(lr / (1 - beta1 ** t)) * m) / denom
    return bool(np.isfinite(p).all())


def rmsprop_step(p, g, square_avg, grad_avg, buf, lr, alpha, eps, weight_decay, momentum, centered):
    T = p.dtype.type
    d = g + T(weight_decay) * p if weight_decay else g
    square_avg[...] = square_avg * T(alpha) + T(1 - alpha) * d * d
    if centered:
        grad_avg[...] = _lerp(grad_avg, d, T(1 - alpha))
        avg = np.sqrt(square_avg - grad_avg * grad_avg) + T(eps)
    else:
        avg = np.sqrt(square_avg) + T(eps)
    if momentum > 0:
        buf[...] = buf * T(momentum) + d / avg
        p -= T(lr) * buf
    else:
        p -= (T(lr) * d) / avg
    return bool(np.isfinite(p).all())


def rprop_step(p, g, prev, step_size, etaminus, etaplus, step_min, step_max):
    T = p.dtype.type
    s = g * prev
    factor = np.where(s > 0, T(etaplus), np.where(s < 0, T(etaminus), T(1)))
    step_size[...] = np.clip(step_size * factor, T(step_min), T(step_max))
    d = np.where(factor == T(etaminus), T(0), g)
    p -= np.where(np.isnan(d), T(0), np.sign(d)) * step_size   # torch.sign(nan) is 0
    prev[...] = d
    return bool(np.isfinite(p).all())


def adagrad_step(p, g, state_sum, t, lr, lr_decay, weight_decay, eps):
    T = p.dtype.type
    d = g + T(weight_decay) * p if weight_decay else g
    state_sum += d * d
    p -= (T(lr / (1 + (t - 1) * lr_decay)) * d) / (np.sqrt(state_sum) + T(eps))
    return bool(np.isfinite(p).all())


# scikit-learn's optimizers (sklearn/neural_network/_stochastic_optimizers.py)

def sk_sgd_step(p, g, velocity, lr, momentum, nesterov):
    T = p.dtype.type
    velocity[...] = T(momentum) * velocity - T(lr) * g
    update = T(momentum) * velocity - T(lr) * g if nesterov else velocity
    p += update
    return bool(np.isfinite(p).all())


def sk_adam_step(p, g, m, v, t, lr, beta1, beta2, eps):
    T = p.dtype.type
    m[...] = T(beta1) * m + T(1 - beta1) * g
    v[...] = T(beta2) * v + T(1 - beta2) * (g * g)
    rate = lr * np.sqrt(np.float64(1 - beta2 ** t)) / (1 - beta1 ** t)  # a float64 scalar
    p += (-rate * m) / (np.sqrt(v) + T(eps))
    return bool(np.isfinite(p).all())


# --- dropout: masks from a counter-based splitmix64 stream ---------------------

_GOLDEN, _MIX1, _MIX2 = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9),
                         np.uint64(0x94D049BB133111EB))


def splitmix64(counter, n):
    """The next n draws of the stream after ``counter``; returns (draws, counter)."""
    z = np.uint64(counter) + _GOLDEN * np.arange(1, n + 1, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    after = (int(counter) + 0x9E3779B97F4A7C15 * n) % 2 ** 64  # wraps like the uint64 in C
    return z ^ (z >> np.uint64(31)), np.uint64(after)


def dropout_mask(counter, shape, rate, dtype):
    """Inverted-dropout mask: 1/(1 - rate) where the top 24 bits of a draw are
    below (1 - rate) 2^24, else 0.  Returns (mask, counter)."""
    draws, counter = splitmix64(counter, int(np.prod(shape)))
    keep = np.uint64(int((1.0 - rate) * 16777216.0))
    scale = np.dtype(dtype).type(1.0 / (1.0 - rate))
    mask = np.where((draws >> np.uint64(40)) < keep, scale, 0).astype(dtype).reshape(shape)
    return mask, counter


# --- batch normalization (torch.nn.BatchNorm1d) --------------------------------

def batchnorm_forward(x, gamma, beta, running_mean, running_var, eps, momentum, training):
    """y = gamma (x - mean) / sqrt(var + eps) + beta with the batch's mean and
    biased variance (training: also updates the running statistics, with the
    unbiased variance) or the running ones.  Returns (y, x_hat, 1/std)."""
    if training:
        m = x.shape[0]
        mean = x.mean(axis=0, dtype=np.float64)
        var = ((x - mean) ** 2).mean(axis=0)
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        running_var[...] = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    inv = (1.0 / np.sqrt(var + float(eps))).astype(x.dtype)
    xhat = (x - mean.astype(x.dtype)) * inv
    return gamma * xhat + beta, xhat, inv


def batchnorm_backward(g, xhat, inv, gamma, training):
    """Returns (dgamma, dbeta, dx)."""
    dgamma, dbeta = (g * xhat).sum(axis=0), g.sum(axis=0)
    if training:
        m = g.shape[0]
        dx = gamma * inv / m * (m * g - dbeta - xhat * dgamma)
    else:
        dx = gamma * inv * g
    return dgamma, dbeta, dx


# --- a whole network, driven by the engine's program table ----------------------
# One row per layer; columns (KIND, N_IN, ...) and kinds (Kind) as declared in
# fastbp/_ext/engine.pxd and described in csrc/engine.pyx; ``floats`` the
# per-row RATE, MOMENTUM and EPS (``Sequential._floats``, fastbp.program).

def _bn(row, params, buffers):
    w, g_off, b_off, buf = row[N_OUT], row[W_OFF], row[B_OFF], row[BUF_OFF]
    return (params[g_off:g_off + w], params[b_off:b_off + w], buffers[buf:buf + w],
            buffers[buf + w:buf + 2 * w])

def _dense(row, params):
    n_in, n_out, w_off, b_off = row[N_IN], row[N_OUT], row[W_OFF], row[B_OFF]
    return (params[w_off:w_off + n_in * n_out].reshape(n_in, n_out),
            params[b_off:b_off + n_out], row[ACT])


def forward_all(program, X, params, floats=None, counter=None, buffers=None):
    """Outputs of every layer: [X, A_1, ..., A_L], and the masks by layer
    (dropout: on the activations; DropConnect: on W).  With ``counter`` (a
    1-element uint64 array, advanced in place) both are on, as in training,
    at the rates of ``floats``; without, dropout passes through and dense
    layers use W.  BatchNorm rows use ``buffers`` (running statistics,
    updated in training) and ``floats`` (momentum, eps); their masks entry
    is (x_hat, 1/std)."""
    outs, masks = [X], {}
    for l, row in enumerate(program):
        if row[KIND] == Kind.RES_BEGIN:  # remember x
            outs.append(outs[-1])
        elif row[KIND] == Kind.RES_END:  # block(x) + x; W_OFF holds the begin row
            outs.append(outs[-1] + outs[row[W_OFF] + 1])
        elif row[KIND] == Kind.BATCHNORM:
            gamma, beta, rm, rv = _bn(row, params, buffers)
            y, xhat, inv = batchnorm_forward(outs[-1], gamma, beta, rm, rv, floats[l][EPS],
                                             floats[l][MOMENTUM], counter is not None)
            masks[l] = (xhat, inv)
            outs.append(y)
        elif row[KIND] == Kind.DROPOUT:
            if counter is None:
                outs.append(outs[-1])
            else:
                masks[l], counter[0] = dropout_mask(counter[0], outs[-1].shape, floats[l][RATE],
                                                    X.dtype)
                outs.append(outs[-1] * masks[l])
        else:
            W, b, act = _dense(row, params)
            if counter is not None and floats[l][RATE] > 0:  # DropConnect: W_eff = W * M
                masks[l], counter[0] = dropout_mask(counter[0], W.shape, floats[l][RATE], W.dtype)
                W = W * masks[l]
            outs.append(dense_forward(outs[-1], W, b, act))
    return outs, masks


def forward(X, program, params):
    return forward_all(program, X, params)[0][-1]


def penalize(program, reg, per_weight, w, params, grad):
    """Add each trainable layer's s (l2 W + l1 sign W) to grad; return the
    penalty s sum (l2/2 ||W||^2 + l1 |W|_1), s = 1/sum(w) if per_weight else 1."""
    s = 1.0 / w.sum(dtype=np.float64) if per_weight else 1.0
    total = 0.0
    for row, penalties in zip(program, reg):
        l2, l1 = penalties[L2], penalties[L1]
        if (l2 or l1) and row[TRAINABLE] and row[KIND] == Kind.DENSE:
            W = _dense(row, params)[0]
            dW = grad[row[W_OFF]:row[W_OFF] + W.size].reshape(W.shape)
            dW += W.dtype.type(s * l2) * W + W.dtype.type(s * l1) * np.sign(W)
            W64 = W.astype(np.float64)
            total += s * (0.5 * l2 * np.sum(W64 * W64) + l1 * np.sum(np.abs(W64)))
    return total


def clip_and_measure(program, grad, clip_value=0.0, clip_norm=0.0):
    """Clip trainable gradients in place: elements to [-clip_value, clip_value]
    (if > 0), then the global norm to clip_norm (if > 0) like
    torch.nn.utils.clip_grad_norm_.  Returns each row's gradient norm after
    value clipping (0 for rows without trainable parameters)."""
    def size(r):  # W then b, or gamma then beta, from W_OFF on
        return 2 * r[N_OUT] if r[KIND] == Kind.BATCHNORM else r[N_IN] * r[N_OUT] + r[N_OUT]
    spans = [(r[W_OFF], r[W_OFF] + size(r)) for r in program
             if r[KIND] != Kind.DROPOUT and r[TRAINABLE]]
    norms = np.zeros(len(program))
    for l, r in enumerate(program):
        if r[KIND] != Kind.DROPOUT and r[TRAINABLE]:
            g = grad[r[W_OFF]:r[W_OFF] + size(r)]
            if clip_value > 0:
                np.clip(g, -g.dtype.type(clip_value), g.dtype.type(clip_value), out=g)
            norms[l] = np.sqrt(np.sum(g.astype(np.float64) ** 2))
    if clip_norm > 0:
        coef = clip_norm / (np.sqrt(np.sum(norms ** 2)) + 1e-6)
        if coef < 1:
            for a, b in spans:
                grad[a:b] = grad[a:b] * coef
    return norms


def loss_grad(X, Y, program, params, loss, w=None, reg=None, reg_per_weight=False,
              floats=None, counter=None, buffers=None):
    """Weighted mean loss over (X, Y) (w defaults to ones) plus the
    penalties ``reg`` (n_layers, N_REG: columns L2, L1, ACTIVITY_L1), and
    the flat gradient (same layout as params).  With ``counter`` dropout is
    on (training), at the rates of ``floats`` (as ``forward_all``)."""
    outs, masks = forward_all(program, X, params, floats, counter, buffers)
    G = np.empty_like(outs[-1])
    w = np.ones(X.shape[0], dtype=X.dtype) if w is None else w
    value = LOSS_KERNELS[loss](outs[-1], Y, w, G)
    grad = np.zeros_like(params)
    skips = {}
    for l in range(len(program) - 1, -1, -1):
        row = program[l]
        if row[KIND] == Kind.RES_END:  # the skip path gets the same gradient
            skips[row[W_OFF]] = G
            continue
        if row[KIND] == Kind.RES_BEGIN:
            G = G + skips.pop(l)
            continue
        if row[KIND] == Kind.BATCHNORM:
            xhat, inv = masks[l]
            dgamma, dbeta, G = batchnorm_backward(G, xhat, inv, _bn(row, params, buffers)[0],
                                                  counter is not None)
            if row[TRAINABLE]:
                grad[row[W_OFF]:row[W_OFF] + row[N_OUT]] = dgamma
                grad[row[B_OFF]:row[B_OFF] + row[N_OUT]] = dbeta
            continue
        if row[KIND] == Kind.DROPOUT:
            G = G * masks[l] if l in masks else G
            continue
        W, b, act = _dense(row, params)
        if l in masks:  # DropConnect: this batch used W * M
            W = W * masks[l]
        if reg is not None and reg[l][ACTIVITY_L1] > 0:  # L1 penalty on this layer's output
            a, c = outs[l + 1], reg[l][ACTIVITY_L1]
            value += c / a.shape[0] * float(np.abs(a.astype(np.float64)).sum())
            G = G + a.dtype.type(c / a.shape[0]) * np.sign(a)
        dW, db, G = dense_backward(outs[l], W, outs[l + 1], G, act)
        if l in masks:
            dW = dW * masks[l]
        if row[TRAINABLE]:
            grad[row[W_OFF]:row[W_OFF] + dW.size] = dW.ravel()
            grad[row[B_OFF]:row[B_OFF] + db.size] = db
    if reg is not None:
        value += penalize(program, reg, reg_per_weight, w, params, grad)
    return value, grad


def train_batches(X, Y, order, batch_size, program, params, loss, optimizer_step,
                  floats=None, counter=None, reg=None, clip_value=0.0, clip_norm=0.0,
                  measure=False, buffers=None):
    """One epoch of mini-batch training.  ``optimizer_step(params, grad)``
    updates params in place (e.g. ``fastbp.optim.Adam().step``).  With
    ``counter`` dropout is on (rates in ``floats``); ``reg`` adds weight penalties;
    gradients are clipped as ``clip_and_measure``.  Returns the per-batch
    losses and (with ``measure``) the sum over batches of the per-row
    gradient norms."""
    losses, norms = [], np.zeros(len(program))
    for start in range(0, X.shape[0], batch_size):
        rows = order[start:start + batch_size]
        value, grad = loss_grad(X[rows], Y[rows], program, params, loss, reg=reg,
                                floats=floats, counter=counter, buffers=buffers)
        if clip_value > 0 or clip_norm > 0 or measure:
            norms += clip_and_measure(program, grad, clip_value, clip_norm)
        optimizer_step(params, grad)
        losses.append(value)
    return np.array(losses), norms
