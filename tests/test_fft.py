"""The FFT experiment (experiments/fft_positions.ipynb): a tiny byte LM whose position handling is learned / RoPE /
causal FFT filter / none; and the notebook itself, alone and headless."""
import ast
import os

import nbformat
import pytest
import torch
import torch.nn.functional as F
from jupyter_client.kernelspec import KernelSpecManager

from nbimport import ROOT, export_cells, load_notebook

FFT_NB = ROOT / "experiments" / "fft_positions.ipynb"
SMALL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_len": 40}


@pytest.fixture(scope="module")
def nb():
    """The experiment notebook's definition cells, as a module (here, not rlft.ipynb's)."""
    return load_notebook(FFT_NB, name="fft_positions")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one torch thread is faster than two fighting over a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model(nb, position, seed=0):
    torch.manual_seed(seed)
    model = nb.TinyLM(nb.tiny_lm_config(position, **SMALL))
    if position == "fft":  # a strong filter, so any leak of the future would be far above round-off
        with torch.no_grad():
            model.mixer.filter.normal_(0, 1.0)
    return model.eval()


@pytest.mark.parametrize("position", ["learned", "rope", "fft", "none"])
def test_causal(nb, position):
    model = small_model(nb, position)
    T = 37  # not a power of two
    tokens = torch.randint(0, 256, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(tokens)
        for j in (5, 20, T - 1):
            changed = tokens.clone()
            changed[:, j] = (changed[:, j] + 101) % 256
            out = model(changed)
            assert (out[:, :j] - base[:, :j]).abs().max().item() < 1e-5, f"{position}: token {j} leaked backwards"
            assert (out[:, j] - base[:, j]).abs().max().item() > 1e-3  # the change itself is seen


def test_fft_mixer_is_the_linear_causal_convolution(nb):
    torch.manual_seed(0)
    mixer = nb.CausalFFTMixer(4, 16)
    u = torch.randn(2, 11, 4)
    with torch.no_grad():
        y = mixer(u)
    h = mixer.filter.detach()  # [D, max_len]
    direct = torch.stack([sum(h[:, s] * u[:, t - s] for s in range(t + 1)) for t in range(11)], dim=1)
    torch.testing.assert_close(y, u + direct, atol=1e-5, rtol=1e-5)


def test_without_zero_padding_the_fft_would_see_the_future():
    """Why the mixer pads to 2T: an unpadded (circular) FFT convolution wraps late tokens onto early ones."""
    u, h = torch.randn(1, 8, 2), torch.randn(2, 8)

    def circ(x):
        return torch.fft.irfft(torch.fft.rfft(x, n=8, dim=1) * torch.fft.rfft(h, n=8, dim=1).T, n=8, dim=1)
    changed = u.clone()
    changed[:, -1] += 1.0
    assert (circ(changed)[:, 0] - circ(u)[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("position", ["learned", "rope", "fft", "none"])
def test_shapes_for_several_lengths(nb, position):
    model = small_model(nb, position)
    for T in (1, 2, 7, 24, 33, 40):
        assert model(torch.zeros(2, T, dtype=torch.long)).shape == (2, T, 256)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 41, dtype=torch.long))


def test_equal_parameter_counts(nb):
    for size in (SMALL, nb.FFT_ABLATION_DEFAULTS["size"]):
        counts = {p: nb.tiny_lm_param_count(nb.TinyLM(nb.tiny_lm_config(p, **size))) for p in nb.FFT_VARIANTS}
        assert max(counts.values()) / min(counts.values()) < 1.01, counts
    with pytest.raises(ValueError, match="position"):
        nb.tiny_lm_config("sinusoidal")


@pytest.mark.parametrize("position", ["learned", "rope", "fft", "none"])
def test_loss_falls_on_a_tiny_corpus(nb, position):
    text = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 30).encode()
    data = torch.tensor(list(text), dtype=torch.long)
    torch.manual_seed(0)
    model = nb.TinyLM(nb.tiny_lm_config(position, **SMALL))
    starts = nb.tiny_lm_batch_starts(len(data), 40, 8, SMALL["max_len"], seed=0)
    val = data[: 4 * (SMALL["max_len"] + 1)].view(4, -1)
    log = nb.train_tiny_lm(model, data, val, starts, lr=3e-3, eval_every=40)
    assert log["curve"][-1][1] < log["curve"][0][1] - 1.0, log["curve"]  # bits/byte fall by more than 1
    assert sum(log["train_loss"][-5:]) < sum(log["train_loss"][:5])
    assert log["tokens_per_s"] > 0


