"""Keep `rlft.py` (the jupytext percent-format source you edit) and `rlft.ipynb` (what Jupyter, papermill, the
tests and the benchmarks run) in sync; the same for any other paired notebook named on the command line (its
source is the .py beside it, e.g. experiments/fft_positions.py). `make notebook` runs the first command below for
every notebook of the repository; tests/test_notebook.py makes the same comparison as `check`.

    python tools/nbsync.py sync                # rlft.py -> rlft.ipynb, outputs stripped (`make notebook`)
    python tools/nbsync.py sync --from ipynb   # rlft.ipynb -> rlft.py, then the .ipynb rewritten clean
                                               # (`make notebook FROM=ipynb`: after editing or merging the .ipynb)
    python tools/nbsync.py check               # exit 1, saying what differs, if the two disagree
    python tools/nbsync.py sync experiments/fft_positions.ipynb   # another notebook (default: rlft.ipynb)

Both directions are deterministic: the .ipynb is written in one fixed JSON layout (indent 1, each cell's source one
string, no outputs), cells that keep their place keep their `id`, new cells get an id derived from their content.
The pairing itself is declared in `jupytext.toml`, so Jupyter with jupytext installed also saves both files.
A cell's metadata (`rlft.section`, the `parameters` tag, anything else) travels in the `# %%` line of rlft.py.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
from jupytext.config import load_jupytext_config

ROOT = Path(__file__).resolve().parent.parent
PY, NB = ROOT / "rlft.py", ROOT / "rlft.ipynb"
FMT = "py:percent"
# Metadata jupytext adds on reading a .py to remember its blank lines: layout of the text file, not of the notebook.
LAYOUT_KEYS = {"lines_to_next_cell", "lines_to_end_of_cell_marker", "cell_marker"}
# Cell metadata Jupyter adds while you work, which jupytext keeps out of the .py (so a sync drops it from the .ipynb).
VOLATILE_KEYS = {"autoscroll", "collapsed", "scrolled", "trusted", "execution", "ExecuteTime"}


def source_of(cell: dict) -> str:
    """A cell's source as one string (the .ipynb may hold it as a list of lines)."""
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def py_cells(path: Path = PY) -> list[dict]:
    """The cells of the percent-format source: [{cell_type, metadata, source}], in order."""
    nb = jupytext.read(path, fmt=FMT)
    return [{"cell_type": c.cell_type, "metadata": {k: v for k, v in c.metadata.items() if k not in LAYOUT_KEYS},
             "source": c.source} for c in nb.cells]


def nb_cells(path: Path = NB) -> list[dict]:
    """The notebook's cells, same shape as py_cells (outputs, execution counts and ids left out)."""
    nb = json.loads(path.read_text())
    return [{"cell_type": c["cell_type"], "metadata": c.get("metadata", {}), "source": source_of(c)}
            for c in nb["cells"]]


