"""Training history: per-epoch metrics kept on the model and returned by fit."""


class History:
    """Per-epoch records of training.

    Attributes
    ----------
    epoch : list of int
        Epoch numbers (cumulative over successive ``fit`` calls).
    history : dict of str -> list
        ``loss`` (mean training loss over the epoch's batches), ``time``
        (seconds), ``samples_per_s``, and when validation data is given
        ``val_loss`` (plus ``val_accuracy`` for classification losses).
    stop_reason : str or None
        Why the last fit stopped early (e.g. divergence), else None.
    weights_epoch : int or None
        The epoch whose weights the model holds when it is not the last one
        recorded: set by ``EarlyStopping(restore_best_weights=True)`` when it
        restores its best epoch; None (the last epoch's weights) once
        another epoch is recorded.  Not saved in model files.
    """

    def __init__(self):
        self.epoch = []
        self.history = {}
        self.stop_reason = None
        self.weights_epoch = None

    def append(self, epoch, **metrics):
        self.weights_epoch = None  # a new epoch: its weights are the model's
        self.epoch.append(epoch)
        for key, value in metrics.items():
            self.history.setdefault(key, []).append(value)

    def __getitem__(self, key):
        return self.history[key]

    def __len__(self):
        return len(self.epoch)

    def to_dict(self):
        return {"epoch": list(self.epoch), "history": {k: list(v) for k, v in self.history.items()},
                "stop_reason": self.stop_reason}

    def __repr__(self):
        keys = ", ".join(self.history)
        return f"History({len(self.epoch)} epochs: {keys})"
