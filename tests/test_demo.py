"""The chat demo (section `demo`): base vs tuned from one PEFT model, served by gradio, checked through
gradio_client and in a real headless chromium."""
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import CACHE_DIR, CPU, perturb_lora_b
from nbimport import ROOT

GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=10, logits_mode="full", pca_k=16)
KNOBS = tuple(GREEDY)  # the order of ChatDemo.answer's sampling arguments


def word_score(prompt: str, response: str) -> float:
    """A simple real 'reward': how many words the response has."""
    return float(len(response.split()))


def word_overlap(response: str, reference: str) -> float:
    """A simple real 'similarity': 10 × Jaccard overlap of the word sets."""
    a, b = set(response.lower().split()), set(reference.lower().split())
    return 10.0 * len(a & b) / len(a | b) if a | b else 0.0


def perturb(model):
    """Random LoRA B matrices, so base and tuned answers differ (B = 0 would make them equal)."""
    return perturb_lora_b(model, std=0.5, seed=1)


@pytest.fixture(scope="module")
def tuned(nb):
    """The tiny model with a perturbed LoRA adapter, and its tokenizer (shared by this module's tests)."""
    model, tokenizer = wordy_tiny(nb)
    return perturb(nb.add_lora(model, 8, 16, 0.0, ["q_proj", "v_proj", "up_proj", "down_proj"])).eval(), tokenizer


def wordy_tiny(nb):
    """The tiny base with its layer weights scaled ×10: at init its residual stream barely moves, so greedy
    decoding repeats the last prompt token ('\\n' forever); scaled, it answers in (random) words."""
    model, tokenizer = nb.load_base("tiny", CACHE_DIR, CPU, torch.float32, seed=0)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return model, tokenizer


def expected_answer(nb, model, tokenizer, side: str, message, sampling=GREEDY) -> str:
    """The greedy answer of one side to a message (or a list of chat messages), computed directly with
    generate() (adapter off for base), outside any app."""
    messages = [{"role": "user", "content": message}] if isinstance(message, str) else message
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    switch = model.disable_adapter() if side == "base" else torch.no_grad()
    with switch, torch.no_grad():
        return nb.generate(model, tokenizer, [prompt], **sampling).texts[0].strip()


