"""The document tests of the layout (shared/design/LAYOUT.md, issue 31): the notebook reads like a paper and the
plumbing stays out of it. They read files only, so they take well under a second."""
import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import structure  # noqa: E402

NOTEBOOKS = [ROOT / "rlft.py", ROOT / "experiments" / "fft_positions.py"]


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_is_at_most_60_lines(source):
    too_long = [(c["start"], structure.nonblank(c)) for c in structure.cells(source.read_text())
                if c["kind"] == "code" and structure.nonblank(c) > structure.TARGETS["largest code cell"]]
    assert too_long == [], f"{source.name}: code cells over 60 non-blank lines (line, lines): {too_long}"


def test_every_equation_sits_at_most_15_lines_above_its_code():
    text = (ROOT / "rlft.py").read_text()
    cs = structure.cells(text)
    far = [e for e in structure.equation_distances(cs, structure.definitions(cs))
           if e["distance"] > structure.TARGETS["equation to its code"]]
    assert far == [], f"equations too far above their code: {far}"


def test_the_parameters_cell_holds_exactly_the_method_knobs_of_config():
    from rlft_support.config import Config
    no_default = {f.name for f in dataclasses.fields(Config)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    cell = structure.parameter_names(structure.cells((ROOT / "rlft.py").read_text()))
    assert cell == no_default, f"only in the cell: {sorted(cell - no_default)}; only in Config: {sorted(no_default - cell)}"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", sorted((ROOT / "rlft_support").glob("*.py")), ids=lambda p: p.name)
def test_rlft_support_never_imports_the_notebook(module):
    assert not {"nbimport", "rlft", "chat", "rlft_dp"} & imported_modules(module)
    text = module.read_text()
    assert not re.search(r"\bload_notebook\(|\bnbformat\b|exec\(", text), f"{module.name} loads a notebook"


def test_docs_structure_is_what_the_tool_measures():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "structure.py"), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
