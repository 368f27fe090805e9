"""The notebook as a document: committed clean, one parameters cell, importable definition cells."""
import ast
import time

import nbformat
import pytest
import torch

from nbimport import ROOT, export_cells, load_notebook

NB_PATH = ROOT / "rlft.ipynb"
# Every notebook of the repository, each paired with the jupytext source beside it (tools/nbsync.py keeps them in sync).
NOTEBOOKS = [NB_PATH, ROOT / "experiments" / "fft_positions.ipynb"]
each_notebook = pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)


def read_nb(path=NB_PATH):
    return nbformat.read(path, as_version=4)


@each_notebook
def test_committed_without_outputs(nb_path):
    nb = read_nb(nb_path)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert dirty == [], f"cells with outputs: {dirty} (clear outputs before committing)"


@each_notebook
def test_exactly_one_parameters_cell(nb_path):
    tagged = [c for c in read_nb(nb_path).cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1


def test_imports_quickly_and_loads_no_model():
    import peft, transformers  # noqa: F401  (library import time is not the notebook's; on a loaded machine it is 20 s+)
    t0 = time.time()
    module = load_notebook(NB_PATH, name="rlft_import_check", reload=True)
    elapsed = time.time() - t0
    assert elapsed < 10, f"importing the notebook took {elapsed:.1f}s"
    assert callable(module.load_base) and callable(module.load_pairs)
    modules = [k for k, v in vars(module).items() if isinstance(v, torch.nn.Module)]
    assert modules == [], f"definition cells built models at import: {modules}"


def parameter_names() -> set[str]:
    """Every knob: the parameters cell's names and Config's fields (the support knobs live in Config only)."""
    import dataclasses
    from rlft_support.config import Config
    cell = next(c for c in read_nb().cells if "parameters" in c.metadata.get("tags", []))
    return {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)} | {f.name for f in dataclasses.fields(Config)}


ALLOWED = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


def test_definition_cells_hold_definitions_only():
    params = parameter_names()
    assert {"MODEL", "SEED", "TRAIN_BUDGET_S", "REWARD_FN", "DEMO"} <= params
    for index, source in export_cells(NB_PATH):
        tree = ast.parse(source)
        for node in tree.body:
            docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            assert docstring or isinstance(node, ALLOWED), f"cell {index}: {ast.dump(node)[:80]} is not a definition"
        read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert not read & params, f"cell {index} reads parameter globals {read & params}: pass them as arguments"


def test_every_section_opens_with_markdown():
    seen = []
    for cell in read_nb().cells:
        section = cell.metadata.get("rlft", {}).get("section")
        if section not in seen:
            seen.append(section)
            assert cell.cell_type == "markdown", f"section {section!r} does not open with a markdown cell"
    expected = ["generate", "evaluate", "similarity", "reward_model", "ppo", "train", "results", "demo"]
    assert [s for s in seen if s in expected] == expected, "sections missing or out of reading order"


def nbsync():
    """tools/nbsync.py as a module (the tool `make notebook` runs)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("nbsync", ROOT / "tools" / "nbsync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@each_notebook
def test_source_and_notebook_agree(nb_path):
    """rlft.py (the jupytext source) and rlft.ipynb hold the same cells: type, source and metadata (and so for
    each other notebook and the .py beside it)."""
    sync = nbsync()
    diff = sync.differences(sync.py_cells(nb_path.with_suffix(".py")), sync.nb_cells(nb_path))
    assert diff == [], (f"{nb_path.stem}.py and {nb_path.name} differ: run make notebook (or make notebook "
                        "FROM=ipynb if you edited the .ipynb):\n  " + "\n  ".join(diff[:20]))


@each_notebook
def test_sync_is_deterministic_and_keeps_cell_ids(tmp_path, nb_path):
    """Writing the notebook from its .py reproduces the committed file byte for byte; an edited cell keeps its id,
    a new cell gets an id derived from its content."""
    sync = nbsync()
    copy = tmp_path / nb_path.name
    copy.write_bytes(nb_path.read_bytes())
    cells = sync.py_cells(nb_path.with_suffix(".py"))
    sync.write_ipynb(cells, copy)
    assert copy.read_bytes() == nb_path.read_bytes(), "run make notebook"
    ids = [c.id for c in nbformat.read(copy, as_version=4).cells]
    edited = [dict(c) for c in cells]
    edited[1] = {**edited[1], "source": edited[1]["source"] + "\n# edited"}
    new = {"cell_type": "code", "metadata": {"rlft": {"section": "intro"}}, "source": "x = 1"}
    sync.write_ipynb(edited[:2] + [new] + edited[2:], copy)
    out = nbformat.read(copy, as_version=4).cells
    assert [c.id for c in out[:2] + out[3:]] == ids and out[2].id not in ids
    assert out[1].source.endswith("# edited") and out[2].outputs == [] and out[2].execution_count is None


def test_no_name_defined_twice_across_definition_cells():
    """A function or class is defined in one definition cell only (ruff's F811 is off for rlft.py, where each
    cell's own imports would trip it)."""
    where: dict[str, int] = {}
    twice = []
    for index, source in export_cells(NB_PATH):
        for node in ast.parse(source).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name in where and where[node.name] != index:
                    twice.append(f"{node.name} (cells {where[node.name]} and {index})")
                where.setdefault(node.name, index)
    assert twice == [], f"defined in two definition cells: {twice}"