def aligned(old: list[dict], new: list[dict]):
    """Pair the cells of two lists as a diff does: yields (old index or None, new index or None); a pair of
    indices is a cell kept or edited in place, a lone index a cell only one list has."""
    key = lambda c: json.dumps([c["cell_type"], c["metadata"], c["source"]], sort_keys=True)
    matcher = difflib.SequenceMatcher(None, [key(c) for c in old], [key(c) for c in new], autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        paired = min(i2 - i1, j2 - j1) if op == "replace" else (i2 - i1 if op == "equal" else 0)
        yield from ((i1 + k, j1 + k) for k in range(paired))
        yield from ((i, None) for i in range(i1 + paired, i2))
        yield from ((None, j) for j in range(j1 + paired, j2))


def first_line(cell: dict) -> str:
    return repr(cell["source"].split("\n")[0][:60])


def differences(py: list[dict], nb: list[dict]) -> list[str]:
    """What differs between the source's cells and the notebook's, one line per cell ([] when they agree)."""
    out = []
    for i, j in aligned(py, nb):
        if j is None:
            out.append(f".py cell {i} {first_line(py[i])} is not in the .ipynb")
        elif i is None:
            out.append(f".ipynb cell {j} {first_line(nb[j])} is not in the .py")
        else:
            fields = [f for f in ("cell_type", "metadata", "source") if py[i][f] != nb[j][f]]
            if fields:
                out.append(f"cell {i} {first_line(py[i])}: {' and '.join(fields)} differ" + "s" * (len(fields) == 1))
    return out


def summary(old: list[dict], new: list[dict]) -> str:
    """How many cells an update kept, edited, added and removed, e.g. '48 cells: 46 kept, 1 edited, 1 added'."""
    counts = {"kept": 0, "edited": 0, "added": 0, "removed": 0}
    for i, j in aligned(old, new):
        kind = "added" if i is None else "removed" if j is None else "kept" if old[i] == new[j] else "edited"
        counts[kind] += 1
    return f"{len(new)} cells: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n or k == "kept")


def cell_id(source: str, taken: set[str]) -> str:
    """A new cell's id: 8 hex digits of its source's hash, unique in the notebook."""
    digest, salt = "", 0
    while not digest or digest in taken:
        digest = hashlib.sha1(f"{salt}:{source}".encode()).hexdigest()[:8]
        salt += 1
    taken.add(digest)
    return digest


def carried_ids(old: list[dict], new: list[dict]) -> list[str | None]:
    """For each new cell, the id of the old cell it continues (unchanged, or edited in place), else None."""
    old = [{**c, "source": source_of(c), "metadata": c.get("metadata", {})} for c in old]
    ids: list[str | None] = [None] * len(new)
    for i, j in aligned(old, new):
        if i is not None and j is not None:
            ids[j] = old[i].get("id")
    return ids


def write_ipynb(cells: list[dict], path: Path = NB, metadata: dict | None = None) -> None:
    """Write `cells` as the notebook, keeping its notebook-level metadata and the ids of continuing cells
    (`metadata`: the notebook-level metadata of a notebook written for the first time)."""
    old = json.loads(path.read_text()) if path.exists() else \
        {"metadata": metadata or {}, "nbformat": 4, "nbformat_minor": 5}
    ids = carried_ids(old.get("cells", []), cells)
    taken = {i for i in ids if i}
    out = []
    for cell, cid in zip(cells, ids):
        c = {"cell_type": cell["cell_type"], "metadata": cell["metadata"], "source": cell["source"]}
        if c["cell_type"] == "code":
            c.update(outputs=[], execution_count=None)
        c["id"] = cid or cell_id(cell["source"], taken)
        out.append(c)
    metadata = {k: v for k, v in old.get("metadata", {}).items() if k != "jupytext"}
    nb = {"cells": out, "metadata": metadata, "nbformat": old.get("nbformat", 4),
          "nbformat_minor": old.get("nbformat_minor", 5)}
    nbformat.validate(nbformat.from_dict(nb))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_py(nb_path: Path = NB, py_path: Path = PY) -> None:
    """Write the percent-format source from the notebook (jupytext, with the repository's jupytext.toml)."""
    nb = nbformat.reads(nb_path.read_text(), as_version=4)
    text = jupytext.writes(nb, fmt=FMT, config=load_jupytext_config(str(nb_path)))
    py_path.write_text(text)


def py_committed_unchanged(py_path: Path = PY) -> bool:
    """True when git says the source (rlft.py) is committed with no change since (False if untracked, or outside git)."""
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--", str(py_path)], cwd=ROOT, capture_output=True,
                           text=True)
    except OSError:
        return False
    return r.returncode == 0 and r.stdout.strip() == ""


def sync(source: str, force: bool = False, nb_path: Path = NB) -> None:
    """Make the notebook `nb_path` and its source (the .py beside it) agree, taking `source` ("py" or "ipynb") as
    the truth."""
    py_path = nb_path.with_suffix(".py")
    py, nb = py_path.name, nb_path.name
    if source == "ipynb":
        write_py(nb_path, py_path)
        kept = [{**c, "metadata": {k: v for k, v in c["metadata"].items() if k not in VOLATILE_KEYS}}
                for c in nb_cells(nb_path)]
        lost = differences(py_cells(py_path), kept)
        if lost:  # jupytext could not represent something: stop before the .ipynb is rewritten from the .py
            sys.exit(f"{py} was written from {nb}, but reads back differently, so {nb} was left as it "
                     "was:\n  " + "\n  ".join(lost))
    elif py_path.exists() and nb_path.exists() and not force and py_committed_unchanged(py_path) and \
            differences(py_cells(py_path), nb_cells(nb_path)):
        sys.exit(f"{py} has no uncommitted change, yet {nb} differs from it: the notebook was edited (in "
                 "Jupyter, or by a merge). Keep those edits with `make notebook FROM=ipynb`, or overwrite them "
                 f"from {py} with `make notebook FORCE=1`.")
    before = nb_cells(nb_path) if nb_path.exists() else []
    after = py_cells(py_path)
    header = {k: v for k, v in jupytext.read(py_path, fmt=FMT).metadata.items() if k != "jupytext"}
    write_ipynb(after, nb_path, metadata=header)
    print(f"{nb} <- {py}: {summary(before, after)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["sync", "check"])
    ap.add_argument("--from", dest="source", choices=["py", "ipynb"], default="py")
    ap.add_argument("--force", action="store_true", help="sync from the .py even if that drops notebook edits")
    ap.add_argument("notebooks", nargs="*", type=Path, default=[NB],
                    help="the notebooks (.ipynb), each paired with the .py beside it (default: rlft.ipynb)")
    a = ap.parse_intermixed_args()  # the notebooks may follow --from
    for nb_path in a.notebooks:
        nb_path = nb_path.resolve()
        py_path, name = nb_path.with_suffix(".py"), nb_path.with_suffix("").name
        if a.cmd == "sync":
            sync(a.source, a.force, nb_path)
            continue
        diff = differences(py_cells(py_path), nb_cells(nb_path))
        if diff:
            sys.exit(f"{name}.py and {name}.ipynb differ: run make notebook (make notebook FROM=ipynb if you "
                     "edited the .ipynb):\n  " + "\n  ".join(diff))
        print(f"{name}.py and {name}.ipynb agree")


if __name__ == "__main__":
    main()
