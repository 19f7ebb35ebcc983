"""Training history: per-epoch metrics kept on the model and returned by fit."""
#: the values of ``History.stopped_by``
STOP_KINDS = ("early_stopping", "target", "small_update", "nan", "callback", "no_progress",
              "divergence", "interrupt")


class History:
    """Per-epoch records of training, read like a table whose columns are
    the metrics and whose rows are the epochs (as a pandas DataFrame is).

    ``h["loss"]``, ``"val_loss" in h``, ``iter(h)``, ``h.keys()``,
    ``h.values()``, ``h.items()``, ``h.get(key)`` and ``dict(h)`` read the
    metric names and their per-epoch lists, ``h.history``; ``len(h)`` is
    the number of epochs (rows), ``h.n_epochs``, as in earlier versions, so
    ``epochs=E - len(net.history)`` still resumes a run.  The epoch numbers
    are ``h.epoch`` (not a key, as in Keras's ``History.history``).  It is
    not a ``collections.abc.Mapping``, whose ``len`` would count the keys.

    Attributes
    ----------
    epoch : list of int
        Epoch numbers (cumulative over successive ``fit`` calls).
    history : dict of str -> list
        ``loss`` (mean training loss over the epoch's batches), ``time``
        (seconds), ``samples_per_s``, and when validation data is given
        ``val_loss`` (plus ``val_accuracy`` for classification losses).
        An epoch resumed from a checkpoint records the time and rate of the
        part run in this process (its samples from the resumed batch on).
    n_epochs : int
        Epochs recorded, ``len(h.epoch)``.
    stop_reason : str or None
        Why the last fit stopped before running all its epochs, as a short
        sentence (e.g. "val_loss did not improve for 10 epochs (best 0.1234
        at epoch 63)"); None when it ran them all.  Reset when a fit begins.
    stopped_by : str or None
        What stopped it, for programs: "early_stopping", "target"
        (StopAtLoss), "small_update" (StopOnSmallUpdate), "nan"
        (TerminateOnNaN), "callback" (any other callback, or
        ``net.stop_training`` set from elsewhere), "no_progress"
        (Levenberg-Marquardt found no step that decreases the error),
        "divergence" (a non-finite loss or weight) or "interrupt" (Ctrl-C);
        None when ``stop_reason`` is.  Not saved in model files (a loaded
        model has the ``stop_reason`` of its last fit, and None here).
    weights_epoch : int or None
        The epoch whose weights the model holds when it is not the last one
        recorded: set by ``EarlyStopping(restore_best_weights=True)`` when it
        restores its best epoch; None (the last epoch's weights) once
        another epoch is recorded.  Not saved in model files.
    weights_note : str or None
        Why the model holds ``weights_epoch``'s weights (e.g. "best val_loss
        0.1234, restored by EarlyStopping"); set and cleared with it.
    """

    # class defaults: a History unpickled from an older fastbp lacks them
    stopped_by = None
    weights_epoch = None
    weights_note = None

    def __init__(self):
        self.epoch = []
        self.history = {}
        self.stop_reason = None
        self.stopped_by = None
        self.weights_epoch = None
        self.weights_note = None

    def append(self, epoch, **metrics):
        self.weights_epoch = self.weights_note = None  # a new epoch: its weights are the model's
        self.epoch.append(epoch)
        for key, value in metrics.items():
            self.history.setdefault(key, []).append(value)

    @property
    def n_epochs(self):
        """Epochs recorded (``len(self.epoch)``)."""
        return len(self.epoch)

    def __getitem__(self, key):
        return self.history[key]

    def __contains__(self, key):
        return key in self.history

    def __iter__(self):
        return iter(self.history)

    def keys(self):
        return self.history.keys()

    def values(self):
        return self.history.values()

    def items(self):
        return self.history.items()

    def get(self, key, default=None):
        return self.history.get(key, default)

    def __len__(self):
        return len(self.epoch)

    def to_dict(self):
        return {"epoch": list(self.epoch), "history": {k: list(v) for k, v in self.history.items()},
                "stop_reason": self.stop_reason}

    def __repr__(self):
        keys = ", ".join(self.history)
        return f"History({len(self.epoch)} epochs: {keys})"
