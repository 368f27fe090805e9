"""The whole notebook, executed headless with papermill on the tiny model and a tiny parameter set."""
import json
import re

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager

from nbimport import ROOT


@pytest.mark.slow
def test_notebook_runs_headless_on_tiny_parameters(tmp_path):
    import papermill
    params = json.loads((ROOT / "tests" / "tiny_params.json").read_text())
    params["RUN_DIR"] = str(tmp_path / "run")
    kernel = "rlft" if "rlft" in KernelSpecManager().find_kernel_specs() else "python3"
    out = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(ROOT / "rlft.ipynb"), str(out), parameters=params, kernel_name=kernel,
                               cwd=str(ROOT), progress_bar=False)
    executed = nbformat.read(out, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
    assert (tmp_path / "run").is_dir()
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    toy = re.search(r"good-token fraction: first 3 iterations ([\d.]+), last 5 ([\d.]+)", text)
    assert toy, "the toy PPO example printed no result"
    first, last = map(float, toy.groups())
    assert last > 0.6 and last > first + 0.05, f"the toy example did not learn: {first} -> {last}"