def test_same_data_order_per_seed(nb):
    a, b, c = (nb.tiny_lm_batch_starts(10_000, 5, 4, 32, seed=s) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.max() < 10_000 - 33


def test_repetition_scores(nb):
    loop = nb.word_repetition_scores(["a b c d a b c d a b c d"])
    assert loop["repeat_4"] == pytest.approx(5 / 9) and loop["distinct_2"] == pytest.approx(4 / 11)
    fresh = nb.word_repetition_scores(["one two three four five six"])
    assert fresh == {"distinct_2": 1.0, "distinct_3": 1.0, "repeat_4": 0.0}


def test_sampling_and_bits_per_byte(nb):
    model = small_model(nb, "rope")
    prompts = torch.randint(0, 256, (2, 5))
    out = nb.sample_tiny_lm(model, prompts, new_tokens=50, seed=0)  # 55 > max_len: the context slides
    assert out.shape == (2, 50) and out.dtype == torch.long
    assert torch.equal(out, nb.sample_tiny_lm(model, prompts, new_tokens=50, seed=0))
    windows = torch.randint(0, 256, (3, 21))
    nats = F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten()).item()
    expected = nats / 0.6931471805599453
    assert nb.tiny_lm_bits_per_byte(model, windows, batch=2) == pytest.approx(expected, rel=1e-5)


def test_corpus_is_offline_deterministic_and_large(nb, tmp_path):
    corpus = nb.load_english_corpus(str(tmp_path))
    again = nb.load_english_corpus(str(tmp_path))  # from the cache file
    assert corpus["n_bytes"] >= 1_000_000 and corpus["sha256"] == again["sha256"]
    assert 0.02 < len(corpus["val"]) / corpus["n_bytes"] < 0.1
    assert corpus["train"][:2000].decode("utf-8", errors="replace").count(" the ") > 5  # English prose


def test_experiment_notebook_stands_alone():
    """Code cells of at most 60 lines; definition cells that hold definitions only, read no parameter and import
    nothing of rlft; the convolution equation ends the markdown cell right above CausalFFTMixer."""
    cells = nbformat.read(FFT_NB, as_version=4).cells
    assert [len(c.source.splitlines()) for c in cells if c.cell_type == "code" and len(c.source.splitlines()) > 60] == []
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = {t.id for node in ast.parse(tagged[0].source).body for t in node.targets}
    assert params == {"FFT_EXPERIMENT", "FFT_STEPS", "FFT_SEEDS", "CACHE_DIR"}
    for index, source in export_cells(FFT_NB):
        tree = ast.parse(source)
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in imported if m.split(".")[0] in ("rlft", "nbimport", "rlft_support")}, index
        read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert not read & params, f"cell {index} reads parameter globals {read & params}"
    mixer = next(i for i, c in enumerate(cells) if "class CausalFFTMixer" in c.source)
    assert cells[mixer - 1].cell_type == "markdown" and cells[mixer - 1].source.rstrip().endswith("$$")


def execute_headless(tmp_path, **params) -> tuple[list, str]:
    """The experiment notebook alone, executed by papermill from the repository root (as `make fft`), torch on one
    thread: (its outputs, their printed text); no cell raised."""
    import papermill
    kernel = "rlft" if "rlft" in KernelSpecManager().find_kernel_specs() else "python3"
    out = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(FFT_NB), str(out), parameters=params, kernel_name=kernel, cwd=str(ROOT),
                               progress_bar=False)
    executed = nbformat.read(out, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert [o for o in outputs if o.output_type == "error"] == []
    return outputs, "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def test_experiment_notebook_shows_the_committed_results_headless(tmp_path, monkeypatch):
    """The default run (FFT_EXPERIMENT = False): the committed measurement's tables, plot and samples."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    outputs, text = execute_headless(tmp_path)
    assert "read benchmarks/fft_ablation.json" in text and "--- fft (seed 0" in text
    shown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| rope | 371,295 | 2.5113 ± 0.0166 |" in shown and "Longer training" in shown
    assert any("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.slow
def test_experiment_notebook_trains_live_headless(tmp_path, monkeypatch):
    """FFT_EXPERIMENT = True with 2 steps: the four variants trained, scored and shown (~40 CPU-s, mostly scoring)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cache = os.environ.get("RLFT_CACHE", "~/.cache/rlft")  # the corpus is built there once (as conftest's models)
    outputs, text = execute_headless(tmp_path, FFT_EXPERIMENT=True, FFT_STEPS=2, FFT_SEEDS=1, CACHE_DIR=cache)
    assert "ran live" in text and all(f"--- {v} (seed 0" in text for v in ("learned", "rope", "fft", "none"))
    assert any("image/png" in o.get("data", {}) for o in outputs)
