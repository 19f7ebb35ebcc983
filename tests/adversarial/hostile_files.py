"""Hostile model files and save targets against fastbp.io (issue 13, items 10 and 11).

Crafted and mutated model files (byte flips, truncations, insertions, huge
header lengths, bad JSON, every header field set to junk, NaN / infinite /
negative optimizer state, huge integers and long lists) are loaded in child
processes, many per child, each outcome reported as it happens, so that a
crash or a hang is pinned on the file that caused it and the child restarted
for the rest.  A file that loads is then used: ``predict``, and one epoch of
``fit`` with the settings it records.  Then save targets: a symlink (to a
file, a dangling one, a chain), a FIFO, a socket, a folder, a missing folder,
a symlink loop, each in a child with a timeout (a FIFO opened for writing
blocks).

Outcomes: a load is "loaded" (and then fit: "fit ok", "fit ValueError",
"fit diverged" are fine) or "ModelFormatError"; any other exception, crash
or hang is a failure.  A save target passes when the documented thing
happens (fastbp/_files.py).

    python tests/adversarial/hostile_files.py --trials 3000

Prints the counts; the exit status is 1 when any trial failed.
"""
import argparse
import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402

MAGIC = b"FASTBP\x00\x01"
#: seconds a child may take for one file before it counts as a hang
HANG_SECONDS = 20

CHILD = r"""
import sys, warnings, numpy as np, fastbp
warnings.simplefilter("ignore")
paths = open(sys.argv[1]).read().split("\n")
first = int(sys.argv[2])
rng = np.random.default_rng(0)

def use(net):
    if not net.built:
        return "unbuilt"
    net.predict(np.zeros((2, net.n_features)))
    if net.optimizer is None:
        return "no optimizer"
    net.discard_partial_epoch()
    k, loss = net.n_outputs, net._last_loss or "mse"
    X = rng.normal(size=(24, net.n_features))
    y = {"cross_entropy": rng.integers(0, k, 24), "binary_cross_entropy": rng.random((24, k))
         }.get(loss, rng.normal(size=(24, k)))
    try:
        net.fit(X, y, epochs=1, verbose=0)
    except fastbp.DivergenceError:
        return "fit diverged"
    except ValueError:
        return "fit ValueError"
    if not np.isfinite(net.params).all():
        raise AssertionError("a fit left non-finite parameters")
    return "fit ok"

for i in range(first, len(paths)):
    print(f"start {i}", flush=True)
    try:
        net = fastbp.load(paths[i])
    except fastbp.ModelFormatError:
        print(f"done {i} ModelFormatError", flush=True)
        continue
    except Exception as exc:
        print(f"done {i} FAIL load {type(exc).__name__}: {str(exc)[:200]!r}", flush=True)
        continue
    try:
        print(f"done {i} loaded {use(net)}", flush=True)
    except Exception as exc:
        print(f"done {i} FAIL use {type(exc).__name__}: {str(exc)[:200]!r}", flush=True)
"""


# -- base files -------------------------------------------------------------------------
def _bases(folder):
    """Valid files covering every field and every optimizer."""
    import fastbp
    from fastbp import optim

    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 4))
    labels = rng.integers(0, 3, 40)
    out = []

    def net(dtype, layers=None):
        layers = layers or [fastbp.Dense(5, activation="tanh"), fastbp.Dense(3)]
        return fastbp.Sequential(layers, dtype=dtype, seed=2)

    cases = [("adam_amsgrad", "float32", optim.Adam(amsgrad=True), "cross_entropy"),
             ("sgd_momentum", "float64", optim.SGD(lr=0.05, momentum=0.9), "mse"),
             ("rmsprop", "float32", optim.RMSprop(centered=True, momentum=0.5), "cross_entropy"),
             ("rprop", "float64", optim.Rprop(), "binary_cross_entropy"),
             ("adagrad", "float64", optim.Adagrad(), "mse"),
             ("adamw", "float32", optim.AdamW(), "mse")]
    for name, dtype, opt, loss in cases:
        model = net(dtype)
        y = {"cross_entropy": labels, "binary_cross_entropy": rng.random((40, 3))}.get(
            loss, rng.normal(size=(40, 3)))
        path = os.path.join(folder, f"{name}.fbp")
        saved = []
        real_save = fastbp.Sequential.save

        def keep(self, p, saved=saved, real_save=real_save):
            real_save(self, p)
            with open(p, "rb") as f:
                saved.append(f.read())
        fastbp.Sequential.save = keep
        try:
            model.fit(X, y, loss=loss, optimizer=opt, epochs=2, batch_size=8, verbose=0,
                      checkpoint=path, checkpoint_every=3, clip_norm=1.0, n_threads=1)
        finally:
            fastbp.Sequential.save = real_save
        out += [_without_timings(saved[1]), _without_timings(saved[-1])]  # mid-epoch, end
    fancy = net("float64", [fastbp.Dense(6, activation="relu"), fastbp.BatchNorm(),
                            fastbp.Dropout(0.2),
                            fastbp.Residual([fastbp.Dense(6, activation="tanh")]),
                            fastbp.Dense(3)])
    fancy.fit(X, labels, loss="cross_entropy", epochs=1, batch_size=10, verbose=0)
    fancy.save(os.path.join(folder, "fancy.fbp"))
    fastbp.Sequential([fastbp.Dense(2)]).save(os.path.join(folder, "unbuilt.fbp"))
    for name in ("fancy.fbp", "unbuilt.fbp"):
        with open(os.path.join(folder, name), "rb") as f:
            out.append(_without_timings(f.read()))
    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    if os.path.isdir(data):  # version 1 files
        for name in sorted(os.listdir(data)):
            with open(os.path.join(data, name), "rb") as f:
                out.append(f.read())
    return out


