"""Data-parallel training on MPI ranks: scikit-learn's digits, every rank
holding the whole data (replicated), each training its slice of every batch.

Run (after ``pip install "fastbp[mpich]"``, or ``fastbp[mpi]`` on a cluster)::

    mpiexec -n 2 fastbp mpi-demo
    mpiexec -n 2 python -m mpi4py -m fastbp.examples.mpi_digits   # the same

Every rank prints its test accuracy and a fingerprint of its weights (they
agree bit for bit), and rank 0 the same fit run in one process.
"""
import hashlib

import numpy as np


def main(sync_every=1):
    """Train on every rank (``sync_every`` > 1: local SGD, the ranks
    averaging their weights every that many steps) and print each rank's
    test accuracy and weight hash, and rank 0 the one-process fit's."""
    from mpi4py import MPI
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import fastbp

    comm = MPI.COMM_WORLD
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.25,
                                                        random_state=0)

    def fit(comm):
        net = fastbp.Sequential([fastbp.Dense(64, activation="relu"), fastbp.Dense(10)],
                                dtype="float64", seed=0)
        net.fit(X_train, y_train, loss="cross_entropy", optimizer=fastbp.optim.Adam(1e-3),
                epochs=20, batch_size=64, verbose=0, comm=comm,
                **({"sync_every": sync_every} if comm is not None else {}))
        return net

    net = fit(comm)
    accuracy = float(np.mean(net.predict(X_test).argmax(1) == y_test))
    digest = hashlib.sha256(_flat(net).tobytes()).hexdigest()[:16]
    lines = comm.gather(f"rank {comm.rank} of {comm.size}: test accuracy {accuracy:.4f}, "
                        f"weights sha256 {digest}", root=0)
    agree = comm.gather(digest, root=0)
    if comm.rank == 0:
        print("\n".join(lines))
        print("all ranks hold the same weights:", len(set(agree)) == 1)
        alone = fit(None)
        gap = np.max(np.abs(_flat(alone) - _flat(net)))
        print(f"one process, same fit: test accuracy "
              f"{np.mean(alone.predict(X_test).argmax(1) == y_test):.4f}, "
              f"largest weight difference {gap:.1e}")


def _flat(net):
    """Every weight and bias of ``net`` in one vector."""
    return np.concatenate([a.ravel() for pair in net.get_weights() for a in pair])


if __name__ == "__main__":
    main()
