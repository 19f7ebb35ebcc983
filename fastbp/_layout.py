"""A built model's layers against the program compiled from them.

The engine runs the program ``Sequential.build`` compiled from the layers'
settings, and a layer's ``W`` and ``b`` are views into its model's flat
parameters.  Layers are plain objects, though: a user can change their
settings after the build (``layer.trainable = False`` to freeze it, say),
edit ``net.layers``, or put a layer into a second model.  Before this
module, training and predict then ran the old program while ``save`` and
``summary`` described the new settings, and a narrower last layer made
predict write past its output.

* ``record(net)`` (at build): the layers and their settings, and which
  model each layer object belongs to.
* ``claim(net)`` (before a build, one step under a lock; ``release`` if
  the build fails): no layer appears twice or belongs to another live
  model, and each becomes ``net``'s.
* ``sync(net)`` (before each use of the program: fit's calls into the
  engine, predict, evaluate, save, summary, gradcheck): settings changed
  since are checked by the layer's constructor and compiled in, keeping the
  weights; a change the weights no longer fit is a ValueError asking for a
  new build.
"""
from __future__ import annotations

import os
import threading
import weakref

import numpy as np

from ._ext import engine as _engine
from ._ext.engine import (ACT_OFF, ACTIVITY_L1, B_OFF, BUF_OFF, KIND, L1, L2, N_IN, N_OUT,
                          N_REG, W_OFF)
from . import regularizers
from .layers import from_config
from .program import compile_program

#: the model each layer object was last built into (a layer's W and b are
#: views into that model's parameters, so it cannot serve two models):
#: id(layer) -> (weak reference to the layer, weak reference to the model).
#: Weak references without callbacks, pruned at each record(): a
#: WeakKeyDictionary runs Python code when a layer dies, and a Ctrl-C that
#: lands in that code is printed as "Exception ignored" and lost -- right
#: after a fit whose model dies with the function that made it.
_OWNERS: dict = {}
_OWNERS_LOCK = threading.Lock()


def _reset_lock_in_child():
    # A fork while another thread held the lock left the child's copy held
    # forever: its first build hung.
    global _OWNERS_LOCK
    _OWNERS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)

#: program columns that place the parameters and activations: a change of
#: settings after build that moves any of them needs a new build
_LAYOUT_COLUMNS = (KIND, N_IN, N_OUT, W_OFF, B_OFF, ACT_OFF, BUF_OFF)


def penalties(layers):
    """The engine's ``reg`` table of ``layers``: a row per layer, columns L2,
    L1 (its kernel regularizer's) and ACTIVITY_L1."""
    table = np.zeros((len(layers), N_REG))
    for i, layer in enumerate(layers):
        kernel = getattr(layer, "kernel_regularizer", None)
        activity = getattr(layer, "activity_regularizer", None)
        if kernel is not None:
            table[i, L2], table[i, L1] = kernel.engine_coefficients()
        if activity is not None:
            table[i, ACTIVITY_L1] = activity.l1
    return table


def _owner(layer):
    """The live model ``layer`` was last built into, or None."""
    entry = _OWNERS.get(id(layer))
    if entry is None or entry[0]() is not layer:  # none, or a dead layer's id reused
        return None
    return entry[1]()


def owned(layer):
    """Whether ``layer`` is part of a built model that is still alive."""
    return _owner(layer) is not None


def claim(net):
    """Make ``net`` the owner of its layers, as one step under the registry's
    lock, or raise ValueError (nothing changed) if a layer appears twice or
    belongs to another live model (``net`` itself, rebuilding, is fine).
    Returns what ``release`` needs to undo it.  One step, so that two
    threads building two models that share a layer cannot both pass the
    check: the second is refused."""
    with _OWNERS_LOCK:
        seen = set()
        for i, layer in enumerate(net.layers):
            if id(layer) in seen:
                raise ValueError(f"layer {i} ({layer!r}) appears twice in the model: each "
                                 "layer owns its weights; use two layer objects")
            seen.add(id(layer))
            owner = _owner(layer)
            if owner is not None and owner is not net:
                raise ValueError(f"layer {i} ({layer!r}) belongs to another built model (its "
                                 "W and b are views into that model's parameters); use a new "
                                 "layer, or copy.deepcopy(layer)")
        # every entry the claim changes: the new layers' and those ``net``
        # owned before (a failed rebuild leaves it with its old layers)
        undo = {key: entry for key, entry in _OWNERS.items() if entry[1]() is net}
        undo.update((id(layer), _OWNERS.get(id(layer))) for layer in net.layers)
        _set_owner(net)
        return undo