def _without_timings(data):
    """The same file with fixed timing metrics: the variants of a seed are
    then the same on every run."""
    header, body = _split(data)
    for key, value in (("time", 0.25), ("samples_per_s", 1000.0)):
        if key in header["history"]["history"]:
            header["history"]["history"][key] = [value] * len(header["history"]["epoch"])
    return _assemble(header, body, raw=json.dumps(header, separators=(",", ":")).encode())


# -- mutations --------------------------------------------------------------------------
def _split(data):
    (n,) = struct.unpack("<Q", data[8:16])
    return json.loads(data[16:16 + n]), data[16 + n:]


def _assemble(header, body, header_len=None, raw=None):
    raw = json.dumps(header).encode() if raw is None else raw
    return MAGIC + struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + body


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def _replace(obj, path, value):
    obj = json.loads(json.dumps(obj))
    if not path:
        return value
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return obj


JUNK = [None, True, False, 0, 1, -1, 2, 1.5, -0.0, math.nan, math.inf, -math.inf, "", "x",
        [], [0], {}, {"a": 1}, 2 ** 31, 2 ** 53, 2 ** 63 - 1, 2 ** 64, -2 ** 63, 10 ** 39,
        10 ** 41, 10 ** 300, 1e39, 1e308, -1e-300, [2 ** 62] * 3, [1] * 2000]


def _huge_int_text(digits):
    return "1" + "0" * (digits - 1)


def _mutate(base, rng):
    """One hostile variant of ``base``: (kind, bytes, must be refused)."""
    header, body = _split(base)
    n = len(base)
    kind = rng.choice(["flip", "flip", "truncate", "insert", "overwrite", "field", "field",
                       "field", "header_len", "json", "state", "huge_int", "long_list"])
    if kind == "flip":
        data = bytearray(base)
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            pos = rng.randrange(n)
            data[pos] ^= 1 << rng.randrange(8)
        return kind, bytes(data), False
    if kind == "truncate":
        return kind, base[:rng.randrange(n)], True
    if kind == "insert":
        pos = rng.randrange(n)
        return kind, base[:pos] + os.urandom(rng.randrange(1, 9)) + base[pos:], False
    if kind == "overwrite":
        pos, k = rng.randrange(n), rng.randrange(1, 32)
        return kind, base[:pos] + os.urandom(k) + base[pos + k:], False
    if kind == "field":
        path = rng.choice(list(_paths(header))[1:])
        return kind, _assemble(_replace(header, path, rng.choice(JUNK)), body), False
    if kind == "header_len":
        length = rng.choice([0, 1, n, 2 ** 24 + 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1,
                             rng.randrange(2 ** 32, 2 ** 64)])
        return kind, _assemble(header, body, header_len=length), True
    if kind == "json":
        raw = rng.choice([b"[" * 200000, b'{"a":' * 50000 + b"1" + b"}" * 50000,
                          b"[" + b"[]," * 200000 + b"[]]", b"\xff\xfe{}", b"NaN",
                          json.dumps(header).encode()[:-1], os.urandom(200),
                          json.dumps(header).replace('"version": ', '"version": 1, "version": ', 1)
                          .encode()])  # a duplicate key
        return kind, _assemble(None, body, raw=raw), True
    if (kind == "state" and header.get("arrays")
            and header["arrays"][-1]["name"] == "optimizer_state"
            and header["arrays"][-1]["shape"][0] > 0):
        dt = np.dtype(header["arrays"][-1]["dtype"])
        slots, count = header["arrays"][-1]["shape"]
        split = len(body) - slots * count * dt.itemsize
        state = np.frombuffer(body[split:], dtype=dt).reshape(slots, count).copy()
        slot, value = rng.randrange(slots), rng.choice([np.nan, np.inf, -np.inf, -1.0, -1e-30, 1e30])
        state[slot, rng.randrange(count)] = value
        return f"state-{slot}-{value}", _assemble(header, body[:split] + state.tobytes()), \
            _refused_state(header, slot, value)
    if kind == "huge_int":
        # an integer literal of many digits in a field that holds integers
        paths = [p for p in _paths(header) if p and isinstance(_get(header, p), int)]
        digits = rng.choice([41, 400, 4300, 100000])
        huge = [_huge_int_text(digits)] * (rng.choice([1, 1, 1024]) if digits <= 4300 else 1)
        text = json.dumps(_replace(header, rng.choice(paths) if paths else ("seed",),
                                   "__HUGE__" if len(huge) == 1 else ["__HUGE__"] * len(huge)))
        return kind, _assemble(None, body, raw=text.replace('"__HUGE__"', huge[0]).encode()), True
    if kind == "long_list":
        path = rng.choice([("seed",), ("history", "epoch"), ("layers",)])
        value = [1] * rng.choice([1025, 1025, 10_001, 10_001, 1_000_001])
        refused = path != ("history", "epoch") or len(value) > 1_000_000
        return kind, _assemble(_replace(header, path, value), body), refused
    return "flip", bytes(b ^ 0xFF if i == 20 else b for i, b in enumerate(base)), False


