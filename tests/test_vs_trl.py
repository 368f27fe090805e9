"""benchmarks/vs_trl.py (issue 19): our RL loop vs TRL GRPOTrainer / RLOOTrainer, end to end on the tiny model."""
import json
import math
import subprocess
import sys

import pytest

from nbimport import ROOT

SYSTEMS = ("ours", "grpo", "rloo")


def test_notebook_never_imports_trl():
    """trl is a benchmark-only dependency: no code cell of the notebook imports it."""
    cells = json.loads((ROOT / "rlft.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "import trl" not in code and "from trl" not in code


def test_requirements_bench_pins_trl_and_setup_installs_it_constrained():
    """requirements-bench.txt pins trl 1.16, and make setup installs it under a pip-freeze constraints file."""
    reqs = [line.split("#")[0].strip() for line in (ROOT / "requirements-bench.txt").read_text().splitlines()]
    assert "trl==1.16.*" in reqs
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q -r requirements-bench.txt -c .venv/constraints-core.txt" in makefile
    assert makefile.index("pip freeze > .venv/constraints-core.txt") < makefile.index("requirements-bench.txt -c")


def run_vs_trl(tmp_path, *args):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--params", str(ROOT / "tests" / "tiny_params.json"),
           "--threads", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "vs_trl"), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "vs_trl.json").read_text())


@pytest.mark.slow
def test_vs_trl_runs_both_modes_on_tiny(tmp_path):
    """Cost (1 timed rollout per system, 1 round) then learn (1 s, seed 0) into one <out>.json: every named field of
    the issue is present and finite after both, and the cost fields survive the learn run."""
    pytest.importorskip("trl", reason="trl is benchmark-only (requirements-bench.txt; `make setup` installs it)")
    cost = run_vs_trl(tmp_path, "--mode", "cost", "--steps", "1", "--rounds", "1")
    for s in SYSTEMS:
        assert cost[f"gain_{s}"] is None  # the learn mode has not run yet
        assert len(cost["cost_seconds_per_rollout"][s]) == 1  # the warm-up rollout was dropped
        per_rollout = cost["cost_seconds_per_rollout"][s][0]
        assert cost[f"s_per_sample_{s}"] == pytest.approx(per_rollout / cost["samples_per_step"])
        assert cost[f"peak_rss_mb_{s}"] > 100  # a child's ru_maxrss (MB), not this test's
    assert cost["ratio_time_vs_grpo"] == pytest.approx(cost["s_per_sample_ours"] / cost["s_per_sample_grpo"])
    assert cost["ratio_rss_vs_grpo"] == pytest.approx(cost["peak_rss_mb_ours"] / cost["peak_rss_mb_grpo"])
    both = run_vs_trl(tmp_path, "--mode", "learn", "--budget", "1", "--seeds", "0")
    named = ("s_per_sample", "samples_per_s", "peak_rss_mb", "gain", "gain_ci_low", "gain_ci_high")
    fields = [f"{k}_{s}" for k in named for s in SYSTEMS] + ["ratio_time_vs_grpo", "ratio_time_vs_rloo",
                                                              "ratio_rss_vs_grpo"]
    for f in fields:
        assert isinstance(both[f], float) and math.isfinite(both[f]), f
    for s in SYSTEMS:
        assert both[f"s_per_sample_{s}"] == cost[f"s_per_sample_{s}"]
        assert both[f"gain_ci_low_{s}"] <= both[f"gain_ci_high_{s}"]
        assert both[f"rollouts_{s}"] == [1]  # a 1 s budget still trains one rollout, then stops
    table = (tmp_path / "vs_trl.md").read_text()
    assert table.count("\n| ours") == 1 and "TRL GRPO" in table and "TRL RLOO" in table
    # resumable: a second learn run reads every cached run instead of training again
    assert run_vs_trl(tmp_path, "--mode", "learn", "--budget", "1", "--seeds", "0")["gain_ours"] == both["gain_ours"]
