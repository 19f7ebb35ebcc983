"""The optimizers' base class and the checks of their hyperparameters.

``Optimizer`` holds what every optimizer shares (state allocation and
checks, the packed hyperparameters the compiled update reads, ``step``);
``fastbp.optim`` defines the torch.optim optimizers on it and
``fastbp.lm`` the Levenberg-Marquardt solver.  A module of its own so that
both can import it and neither imports the other's module to get it.
"""
from __future__ import annotations

import numpy as np

from ._ext.engine import MAX_STEPS  # the engine's bound on t
from ._numba import optim as _kernels


def _check(cond, message):
    if not cond:
        raise ValueError(message)


def _real(value, name):
    """A hyperparameter as a finite float (ValueError otherwise)."""
    if type(value) is float and value - value == 0:  # the common case, checked fast
        return value
    if isinstance(value, (bool, np.bool_, str, bytes)) or np.ndim(value) != 0:
        raise ValueError(f"invalid {name}: {value!r} is not a real number")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"invalid {name}: {value!r} is not a real number") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError(f"invalid {name}: {value!r}")
    return out


def _flag(value, name):
    """A yes/no hyperparameter as a bool: True, False, or the integers 1 and 0."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"invalid {name}: {value!r} (True or False)")


def _is_count(value):
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _short(value):
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer of more than 4300 digits, deep nesting
        return f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _pair(value, name):
    """Two real numbers, from a tuple or list."""
    _check(isinstance(value, (tuple, list)) and len(value) == 2, f"invalid {name}: {value!r}")
    return tuple(_real(v, name) for v in value)


#: largest finite value of each parameter dtype: a hyperparameter beyond it
#: would become infinite in the kernel
_LARGEST = {np.dtype(t): float(np.finfo(t).max) for t in (np.float32, np.float64)}


class Optimizer:
    """Base class: state handling shared by every optimizer.

    Subclasses set ``kernel`` (the name of the compiled update, a key of
    ``fastbp._numba.optim.SPECS``: the kernel's declaration of its state
    slots and hyperparameters) and implement ``_validated`` (the
    constructor's hyperparameters, checked, by name); ``_kernel_values``
    maps them to the kernel's hyperparameters by name where the names
    differ.  The packed ``hyper`` vector the engine passes to the compiled
    update is built from the declaration by name, so no class writes its
    order.  Hyperparameters are checked again before every run of compiled
    updates, so changing one after construction (a learning rate schedule,
    momentum turned on later) either works or raises ValueError before
    anything runs.

    The state (``t``, the slot vectors, and ``step_marks``) is read and
    restored as plain values by ``state_dict`` and ``load_state_dict``,
    which is all that model files use.
    """

    kernel = None

    def __init__(self):
        self.state = None  # (n_slots, n_params) array, allocated on first use
        self.t = 0

    # -- hyperparameters -------------------------------------------------
    @property
    def _spec(self):
        return _kernels.SPECS[self.kernel]

    @property
    def slot_names(self):
        """Names of the state's rows (the kernel's slots), in order."""
        return () if self.kernel is None else self._spec.slots

    @property
    def uses_step(self):
        """Whether the kernel takes the step count t."""
        return self._spec.uses_step

    def _n_slots(self):
        """State vectors the kernel reads: all of its slots, whatever the
        hyperparameters (a slot that is off is kept for when it turns on)."""
        return len(self.slot_names)

    def _validated(self):
        """The constructor's hyperparameters, checked and normalised, by name
        (ValueError naming the first invalid one)."""
        raise NotImplementedError

    def _kernel_values(self, hp):
        """The kernel's scalar arguments by name (``self._spec.hyper``), from
        the checked hyperparameters ``hp`` (extra names are ignored)."""
        return hp

    def _set_hyperparameters(self):
        """Check the hyperparameters and store them normalised."""
        hp = self._validated()
        vars(self).update(hp)
        return hp

    def _args(self, dtype=None):
        """The kernel's hyperparameters by name, in the order its declaration
        gives them, checked now (a callback or the user may have changed them
        since construction); ``dtype``: the parameters' dtype, which every
        value must fit."""
        try:
            hp = self._set_hyperparameters()
        except ValueError as exc:
            raise ValueError(f"invalid hyperparameters for {type(self).__name__}: {exc}") from None
        values = self._kernel_values(hp)
        missing = [name for name in self._spec.hyper if name not in values]
        if missing:  # a defect of the class, not of the user's values
            raise TypeError(f"{type(self).__name__} gives no value for its kernel's "
                            f"hyperparameter(s) {missing}")
        args = {name: values[name] for name in self._spec.hyper}
        if dtype is not None:
            top = _LARGEST[np.dtype(dtype)]
            for name, value in args.items():
                if not abs(float(value)) <= top:
                    raise ValueError(f"invalid hyperparameters for {type(self).__name__}: "
                                     f"{name}={value!r} overflows the parameters' dtype "
                                     f"{np.dtype(dtype).name}")
        return args

    def _hyper(self):
        """Hyperparameters packed as float64 in the order of the kernel's
        declaration, which its C entry point reads (flags as 0.0 or 1.0)."""
        dtype = None if self.state is None else self.state.dtype
        return np.array([float(a) for a in self._args(dtype).values()], dtype=np.float64)

    def check_hyperparameters(self, dtype=None):
        """Check the hyperparameters as ``fit`` and ``step`` do.

        Parameters
        ----------
        dtype : {"float32", "float64"} or None
            The parameters' dtype: every value the kernel reads must be
            finite in it.

        Raises
        ------
        ValueError
            Naming the first invalid hyperparameter.
        """
        self._args(None if dtype is None else np.dtype(dtype))

    def _init_state(self, state):
        """Fill a freshly allocated state (zeros) where torch starts elsewhere."""

    # -- state -----------------------------------------------------------
    def _check_step_count(self):
        t = self.t
        _check(isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))
               and 0 <= t < MAX_STEPS,
               f"the step count t of this {type(self).__name__} must be an integer in "
               f"[0, 2**53), got {t!r}")
        self.t = int(t)

    def _bind(self, n_params, dtype):
        """Check the hyperparameters and step count, then allocate the state
        for ``n_params`` parameters of ``dtype`` once (or check the one held)."""
        self._args(np.dtype(dtype))
        return self._state_for(n_params, dtype)

    def _state_for(self, n_params, dtype):
        dtype = np.dtype(dtype)
        self._check_step_count()
        if self.state is None:
            self.state = np.zeros((self._n_slots(), n_params), dtype=dtype)
            self._init_state(self.state)
            self.t = 0
            return self.state
        state = self.state
        shape = (self._n_slots(), n_params)
        if not isinstance(state, np.ndarray) or state.shape[1:] != (n_params,) \
                or state.dtype != dtype:
            held = (f"{state.shape[1]} {state.dtype}" if isinstance(state, np.ndarray)
                    and state.ndim == 2 else repr(type(state).__name__))
            raise ValueError(
                f"this {type(self).__name__} holds state for {held} parameters, not "
                f"{n_params} {dtype}; use a new optimizer (or call reset()) for another model")
        if state.shape != shape or not (state.flags.c_contiguous and state.flags.writeable):
            raise ValueError(
                f"this {type(self).__name__}'s state must be a writeable C-contiguous array of "
                f"shape {shape} ({', '.join(self._spec.slots)}), got shape {state.shape}; "
                "call reset() to start over")
        return state

    def reset(self):
        """Forget the state: the next update starts as the first one."""
        self.state = None
        self.t = 0

    #: slots that hold second moments or step sizes, never negative
    _nonnegative_slots = ()
    #: slots that may hold any value, NaN included (Rprop's previous
    #: gradient, where torch stores a NaN gradient as it is)
    _unchecked_slots = ()

    def _check_state(self, state):
        """ValueError naming the first slot of ``state`` that holds a value
        this optimizer cannot produce (NaN or infinity; a negative second
        moment), as a file could hold."""
        for name, row in zip(self._spec.slots, state):
            if name in self._unchecked_slots:
                continue
            if not np.isfinite(row).all():
                raise ValueError(f"{type(self).__name__} state {name!r} holds NaN or infinity")
            if name in self._nonnegative_slots and (row < 0).any():
                raise ValueError(f"{type(self).__name__} state {name!r} holds negative values")

    def step(self, params, grad):
        """Apply one update in place: ``params`` and ``grad`` are 1-D arrays of
        the same length and dtype (float32 or float64).

        Returns True when every updated parameter is finite.
        """
        params = np.asarray(params)
        grad = np.asarray(grad)
        _check(params.ndim == 1 and grad.shape == params.shape,
               f"params and grad must be 1-D of equal length, got {params.shape} and {grad.shape}")
        _check(params.dtype in (np.float32, np.float64) and grad.dtype == params.dtype,
               f"params and grad must share a float32/float64 dtype, got {params.dtype} and {grad.dtype}")
        _check(params.flags.writeable and params.flags.c_contiguous, "params must be writeable and contiguous")
        if self.state is None:
            self._args(params.dtype)  # checked before the state is allocated
        state = self._state_for(params.shape[0], params.dtype)
        args = self._args(params.dtype)  # before t moves (SGD: the buffer's first step)
        self.t += 1
        head = (params, np.ascontiguousarray(grad), *state)
        if self.uses_step:
            head = head + (self.t,)
        # positional, in the declared order: the declaration is the kernel's signature
        return bool(_kernels.step_function(self.kernel)(*head, *args.values()))

    # -- persistence -----------------------------------------------------
    def get_config(self):
        """Hyperparameters as a dict (JSON-serialisable)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()
                if k not in ("state", "t") and not k.startswith("_")}

    #: integers the state holds besides t, by name: each is the step at
    #: which one of its vectors was created (0: not yet), so at most t + 1;
    #: held as the attribute ``_<name>`` (SGD: ``momentum_start``)
    _step_marks = ()

    def state_dict(self):
        """The optimizer's state as plain values (copies), for saving.

        Returns
        -------
        dict
            ``{"t": int, "extra": {name: int}, "state": ndarray or None}``:
            the step count; the other integers of the state (SGD:
            ``momentum_start``, the step that created its momentum buffer,
            0 before; ``{}`` for the others); and the slot vectors, of shape
            ``(len(slot_names), n_params)``, row j holding ``slot_names[j]``
            (None until the first update allocates them).  The
            hyperparameters are ``get_config()``.
        """
        # As held, unconverted: ``validate_state_dict`` says what is wrong
        # with a value a user set (a step count that is not an integer).
        state = self.state
        if isinstance(state, np.ndarray):
            state = np.array(state, order="C", copy=True)
        return {"t": self.t,
                "extra": {name: getattr(self, "_" + name) for name in self._step_marks},
                "state": state}

    def validate_state_dict(self, state_dict):
        """ValueError, naming the entry, unless ``load_state_dict`` accepts
        ``state_dict``: the keys of ``state_dict()``, ``t`` an integer in
        [0, 2**53), each ``extra`` integer in [0, t + 1], and ``state`` None
        or a float32/float64 array of shape ``(len(slot_names), n)`` holding
        only values this optimizer can produce (finite; second moments and
        step sizes >= 0)."""
        name = type(self).__name__
        keys = ("t", "extra", "state")
        if not isinstance(state_dict, dict) or set(state_dict) != set(keys):
            got = sorted(map(repr, state_dict)) if isinstance(state_dict, dict) else \
                type(state_dict).__name__
            raise ValueError(f"a {name} state dict has exactly the keys {keys}, got {got}")
        t = state_dict["t"]
        _check(_is_count(t) and 0 <= t < MAX_STEPS,
               f"{name} state 't' must be an integer in [0, 2**53), got {_short(t)}")
        extra = state_dict["extra"]
        _check(isinstance(extra, dict) and set(extra) == set(self._step_marks),
               f"{name} state 'extra' must be a dict with exactly the keys "
               f"{self._step_marks}, got {_short(extra)}")
        for key, value in extra.items():
            # the step that created a vector: at most the next one, t + 1
            _check(_is_count(value) and 0 <= value <= t + 1,
                   f"{name} state extra {key!r} must be an integer in [0, t + 1] = "
                   f"[0, {t + 1}], got {_short(value)}")
        state = state_dict["state"]
        if state is None:
            return
        _check(isinstance(state, np.ndarray) and state.dtype in (np.float32, np.float64)
               and state.ndim == 2 and state.shape[0] == len(self.slot_names),
               f"{name} state 'state' must be None or a float32/float64 array of shape "
               f"({len(self.slot_names)}, n_params) (rows {', '.join(self.slot_names)}), got "
               + (f"{state.dtype} array of shape {state.shape}" if isinstance(state, np.ndarray)
                  else type(state).__name__))
        self._check_state(state)

    def load_state_dict(self, state_dict):
        """Restore a state that ``state_dict`` gave (the values are copied).

        Raises
        ------
        ValueError
            As ``validate_state_dict``, before anything changes.
        """
        self.validate_state_dict(state_dict)
        state = state_dict["state"]
        self.state = None if state is None else np.array(state, order="C", copy=True)
        self.t = int(state_dict["t"])
        for key, value in state_dict["extra"].items():
            setattr(self, "_" + key, int(value))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"
