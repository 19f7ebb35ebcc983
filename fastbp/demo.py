"""The main job: train a classifier on scikit-learn's bundled digits data.

Shows the progress of every epoch, then the test accuracy and the training
speed in samples per second.  The data ships with scikit-learn (no download).
"""
import time

import numpy as np


def run(epochs=30, batch_size=32, hidden=(64, 64), dtype="float32", seed=0):
    """Train and report; ``hidden`` is the width of each hidden layer (an int
    means two layers of that width).  Returns 0 when the test accuracy
    passes 0.9, else 1 (the command's exit status)."""
    t0 = time.perf_counter()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import fastbp

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(dtype)  # pixel values 0..16 -> [0, 1]
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=seed,
                                                        stratify=y)
    X_fit, X_val, y_fit, y_val = train_test_split(X_train, y_train, test_size=0.15,
                                                  random_state=seed, stratify=y_train)
    hidden = [hidden, hidden] if isinstance(hidden, int) else list(hidden)
    net = fastbp.Sequential([fastbp.Dense(w, activation="relu") for w in hidden]
                            + [fastbp.Dense(10)], dtype=dtype, seed=seed)
    print(f"fastbp {fastbp.__version__} demo: digits (8x8 images, 10 classes), "
          f"{len(X_fit)} train / {len(X_val)} validation / {len(X_test)} test samples")
    net.build(X.shape[1])
    print(net.summary())
    print(f"training: cross_entropy, Adam(lr=1e-3), batch {batch_size}, {epochs} epochs, {dtype}")
    hist = net.fit(X_fit, y_fit, loss="cross_entropy", optimizer=fastbp.optim.Adam(lr=1e-3),
                   epochs=epochs, batch_size=batch_size, validation_data=(X_val, y_val), verbose=1)
    accuracy = float(np.mean(net.predict(X_test).argmax(axis=1) == y_test))
    train_seconds = sum(hist["time"])
    samples = len(X_fit) * len(hist.epoch)
    print(f"test accuracy: {accuracy:.4f} ({len(X_test)} samples)")
    print(f"training speed: {samples / train_seconds:,.0f} samples/s "
          f"({train_seconds:.2f} s for {len(hist.epoch)} epochs; median epoch "
          f"{np.median(hist['samples_per_s']):,.0f} samples/s)")
    print(f"total time including import and compilation: {time.perf_counter() - t0:.2f} s")
    return 0 if accuracy > 0.9 else 1