def release(undo):
    """Undo a ``claim`` whose build failed: each layer's previous owner."""
    with _OWNERS_LOCK:
        for key, entry in undo.items():
            if entry is None:
                _OWNERS.pop(key, None)
            else:
                _OWNERS[key] = entry


def _set_owner(net):
    """Prune dead layers' entries and those of layers ``net`` no longer has
    (a rebuild with a new list of layers freed them), then record ``net``
    as its layers' owner (the caller holds the lock)."""
    for key in [key for key, (layer, owner) in _OWNERS.items()
                if layer() is None or owner() is net]:
        del _OWNERS[key]
    for layer in net.layers:
        _OWNERS[id(layer)] = (weakref.ref(layer), weakref.ref(net))


def record(net):
    """After a build (or an unpickling): the layers, their settings, and
    ``net`` as each one's owner."""
    with _OWNERS_LOCK:
        _set_owner(net)
    net._layout = (list(net.layers), [layer.get_config() for layer in net.layers])


def _config_of(i, layer):
    """layer.get_config(), or a ValueError naming layer i when a setting
    given after build cannot even be described.  A regularizer given after
    build as the constructor takes one (a dict) is made an L1L2 first, as
    the constructor does."""
    try:
        for name in ("kernel_regularizer", "activity_regularizer"):
            value = getattr(layer, name, None)
            if value is not None and not isinstance(value, regularizers.L1L2):
                setattr(layer, name, regularizers.get(value))
        return layer.get_config()
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"layer {i} ({type(layer).__name__}) was given settings after build "
                         f"that are not valid: {exc}") from None


def sync(net):
    """Take up settings of ``net``'s layers changed since the build (a frozen
    layer, an activation, a penalty, a dropout rate...) by compiling the
    program again, keeping the weights; a ValueError if the layers changed
    so that the weights no longer fit (units, layers added or removed), if
    a new setting is not valid (the layer's constructor checks it), or if a
    layer now serves another model.  All or nothing: a refused change
    leaves the model as it was, and is refused again until set back.
    Returns whether anything changed.  The caller holds the state lock."""
    if net._params is None:
        return False
    layers, configs = net._layout
    if len(net.layers) != len(layers) or any(a is not b for a, b in zip(net.layers, layers)):
        raise ValueError("the model's list of layers changed after it was built; the "
                         "weights are laid out for the old one. Call build(n_features) "
                         "again (new weights), or make a new model")
    try:  # the usual case, every call of predict: nothing changed
        if [layer.get_config() for layer in net.layers] == configs:
            return False
    except (AttributeError, TypeError, ValueError):
        pass  # a setting get_config cannot describe: _config_of says which
    for i, layer in enumerate(net.layers):
        if _owner(layer) is not net:
            raise ValueError(f"layer {i} ({layer!r}) was built into another model since; "
                             "its W and b are that model's now. Use a new layer for each "
                             "model")
    now = [_config_of(i, layer) for i, layer in enumerate(net.layers)]
    if now == configs:
        return False
    changed = [i for i, (a, b) in enumerate(zip(now, configs)) if a != b]
    for i in changed:
        try:  # the constructor's checks (a momentum in [0, 1], a regularizer's values...)
            checked = from_config(now[i])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"layer {i} ({type(net.layers[i]).__name__}) was given "
                             f"settings after build that are not valid: {exc}") from None
        # normalized as the constructor does (a regularizer dict becomes L1L2)
        for key in now[i]:
            if key != "type":
                setattr(net.layers[i], key, getattr(checked, key))
        now[i] = net.layers[i].get_config()
    try:
        program = compile_program(net.layers, net.n_features, net.dtype)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"the settings of layer(s) {changed} changed after build and are "
                         f"not valid: {exc}") from None
    old = net._compiled
    if (program.rows.shape != old.rows.shape or program.n_params != old.n_params
            or program.n_buffers != old.n_buffers
            or not np.array_equal(program.rows[:, _LAYOUT_COLUMNS],
                                  old.rows[:, _LAYOUT_COLUMNS])):
        raise ValueError(f"the settings of layer(s) {changed} changed after build so that "
                         "the weights no longer fit (units, say): call build(n_features) "
                         "again (new weights), or set them back")
    aux = (net._aux if program.n_aux == net._aux.shape[0]
           else np.zeros(program.n_aux, dtype=net.dtype))
    reg = penalties(net.layers)
    network = _engine.Network(program=program.rows, floats=program.floats, params=net._params,
                              buffers=net._buffers, n_aux=int(program.n_aux))
    # everything checked: publish it at once
    net._compiled = program
    net._program, net._floats = program.rows, program.floats
    net._aux, net._reg, net._network = aux, reg, network
    net._fit_workspace = None
    net._scratch = None
    net._layout = (list(net.layers), now)
    return True