#: per optimizer class: (its state slots, those >= 0, those free of checks),
#: as fastbp.io's range checks define them (fastbp/optim.py)
STATE_RULES = {"Adam": (("m", "v", "vmax"), ("v", "vmax"), ()),
               "AdamW": (("m", "v", "vmax"), ("v", "vmax"), ()),
               "SGD": (("buf",), (), ()),
               "RMSprop": (("square_avg", "grad_avg", "buf"), ("square_avg",), ()),
               "Rprop": (("prev", "step_size"), ("step_size",), ("prev",)),
               "Adagrad": (("state_sum",), ("state_sum",), ())}


def _refused_state(header, slot, value):
    """Whether a state holding ``value`` in row ``slot`` must be refused."""
    slots, nonnegative, free = STATE_RULES[header["optimizer"]["class"]]
    if header["version"] == 1 and slot >= len(slots):
        return False
    name = slots[slot]
    if name in free:
        return False
    return not np.isfinite(value) or (value < 0 and name in nonnegative)


# -- loading in children ------------------------------------------------------------------
def _count_load(path, outcome, counts, failures):
    """Tally one file's outcome; a loaded file named *-must-refuse* fails."""
    if outcome.startswith("FAIL"):
        counts["other exception (failure)"] += 1
        failures.append(f"{path}: {outcome}")
    elif outcome.startswith("loaded") and "-must-refuse" in path:
        counts["loaded, but must be refused (failure)"] += 1
        failures.append(f"{path}: loaded, but must be refused")
    elif outcome.startswith("loaded"):
        counts["loaded"] += 1
        counts[outcome.replace("loaded", "after load:")] += 1
    else:
        counts[outcome] += 1


def _load_all(paths, counts, failures):
    """Load every file in children; a crash or hang is pinned on its file."""
    listing = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    listing.write("\n".join(paths))
    listing.close()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    first = 0
    try:
        while first < len(paths):
            current, returncode, err = _children.follow(
                CHILD, [listing.name, first], env,
                lambda index, outcome: _count_load(paths[index], outcome, counts, failures),
                HANG_SECONDS)
            if current is None:
                if returncode != 0:
                    failures.append(f"child exited {returncode} between files: {err}")
                break
            what = "hang" if returncode == -9 else f"crash (exit {returncode})"
            counts["crash/hang (failure)"] += 1
            failures.append(f"{paths[current]}: {what}: {err}")
            first = current + 1
    finally:
        os.unlink(listing.name)


