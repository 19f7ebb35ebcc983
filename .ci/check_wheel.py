"""Check a repaired Linux x86-64 wheel before it is installed (.ci/run).

- a manylinux wheel (auditwheel repair gave it its tag);
- it holds the package only: fastbp/ with its compiled modules (MODULES) and
  py.typed, and its dist-info; no tests, sources or data (the sdist has
  those);
- no compiled module targets the build machine's CPU: GCC records its
  flags in the debug info, and every -march there must be the x86-64
  baseline, with no -mavx* (a -march=native module dies with SIGILL on an
  older CPU; the kernels pick AVX2 or AVX-512 at run time instead).

Usage: python .ci/check_wheel.py WHEEL
"""
import re
import sys
import zipfile

MODULES = ("dense", "engine", "engine_ops", "engine_rows", "engine_optim", "losses")


def _problems(wheel):
    if not re.search(r"-manylinux_\d+_\d+_x86_64\.whl$", wheel):
        yield f"not a manylinux x86_64 wheel: {wheel}"
    z = zipfile.ZipFile(wheel)
    names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    extra = {t for t in tops if t != "fastbp" and not re.fullmatch(r"fastbp-[^/]+\.dist-info", t)}
    if extra:
        yield f"entries beside the package: {sorted(extra)}"
    if "fastbp/py.typed" not in names:
        yield "fastbp/py.typed is missing"
    stray = [n for n in names if n.endswith((".pyx", ".c", ".h", ".npz", ".fbp"))]
    if stray:
        yield f"sources or data in the wheel: {stray}"
    for mod in MODULES:
        found = [n for n in names
                 if re.fullmatch(rf"fastbp/_ext/{mod}\.cpython-\d+-x86_64-linux-gnu\.so", n)]
        if len(found) != 1:
            yield f"compiled module {mod}: {found or 'missing'}"
            continue
        producers = re.findall(rb"GNU C\d* [\d.]+[^\x00]*", z.read(found[0]))
        if not producers:
            yield f"{found[0]}: GCC recorded no flags (no debug info?)"
        for flags in producers:
            if (set(re.findall(rb"-march=(\S+)", flags)) - {b"x86-64"}
                    or re.search(rb"-mavx|-mfma", flags)):
                yield f"{found[0]} targets a particular CPU: {flags.decode(errors='replace')}"


def main(argv):
    problems = list(_problems(argv[1]))
    for p in problems:
        print("wheel check:", p, file=sys.stderr)
    if not problems:
        print(f"wheel check: {argv[1]} is a portable manylinux wheel of the package only")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