def last_answer(history) -> str:
    assert history and history[-1]["role"] == "assistant", history
    content = history[-1]["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


@pytest.fixture(scope="module")
def served(nb, tuned):
    """The app launched on 127.0.0.1 without blocking; closed after the module."""
    model, tokenizer = tuned
    app = nb.build_app(model, tokenizer, score_fn=word_score, similarity_fn=word_overlap,
                       sampling=dict(GREEDY, max_new_tokens=6))
    app, url = nb.launch_app(app, prevent_thread_lock=True)
    yield app, url
    app.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client
    return Client(served[1], verbose=False)


def ask(client, side: str, message: str, reference: str = "", history=(), **sampling):
    args = [message, reference, list(history), *[dict(GREEDY, **sampling)[k] for k in KNOBS]]
    return client.predict(*args, api_name=f"/answer_{side}")


# --- pure helpers -------------------------------------------------------------------------------------------

def test_input_problem_is_friendly(nb):
    limits = nb.DemoLimits(max_chars=50)
    assert nb.input_problem("hello", limits) is None
    for bad in ("", "   \n", None):
        assert "type a message" in nb.input_problem(bad, limits)
    assert "at most 50" in nb.input_problem("x" * 51, limits)


def test_history_is_capped_and_rendered_through_the_chat_template(nb, tuned):
    _, tokenizer = tuned
    history = []
    for i in range(6):
        history += [{"role": "user", "content": [{"type": "text", "text": f"question {i}"}]},
                    {"role": "assistant", "content": f"answer {i}"}]
    messages, trimmed = nb.chat_messages(history, "  new question ", nb.DemoLimits(max_turns=2))
    assert trimmed and [m["content"] for m in messages] == ["question 4", "answer 4", "question 5", "answer 5",
                                                             "new question"]
    assert nb.chat_messages(history, "q", nb.DemoLimits(max_turns=0))[0] == [{"role": "user", "content": "q"}]
    prompt, dropped = nb.render_chat(tokenizer, messages, 1024)
    assert not dropped and prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.index("question 4") < prompt.index("answer 5") < prompt.index("new question")
    # a tight token budget drops the oldest exchanges first, then refuses a message that alone is too long
    short, dropped = nb.render_chat(tokenizer, messages, len(tokenizer(prompt).input_ids) - 5)
    assert dropped and "question 4" not in short and "new question" in short
    assert nb.render_chat(tokenizer, [{"role": "user", "content": "word " * 400}], 64) == (None, True)


def test_clamp_sampling_keeps_values_in_range(nb):
    limits = nb.DemoLimits(max_new_tokens=32)
    s = nb.clamp_sampling(-1, -5, 7, 10_000, "no-such-mode", 0, limits)
    assert s == dict(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=32, logits_mode="full", pca_k=1)
    assert nb.clamp_sampling(0.5, 3, 0.9, 8, "pca_seed", 4, limits)["logits_mode"] == "pca_seed"


def test_find_and_attach_a_saved_adapter(nb, tuned, tmp_path):
    model, tokenizer = tuned
    assert nb.find_adapter(tmp_path) is None
    older, newer = tmp_path / "runs/a/ckpt-000001/adapter", tmp_path / "runs/a/ckpt-000002/adapter"
    model.save_pretrained(older)
    time.sleep(0.05)
    model.save_pretrained(newer)
    shutil.copytree(newer, tmp_path / "runs/a/ckpt-000003.tmp123/adapter")  # a half-written folder is skipped
    assert nb.find_adapter(tmp_path / "runs") == newer  # no `latest` pointer: the newest adapter folder
    # a training run's pointer names its last complete checkpoint; a newer, half-written one is not served
    (older.parent / "state.json").write_text("{}")
    nb.write_json_atomic(tmp_path / "runs/a" / nb.CKPT_POINTER, {"checkpoint": older.parent.name})
    assert nb.find_adapter(tmp_path / "runs") == older
    model.save_pretrained(tmp_path / "runs/a/adapter")  # the run's final adapter comes first
    assert nb.find_adapter(tmp_path / "runs/a") == tmp_path / "runs/a/adapter"
    assert nb.find_adapter(newer) == newer
    loaded = nb.attach_adapter(wordy_tiny(nb)[0], newer)
    for side in ("base", "tuned"):
        assert expected_answer(nb, loaded, tokenizer, side, "Hi") == expected_answer(nb, model, tokenizer, side, "Hi")
    fresh = nb.add_lora(wordy_tiny(nb)[0], 4, 8, 0.0, ["q_proj"])  # an in-memory PEFT model + a saved adapter,
    for _ in range(2):  # attached twice (a notebook cell run again)
        assert nb.attach_adapter(fresh, newer).active_adapter == "demo"
    assert expected_answer(nb, fresh, tokenizer, "tuned", "Hi") == expected_answer(nb, model, tokenizer, "tuned", "Hi")
    with pytest.raises(ValueError, match="PEFT model"):
        nb.attach_adapter(wordy_tiny(nb)[0])
    with pytest.raises(FileNotFoundError):
        nb.attach_adapter(wordy_tiny(nb)[0], tmp_path)


# --- the ChatDemo handlers, without a server ----------------------------------------------------------------

def test_answers_stream_and_carry_scores(nb, tuned):
    model, tokenizer = tuned
    demo = nb.ChatDemo(model, tokenizer, word_score, word_overlap)
    updates = list(demo.answer("tuned", "Tell me a story", "a long story", [], *GREEDY.values()))
    texts = [last_answer(h) for h, _ in updates[:-1]]
    assert len(updates) >= 3 and all(b.startswith(a) for a, b in zip(texts, texts[1:])), "no streaming"
    history, info = updates[-1]
    answer = last_answer(history)
    assert answer == expected_answer(nb, model, tokenizer, "tuned", "Tell me a story")
    assert f"reward model **{word_score('', answer):.2f}**" in info
    assert f"similarity to your reference **{word_overlap(answer, 'a long story'):.2f}**" in info
    # the next turn sends the first exchange back through the chat template
    history2, _ = list(demo.answer("tuned", "And then?", "", history, *GREEDY.values()))[-1]
    assert [m["role"] for m in history2] == ["user", "assistant", "user", "assistant"]
    assert last_answer(history2) == expected_answer(nb, model, tokenizer, "tuned", history2[:3])


def test_a_failing_scorer_gives_a_sentence_not_a_traceback(nb, tuned):
    model, tokenizer = tuned
    demo = nb.ChatDemo(model, tokenizer, score_fn=lambda p, r: 1 / 0)
    history, info = list(demo.answer("base", "Hi", "", [], *GREEDY.values()))[-1]
    assert history == [] and "could not answer" in info and "Traceback" not in info
    assert not demo.lock.locked()
    adapter_back_on = list(nb.ChatDemo(model, tokenizer).answer("tuned", "Hi", "", [], *GREEDY.values()))[-1][0]
    assert last_answer(adapter_back_on) == expected_answer(nb, model, tokenizer, "tuned", "Hi")


# --- through the server -------------------------------------------------------------------------------------

def test_app_builds_with_both_sides_and_named_endpoints(nb, served):
    import gradio as gr
    app, _ = served
    assert isinstance(app, gr.Blocks)
    ids = {b.elem_id for b in app.blocks.values()}
    assert {"base-chat", "tuned-chat", "base-info", "tuned-info", "message", "reference", "send"} <= ids
    names = {d.api_name for d in app.fns.values()}
    assert {"answer_base", "answer_tuned"} <= names
    assert app.local_url.startswith("http://127.0.0.1:") and not app.share


def test_client_gets_different_answers_from_base_and_tuned(nb, tuned, client):
    model, tokenizer = tuned
    answers = {}
    for side in ("base", "tuned"):
        history, info = ask(client, side, "What is a harbour?", reference="A sheltered place for ships.")
        answers[side] = last_answer(history)
        assert answers[side] == expected_answer(nb, model, tokenizer, side, "What is a harbour?")
        assert "reward model" in info and "similarity to your reference" in info
    assert answers["base"] != answers["tuned"]


def test_concurrent_requests_each_get_their_own_model(nb, tuned, client):
    model, tokenizer = tuned
    message, n = "Name three colours.", 24
    want = {side: expected_answer(nb, model, tokenizer, side, message, dict(GREEDY, max_new_tokens=n))
            for side in ("base", "tuned")}
    assert want["base"] != want["tuned"]
    jobs = []
    for _ in range(2):  # interleaved submissions: base, tuned, base, tuned
        for side in ("base", "tuned"):
            args = [message, "", [], *[dict(GREEDY, max_new_tokens=n)[k] for k in KNOBS]]
            jobs.append((side, client.submit(*args, api_name=f"/answer_{side}")))
    for side, job in jobs:
        assert last_answer(job.result(timeout=120)[0]) == want[side], side


def test_empty_and_overlong_input_get_the_friendly_message(nb, client):
    for message, expected in (("", "Please type a message first."), ("  ", "Please type a message first."),
                              ("x" * (nb.DemoLimits().max_chars + 1), "Please shorten it.")):
        history, info = ask(client, "tuned", message)
        assert history == [] and expected in info and "Traceback" not in info


def test_the_lock_serialises_direct_calls_from_threads(nb, tuned):
    """Without gradio's queue: two threads answering base and tuned at once still get their own model."""
    model, tokenizer = tuned
    demo = nb.ChatDemo(model, tokenizer)
    sampling = dict(GREEDY, max_new_tokens=16)
    want = {side: expected_answer(nb, model, tokenizer, side, "Hello", sampling) for side in ("base", "tuned")}
    got = {}

    def run(side):
        got[side] = last_answer(list(demo.answer(side, "Hello", "", [], *sampling.values()))[-1][0])

    threads = [threading.Thread(target=run, args=(side,)) for side in ("base", "tuned")]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert got == want


# --- a real browser -----------------------------------------------------------------------------------------

def chromium_driver():
    """Debian's chromium through its own chromedriver (Selenium downloads nothing). Missing: skip, or fail on CI."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    if not (Path("/usr/bin/chromedriver").exists() and Path("/usr/bin/chromium").exists()):
        message = "needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_browser_types_a_message_and_sees_both_answers_with_scores(nb, tuned):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    model, tokenizer = tuned
    title = ("### rlft — base vs tuned (browser test)\nA tiny *random* test model with a perturbed LoRA adapter, so the "
             "words are noise; the test scorers count words and word overlap.")
    app = nb.build_app(model, tokenizer, score_fn=word_score, similarity_fn=word_overlap, title=title,
                       score_label="test score (words)", sampling=dict(GREEDY, max_new_tokens=12))
    app, url = nb.launch_app(app, prevent_thread_lock=True)
    driver = None
    try:
        driver = chromium_driver()
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#message textarea"))
        box.send_keys("What is a harbour?")
        driver.find_element(By.CSS_SELECTOR, "#reference textarea").send_keys("A sheltered place where ships anchor.")
        driver.find_element(By.CSS_SELECTOR, "button#send").click()
        for side in ("base", "tuned"):
            wait.until(lambda d: re.search(r"test score \(words\) \d", d.find_element(By.ID, f"{side}-info").text))
            info = driver.find_element(By.ID, f"{side}-info").text
            assert "similarity to your reference" in info and "Traceback" not in info
            bubbles = driver.find_elements(By.CSS_SELECTOR, f"#{side}-chat .message")
            assert len(bubbles) >= 2, f"{side}: no answer in the page"
            want = expected_answer(nb, model, tokenizer, side, "What is a harbour?", dict(GREEDY, max_new_tokens=12))
            assert want.split()[0] in bubbles[-1].text, (side, want, bubbles[-1].text)
        (ROOT / "docs").mkdir(exist_ok=True)
        driver.save_screenshot(str(ROOT / "docs" / "demo.png"))
    finally:
        if driver is not None:
            driver.quit()
        app.close()


def test_launch_in_a_notebook_returns_at_once_and_binds_localhost(nb, tuned, monkeypatch):
    """In Jupyter/Colab the cell must not block (and shows the app inline); the server listens on 127.0.0.1 only."""
    import gradio.utils
    monkeypatch.setattr(gradio.utils, "ipython_check", lambda: True)
    model, tokenizer = tuned
    app = nb.build_app(model, tokenizer)
    done = threading.Event()
    result = {}

    def launch():
        result["url"] = nb.launch_app(app)[1]
        done.set()

    threading.Thread(target=launch, daemon=True).start()
    try:
        assert done.wait(60), "launch_app blocked inside a notebook"
        assert result["url"].startswith("http://127.0.0.1:") and app.server_name == "127.0.0.1" and not app.share
    finally:
        app.close()


def test_serve_demo_serves_the_newest_adapter_with_the_saved_reward_model(nb, tmp_path):
    """`make demo`'s entry point, on the tiny model: adapter and reward model found under the run folder."""
    from gradio_client import Client
    model, tokenizer = nb.load_base("tiny", CACHE_DIR, CPU, torch.float32, seed=0)
    lora = perturb(nb.add_lora(model, 8, 16, 0.0, ["q_proj", "v_proj"]))
    run = tmp_path / "run"
    lora.save_pretrained(run / "ckpt-000001" / "adapter")
    torch.save(nb.RewardMLP(dim=384).state_dict(), run / "reward_mlp.pt")
    app, url = nb.serve_demo(ROOT / "rlft.ipynb", block=False, MODEL="tiny", DEVICE="cpu", DTYPE="float32",
                             RUN_DIR=str(run), CACHE_DIR=CACHE_DIR)
    try:
        assert url.startswith("http://127.0.0.1:")
        history, info = ask(Client(url, verbose=False), "tuned", "Hi", reference="Hello there.", max_new_tokens=4)
        assert history[-1]["role"] == "assistant"
        assert re.search(r"reward model \*\*-?\d+\.\d\d\*\*", info) and "similarity to your reference" in info, info
        want = expected_answer(nb, lora, tokenizer, "tuned", "Hi", dict(GREEDY, max_new_tokens=4))
        assert want and last_answer(history) == want  # the saved adapter was loaded
    finally:
        app.close()
