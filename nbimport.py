"""Import the definition cells of a notebook as a Python module — how tests/, benchmarks/ and `make demo` use
rlft.ipynb. It lives at the repository root, so nothing outside tests/ depends on the test folder:

    import sys; sys.path.insert(0, REPO_ROOT)   # where the repository root is not on sys.path already
    from nbimport import load_notebook, notebook_config, notebook_parameters

A definition cell starts with the line `#| export` (or carries the cell tag `export`). Such cells hold imports,
functions and classes only, so importing runs no model and no training. The cell sources are registered with
`linecache`, so tracebacks show the notebook's own lines, named like `rlft.ipynb[cell 8]`.
"""
from __future__ import annotations

import __future__
import linecache
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

import nbformat

if TYPE_CHECKING:
    from rlft_support.config import Config

EXPORT_MARK = "#| export"
ROOT = Path(__file__).resolve().parent
_LOADED: dict[Path, types.ModuleType] = {}


def is_export_cell(cell) -> bool:
    """True for a code cell marked `#| export` on its first line or tagged `export`."""
    if cell.cell_type != "code":
        return False
    return cell.source.lstrip().startswith(EXPORT_MARK) or "export" in cell.metadata.get("tags", [])


def export_cells(path: Path) -> list[tuple[int, str]]:
    """(cell index, source) of each definition cell, in notebook order."""
    nb = nbformat.read(path, as_version=4)
    return [(i, c.source) for i, c in enumerate(nb.cells) if is_export_cell(c)]


def notebook_parameters(path: str | Path = ROOT / "rlft.ipynb") -> dict:
    """The defaults of the notebook's `parameters` cell, as a dict of name -> value."""
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    values: dict = {}
    exec(cell.source, {}, values)
    return values


def notebook_config(path: str | Path = ROOT / "rlft.ipynb", **overrides) -> Config:
    """The notebook's `rlft_support.config.Config`: its parameters cell's values (those that are Config fields),
    then `overrides` by knob name; an unknown name is a TypeError, a bad value a ValueError naming the knob.
    (Imported here, not at the top: rlft_support.config imports torch, which importing nbimport does not.)"""
    import dataclasses

    from rlft_support.config import Config
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{**{k: v for k, v in notebook_parameters(path).items() if k in fields}, **overrides})


def load_notebook(path: str | Path = ROOT / "rlft.ipynb", name: str = "rlft", reload: bool = False) -> types.ModuleType:
    """Execute the notebook's definition cells into a fresh module named `name` (cached per path)."""
    path = Path(path).resolve()
    if path in _LOADED and not reload:
        return _LOADED[path]
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # dataclasses and pickling look classes up here
    for index, source in export_cells(path):
        for line in source.splitlines():
            if line.lstrip().startswith(("%", "!")):
                raise SyntaxError(f"{path.name}[cell {index}]: definition cells may not use magics: {line!r}")
        filename = f"{path.name}[cell {index}]"
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
        exec(compile(source, filename, "exec", flags=__future__.annotations.compiler_flag), module.__dict__)
    _LOADED[path] = module
    return module