# -- save targets ---------------------------------------------------------------------------
SAVE_CHILD = r"""
import errno, os, socket, stat, sys, numpy as np, fastbp
folder = sys.argv[1]
net = fastbp.Sequential([fastbp.Dense(3), fastbp.Dense(2)], seed=0).build(4)
other = fastbp.Sequential([fastbp.Dense(3), fastbp.Dense(2)], seed=1).build(4)
join = lambda *p: os.path.join(folder, *p)

def check(name, cond):
    print(("pass " if cond else "FAIL ") + name, flush=True)

os.mkdir(join("real"))
net.save(join("real", "m.fbp"))
os.symlink(os.path.join("real", "m.fbp"), join("link"))
os.symlink(join("link"), join("chain"))
other.save(join("chain"))
check("symlink chain written through", os.path.islink(join("link")) and os.path.islink(join("chain"))
      and fastbp.load(join("real", "m.fbp")).params.tobytes() == other.params.tobytes()
      and os.listdir(join("real")) == ["m.fbp"])
os.symlink(join("real", "new.fbp"), join("dangling"))
net.save(join("dangling"))
check("dangling symlink creates its target", os.path.islink(join("dangling"))
      and os.path.isfile(join("real", "new.fbp")))
os.mkfifo(join("fifo"))
os.symlink(join("fifo"), join("to-fifo"))
sock = socket.socket(socket.AF_UNIX)
sock.bind(join("sock"))
for name, kind in (("fifo", stat.S_ISFIFO), ("to-fifo", stat.S_ISFIFO), ("sock", stat.S_ISSOCK)):
    try:
        net.save(join(name))
        check(f"save to {name} refused", False)
    except ValueError:
        check(f"save to {name} refused", kind(os.stat(join(name)).st_mode))
for name, make in (("CSVLogger", lambda p: fastbp.callbacks.CSVLogger(p)),
                   ("CSVLogger append", lambda p: fastbp.callbacks.CSVLogger(p, append=True)),
                   ("ModelCheckpoint", lambda p: fastbp.callbacks.ModelCheckpoint(p))):
    try:
        net.fit(np.zeros((8, 4)), np.zeros((8, 2)), epochs=1, verbose=0, callbacks=[make(join("fifo"))])
        check(f"{name} to a fifo refused", False)
    except ValueError:
        check(f"{name} to a fifo refused", stat.S_ISFIFO(os.stat(join("fifo")).st_mode))
try:
    net.save(join("missing", "deeper", "m.fbp"))
    check("missing folder named", False)
except FileNotFoundError as exc:
    check("missing folder named", exc.filename == join("missing", "deeper"))
try:
    net.save(folder)
    check("folder refused", False)
except IsADirectoryError:
    check("folder refused", os.path.isdir(folder))
os.symlink(join("loop-b"), join("loop-a"))
os.symlink(join("loop-a"), join("loop-b"))
try:
    net.save(join("loop-a"))
    check("symlink loop refused", False)
except OSError as exc:
    check("symlink loop refused", exc.errno == errno.ELOOP and os.path.islink(join("loop-a")))
leftovers = [n for r, _, files in os.walk(folder) for n in files if n.endswith(".tmp")]
check("no temporary file left", not leftovers)
"""


def _save_targets(counts, failures):
    with tempfile.TemporaryDirectory() as folder:
        try:
            proc = subprocess.run([sys.executable, "-P", "-c", SAVE_CHILD, folder], capture_output=True,
                                  text=True, timeout=120)
        except subprocess.TimeoutExpired:
            counts["save targets: hang (failure)"] += 1
            failures.append("save targets: the child hung (a FIFO opened for writing?)")
            return
    for line in proc.stdout.splitlines():
        word, name = line.split(" ", 1)
        counts["save targets passed" if word == "pass" else "save targets failed"] += 1
        if word != "pass":
            failures.append(f"save target: {name}")
    if proc.returncode != 0:
        counts["save targets: crash or exception (failure)"] += 1
        failures.append(f"save targets child: exit {proc.returncode}: {proc.stderr[-500:]}")


# -- driver -------------------------------------------------------------------------------------
class Counts(dict):
    def __missing__(self, key):
        return 0


def run(trials=3000, seed=0, verbose=True):
    """Run ``trials`` hostile files and the save-target checks; returns
    (counts, failures)."""
    rng = random.Random(seed)
    counts, failures = Counts(), []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        bases = _bases(folder)
        kinds = Counts()
        paths = []
        for i in range(trials):
            kind, data, must_refuse = _mutate(rng.choice(bases), rng)
            kinds[kind.split("-")[0]] += 1
            path = os.path.join(folder, f"f{i:05d}-{kind}{'-must-refuse' if must_refuse else ''}"
                                        ".fbp")
            with open(path, "wb") as f:
                f.write(data)
            paths.append(path)
        made = time.perf_counter()
        _load_all(paths, counts, failures)
        loaded = time.perf_counter()
    _save_targets(counts, failures)
    counts["trials"] = trials
    if verbose:
        print(f"hostile files: {trials} ({dict(sorted(kinds.items()))}), made in "
              f"{made - start:.1f} s, loaded in {loaded - made:.1f} s")
    return counts, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts, failures = run(args.trials, args.seed)
    passed = counts["ModelFormatError"] + counts["loaded"]
    print(f"trials run: {counts['trials']} files, passed: {passed}, "
          f"failures: {counts['trials'] - passed}")
    for key, value in sorted(counts.items()):
        print(f"  {key}: {value}")
    for line in failures[:30]:
        print("FAILURE", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
