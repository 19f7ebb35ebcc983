"""A sparse autoencoder on scikit-learn's digits: an L1 activity penalty on
the code layer makes most code units silent for any one image.

Run: ``python -m fastbp.examples.sparse_autoencoder``
"""


def train(activity_l1, epochs=60, seed=0, verbose=0):
    """Train 64 -> 32 (sigmoid code) -> 64 (sigmoid) on digits with mse;
    returns (net, mean code activation, reconstruction mse)."""
    from sklearn.datasets import load_digits

    import fastbp

    X = (load_digits().data / 16.0).astype("float32")
    reg = fastbp.regularizers.l1(activity_l1) if activity_l1 else None
    net = fastbp.Sequential([
        fastbp.Dense(32, activation="sigmoid", activity_regularizer=reg),
        fastbp.Dense(64, activation="sigmoid"),
    ], dtype="float32", seed=seed)
    net.fit(X, X, loss="mse", optimizer=fastbp.optim.Adam(lr=3e-3), epochs=epochs,
            batch_size=32, verbose=verbose)
    code = fastbp.Sequential([fastbp.Dense(32, activation="sigmoid")], dtype="float32").build(64)
    code.copy_weights_from(net, layers=[0])
    return net, float(code.predict(X).mean()), net.evaluate(X, X, loss="mse")


def main():
    for l1 in (0.0, 1e-3):
        _, activation, mse = train(l1)
        print(f"activity L1 {l1:g}: mean code activation {activation:.3f}, "
              f"reconstruction mse {mse:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
