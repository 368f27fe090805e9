"""The chat demo (notebook section "demo"): base vs tuned answers from one PEFT model, side by side, served by
gradio. Nothing here imports the notebook: the method's pieces are handed in, namely `stream_fn` (the notebook's
`generate_stream(model, tokenizer, prompt, **sampling)`, which yields the answer piece by piece), `logits_modes`
(its `LOGITS_MODES`), `escape_fn` (its `escape_special_tokens(tokenizer, text)`), and the scorers `score_fn`
(the reward model) and `similarity_fn` (the true similarity). `make demo` runs it through `chat.py`."""
from __future__ import annotations

import contextlib, dataclasses, functools, math, queue, threading, time, traceback
from pathlib import Path

import torch
from peft import PeftModel

from rlft_support import runs

DEMO_SIDES = ("base", "tuned")
DEMO_CSS = ".rlft-info { min-height: 2.2em; }"


@dataclasses.dataclass
class DemoLimits:
    """Caps that keep one demo request small (characters, history turns, prompt and answer tokens; the PCA logits
    modes, which cost an SVD over every position per token, get far smaller token caps) and the server bounded
    (waiting requests in gradio's queue). The demo takes no files: uploads are refused (RefuseUploads), and
    `max_file_size` caps them too, in case one slipped past.
    The only home of these caps (they are not notebook parameters): override one as `DemoLimits(max_turns=8)`."""
    max_chars: int = 2000  # longest message accepted (characters); longer ones get a polite refusal
    max_turns: int = 4  # earlier exchanges sent back through the chat template
    max_prompt_tokens: int = 1024  # older turns are dropped until the rendered prompt fits
    max_new_tokens: int = 256  # the answer-length slider's top
    max_reference_chars: int = 2000  # longest reference answer accepted (characters); longer ones get a polite refusal
    pca_max_prompt_tokens: int = 128  # prompt-token cap for the slow PCA logits modes (an SVD per position per token)
    pca_max_new_tokens: int = 32  # answer-token cap for the PCA logits modes
    queue_size: int = 16  # requests gradio keeps waiting; more are turned away (queue full)
    max_file_size: str = "1kb"


def input_problem(message, limits: DemoLimits, reference="") -> str | None:
    """A friendly sentence when `message` is empty or too long, or `reference` not text or too long, else None."""
    if not isinstance(message, str) or not message.strip():
        return "Please type a message first."
    if len(message) > limits.max_chars:
        return (f"That message is {len(message):,} characters long; the demo takes at most {limits.max_chars:,}. "
                "Please shorten it.")
    if not isinstance(reference or "", str):
        return "The reference must be text."
    if len(reference or "") > limits.max_reference_chars:
        return (f"That reference is {len(reference):,} characters long; the demo takes at most "
                f"{limits.max_reference_chars:,}. Please shorten it.")
    return None


def message_text(content) -> str:
    """The text of a gradio 6 message content: a string, a {'type': 'text', 'text': ...} part, or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def plain_history(history) -> list[dict]:
    """Chatbot history (gradio 6 role/content dicts, content as text or parts) -> [{'role', 'content': str}]."""
    return [{"role": m["role"], "content": message_text(m.get("content"))}
            for m in history or [] if isinstance(m, dict) and m.get("role") in ("user", "assistant")]


def chat_messages(history, message: str, limits: DemoLimits) -> tuple[list[dict], bool]:
    """Chatbot history + the new message -> chat-template messages (plain text, the last `limits.max_turns`
    exchanges kept, each message capped at `limits.max_chars`) and whether older exchanges were dropped."""
    turns = [{"role": m["role"], "content": m["content"][: limits.max_chars]} for m in plain_history(history)]
    starts = [i for i, m in enumerate(turns) if m["role"] == "user"]
    cut = len(turns) if limits.max_turns <= 0 else (starts[-limits.max_turns] if len(starts) > limits.max_turns else 0)
    return turns[cut:] + [{"role": "user", "content": message.strip()}], cut > 0


def render_chat(tokenizer, messages: list[dict], max_prompt_tokens: int, escape_fn) -> tuple[str | None, bool]:
    """The chat-template prompt for `messages`, dropping the oldest exchanges until it fits `max_prompt_tokens`;
    (None, True) when the last message alone does not fit. Also returns whether anything was dropped.
    Special-token strings typed in any message (`<|im_start|>`) are escaped by `escape_fn(tokenizer, text)` (the
    notebook's `escape_special_tokens`), so they stay text."""
    dropped = False
    messages = [dict(m, content=escape_fn(tokenizer, m["content"])) for m in messages]  # no forged turns
    system = escape_fn(tokenizer, getattr(tokenizer, "rlft_system_prompt", ""))  # the notebook's set_system_prompt
    while True:
        shown = [{"role": "system", "content": system}] * bool(system) + messages
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(shown, tokenize=False, add_generation_prompt=True)
        else:
            prompt = "\n".join(m["content"] for m in shown) + "\n"
        if len(tokenizer(prompt, add_special_tokens=False).input_ids) <= max_prompt_tokens:
            return prompt, dropped
        later = [i for i, m in enumerate(messages) if m["role"] == "user" and i > 0]
        if not later:
            return None, True
        messages, dropped = messages[later[0]:], True


def clamp_sampling(temperature, top_k, top_p, max_new_tokens, logits_mode, pca_k, limits: DemoLimits,
                   logits_modes) -> dict:
    """Sampling settings from the page (or any API client), forced into their valid ranges: generate()'s kwargs.
    NaN becomes the neutral value (greedy, top-p off); a mode not in `logits_modes` (the notebook's LOGITS_MODES)
    becomes "full"; the PCA modes get the smaller `pca_max_new_tokens` cap."""
    mode = logits_mode if logits_mode in logits_modes else "full"
    cap = limits.max_new_tokens if mode == "full" else min(limits.max_new_tokens, limits.pca_max_new_tokens)
    temperature, top_p = float(temperature), float(top_p)
    return dict(temperature=0.0 if math.isnan(temperature) else min(max(temperature, 0.0), 5.0),
                top_k=max(int(top_k), 0), top_p=1.0 if math.isnan(top_p) else min(max(top_p, 0.01), 1.0),
                max_new_tokens=min(max(int(max_new_tokens), 1), cap), logits_mode=mode, pca_k=max(int(pca_k), 1))


def stream_text(stream_fn, model, tokenizer, prompt: str, sampling: dict):
    """Yield the answer to one rendered prompt so far, each time `stream_fn` (the notebook's `generate_stream()`)
    adds a piece. `sampling`: generate()'s keyword arguments (max_new_tokens, temperature, top_k, top_p,
    logits_mode, pca_k)."""
    text = ""
    for piece in stream_fn(model, tokenizer, prompt, **sampling):
        text += piece
        yield text


JUDGE_LABELS = {"indep_similarity": "E5 judge", "chrf": "chrF"}  # the judge's metric names as the page shows them


def find_adapter(path: str | Path) -> Path | None:
    """The adapter folder to serve: `path` itself if it holds `adapter_config.json`, or a run's final `adapter/`
    in it; else the adapter of the newest complete checkpoint below it (the one a training run's `latest`
    pointer names); else the most recently written adapter folder below it (temporary folders skipped).
    The run layout is `runs`': the pointer file CKPT_POINTER and `latest_checkpoint(run)`, the checkpoint it names."""
    root = Path(path).expanduser()
    for folder in (root, root / "adapter"):
        if (folder / "adapter_config.json").exists():
            return folder
    for pointer in sorted(root.glob(f"**/{runs.CKPT_POINTER}"), key=lambda f: f.stat().st_mtime, reverse=True):
        try:
            checkpoint = runs.latest_checkpoint(pointer.parent)
        except (OSError, ValueError, KeyError):  # a pointer to a missing checkpoint, or not a pointer at all
            continue
        if checkpoint is not None and (checkpoint / "adapter" / "adapter_config.json").exists():
            return checkpoint / "adapter"
    found = [f.parent for f in root.glob("**/adapter_config.json") if ".tmp" not in str(f.relative_to(root))]
    return max(found, key=lambda d: (d / "adapter_config.json").stat().st_mtime) if found else None


def attach_adapter(model, adapter: str | Path | None = None) -> PeftModel:
    """The PEFT model the demo serves: `model` as it is (its active adapter is 'tuned') when `adapter` is None,
    else the adapter folder (saved by `save_pretrained`) loaded onto it."""
    if adapter is None:
        if not isinstance(model, PeftModel):
            raise ValueError("the demo needs a PEFT model (base + LoRA) or the path of a saved adapter")
        return model
    if not (Path(adapter) / "adapter_config.json").exists():
        raise FileNotFoundError(f"no adapter_config.json in {adapter!r}: pass a folder saved by save_pretrained")
    if isinstance(model, PeftModel):
        if "demo" in model.peft_config:  # built a second time: replace the previous one
            model.set_adapter(next(name for name in model.peft_config if name != "demo"))
            model.delete_adapter("demo")
        model.load_adapter(str(adapter), adapter_name="demo")
        model.set_adapter("demo")
        return model.eval()
    return PeftModel.from_pretrained(model, str(adapter)).eval()


class ChatDemo:
    """Base vs tuned answers from one PEFT model. `answer()` is a generator that yields (chat history, info)
    and is what the gradio events call; the whole generation and scoring of one answer runs under `self.lock`."""

    def __init__(self, model, tokenizer, score_fn=None, similarity_fn=None, limits: DemoLimits | None = None,
                 score_label: str = "reward model", *, stream_fn, logits_modes, escape_fn, judge_fn=None):
        self.model, self.tokenizer, self.limits = model, tokenizer, limits or DemoLimits()
        self.judge_fn = judge_fn  # (response, reference) -> {metric: value}: the independent judge, shown beside
        self.score_fn, self.similarity_fn, self.score_label = score_fn, similarity_fn, score_label
        self.stream_fn, self.logits_modes, self.escape_fn = stream_fn, tuple(logits_modes), escape_fn
        self.lock = threading.Lock()

    def _generate(self, side: str, prompt: str, message: str, reference: str, sampling: dict, out: queue.Queue,
                  cancel: threading.Event):
        """Worker thread: stream one answer into `out`, then its scores; always releases the lock and the adapter.
        Stops at the next token once `cancel` is set (the client went away), so it frees the model slot."""
        try:
            with self.lock:
                if cancel.is_set():
                    return
                t0, text = time.time(), ""
                switch = self.model.disable_adapter() if side == "base" else contextlib.nullcontext()
                with switch, torch.inference_mode():
                    for text in stream_text(self.stream_fn, self.model, self.tokenizer, prompt, sampling):
                        if cancel.is_set():
                            return
                        out.put(("text", text.strip()))
                seconds, text = time.time() - t0, text.strip()
                scores = {self.score_label: self.score_fn(message, text) if self.score_fn else None}
                if reference.strip() and self.similarity_fn:
                    scores["similarity to your reference"] = self.similarity_fn(text, reference)
                if reference.strip() and self.judge_fn:  # metrics training never saw, beside the reward's
                    scores.update({JUDGE_LABELS.get(name, f"judge {name}"): value
                                   for name, value in self.judge_fn(text, reference).items()})
            out.put(("done", (text, scores, seconds)))
        except Exception as e:  # shown as one plain sentence; the traceback goes to the server log
            traceback.print_exc()
            out.put(("error", f"{type(e).__name__}: {e}"))

    def answer(self, side, message, reference, history, temperature, top_k, top_p, max_new_tokens, logits_mode,
               pca_k=16):
        """Gradio handler for one side: yields (history with the streamed answer, info markdown)."""
        if side not in DEMO_SIDES:
            raise ValueError(f"side must be one of {DEMO_SIDES}, not {side!r}")
        past = plain_history(history)
        problem = input_problem(message, self.limits, reference)
        if problem:
            yield past, f"⚠️ {problem}"
            return
        try:
            sampling = clamp_sampling(temperature, top_k, top_p, max_new_tokens, logits_mode, pca_k, self.limits,
                                      self.logits_modes)
        except (TypeError, ValueError):
            yield past, "⚠️ The sampling settings must be numbers."
            return
        messages, trimmed = chat_messages(history, message, self.limits)
        pca = sampling["logits_mode"] != "full"  # a PCA per position and token: slow, so a much smaller prompt
        budget = min(self.limits.max_prompt_tokens, self.limits.pca_max_prompt_tokens) if pca else self.limits.max_prompt_tokens
        prompt, dropped = render_chat(self.tokenizer, messages, budget, self.escape_fn)
        if prompt is None:
            extra = f" with logits mode {sampling['logits_mode']!r} (use 'full' for longer ones)" if pca else ""
            yield past, f"⚠️ That message is longer than the demo's {budget} prompt tokens{extra}. Please shorten it."
            return
        yield from self._stream(side, prompt, message.strip(), reference or "", sampling, past, trimmed or dropped)

    def _stream(self, side, prompt, message, reference, sampling, past, trimmed):
        """Run the worker thread and relay its text as it arrives: yields (history, info)."""
        out, cancel = queue.Queue(), threading.Event()
        args = (side, prompt, message, reference, sampling, out, cancel)
        threading.Thread(target=self._generate, args=args, daemon=True).start()
        turn = past + [{"role": "user", "content": message}]
        try:
            while True:
                kind, value = out.get()
                if kind == "text":
                    yield turn + [{"role": "assistant", "content": value}], f"*{side}: generating…*"
                elif kind == "error":
                    yield past, f"⚠️ Sorry, the {side} model could not answer ({value})."
                    return
                else:
                    text, scores, seconds = value
                    yield turn + [{"role": "assistant", "content": text}], format_info(side, scores, seconds, trimmed)
                    return
        finally:  # also when gradio closes this generator (a cancelled or abandoned request): stop the worker
            cancel.set()


def format_info(side: str, scores: dict, seconds: float, trimmed: bool) -> str:
    """The line under an answer: its scores and how long it took."""
    parts = [f"**{side}**"]
    parts += [f"{name} **{'n/a' if value is None else f'{float(value):.2f}'}**" for name, value in scores.items()]
    parts.append(f"{seconds:.1f} s")
    if trimmed:
        parts.append("older turns left out")
    return " · ".join(parts)


def _demo_layout(gr, title: str, sampling: dict, limits: DemoLimits, examples, logits_modes) -> dict:
    """The page's components (inside an open gr.Blocks), by name."""
    c = {}
    gr.Markdown(title)
    with gr.Row():
        for side in DEMO_SIDES:
            with gr.Column():
                c[side] = gr.Chatbot(label=f"{side} model", height=360, elem_id=f"{side}-chat", buttons=["copy"])
                c[f"{side}_info"] = gr.Markdown(elem_id=f"{side}-info", elem_classes=["rlft-info"])
    with gr.Row():
        c["message"] = gr.Textbox(label="Message", placeholder="Ask something…", scale=5, elem_id="message", autofocus=True)
        c["send"] = gr.Button("Send", variant="primary", scale=1, elem_id="send")
    c["reference"] = gr.Textbox(label="Reference answer (optional: shows the true similarity)", elem_id="reference")
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            c["temperature"] = gr.Slider(0.0, 2.0, value=sampling["temperature"], step=0.05, label="temperature (0 = greedy)")
            c["top_k"] = gr.Slider(0, 200, value=sampling["top_k"], step=1, label="top-k (0 = off)")
            c["top_p"] = gr.Slider(0.05, 1.0, value=sampling["top_p"], step=0.05, label="top-p (1 = off)")
            c["max_new_tokens"] = gr.Slider(1, limits.max_new_tokens, value=sampling["max_new_tokens"], step=1,
                                            label="max new tokens")
            c["logits_mode"] = gr.Dropdown(list(logits_modes), value=sampling["logits_mode"], label="logits mode")
            c["pca_k"] = gr.Slider(1, 64, value=sampling["pca_k"], step=1, label="k (pca_rank_k)")
    c["clear"] = gr.Button("Clear both conversations", elem_id="clear")
    if examples:
        gr.Examples([list(e) for e in examples], inputs=[c["message"], c["reference"]], label="Held-out prompts")
    return c


def build_app(model, tokenizer, *, stream_fn, logits_modes, escape_fn, score_fn=None, similarity_fn=None,
              adapter=None, limits: DemoLimits | None = None, sampling: dict | None = None, examples=None,
              title: str | None = None, score_label: str = "reward model", judge_fn=None):
    """The gradio app (built, not launched): base vs tuned side by side. The method, handed in: `stream_fn(model,
    tokenizer, prompt, **sampling)` yields an answer's text pieces (the notebook's generate_stream),
    `logits_modes` lists its logits modes, `escape_fn(tokenizer, text)` makes typed special tokens plain text.
    `score_fn(prompt, response) -> float` is the reward model, `similarity_fn(response, reference) -> float` the
    true similarity, `judge_fn(response, reference) -> {metric: value}` the independent judge's metrics (shown
    beside the similarity when a reference is typed), `adapter` an optional saved-adapter folder (None: `model`'s own adapter). Returns the
    gr.Blocks; its `.chat_demo` is the ChatDemo."""
    import gradio as gr
    limits = limits or DemoLimits()
    demo = ChatDemo(attach_adapter(model, adapter), tokenizer, score_fn, similarity_fn, limits, score_label,
                    stream_fn=stream_fn, logits_modes=logits_modes, escape_fn=escape_fn, judge_fn=judge_fn)
    sampling = {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "max_new_tokens": 64, "logits_mode": "full",
                "pca_k": 16, **(sampling or {})}
    title = title or ("### rlft — base vs tuned\nThe same message goes to both; each answer shows its "
                      f"{score_label} score. Tuned = adapter `{adapter or 'trained in this session'}`.")
    knobs = ["temperature", "top_k", "top_p", "max_new_tokens", "logits_mode", "pca_k"]
    with gr.Blocks(title="rlft chat demo", analytics_enabled=False) as app:
        c = _demo_layout(gr, title, sampling, limits, examples, demo.logits_modes)
        knob_inputs = [c[k] for k in knobs]
        steps = {side: functools.partial(demo.answer, side) for side in DEMO_SIDES}
        for trigger, named in ((c["send"].click, True), (c["message"].submit, False)):
            event = None
            for side in DEMO_SIDES:  # base, then tuned; named endpoints `/answer_base`, `/answer_tuned` for clients
                args = (steps[side], [c["message"], c["reference"], c[side], *knob_inputs], [c[side], c[f"{side}_info"]])
                opts = dict(api_name=f"answer_{side}" if named else False, concurrency_limit=1, concurrency_id="rlft-model")
                event = trigger(*args, **opts) if event is None else event.then(*args, **opts)
            event.then(lambda: "", None, c["message"], queue=False, api_name=False)
        c["clear"].click(lambda: ([], [], "", ""), None, [c["base"], c["tuned"], c["base_info"], c["tuned_info"]],
                         queue=False, api_name=False)
    app.chat_demo = demo
    return app


class RefuseUploads:
    """ASGI middleware: answers 403 to every upload before reading its body. The demo takes no files, and gradio's
    file endpoints (`/upload`, `/process_recording`, a component server's files) all take multipart bodies, so any
    multipart request (a Content-Type header, any of them, starting `multipart/`) and any POST to those two routes
    is refused; a size cap alone would still let 1,000 small files per request, without end, fill the disk."""

    ROUTES = ("/upload", "/process_recording")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.is_upload(scope):
            from starlette.responses import PlainTextResponse
            return await PlainTextResponse("This demo takes no files.", status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)

    @classmethod
    def is_upload(cls, scope) -> bool:
        """Whether an HTTP request (its ASGI scope) is a file upload."""
        types = [value.lower().strip() for key, value in scope.get("headers", []) if key.lower() == b"content-type"]
        upload_route = scope.get("method") == "POST" and scope.get("path", "").rstrip("/").endswith(cls.ROUTES)
        return upload_route or any(t.startswith(b"multipart/") for t in types)


def launch_app(app, *, share: bool = False, port: int | None = None, inline: bool | None = None,
               prevent_thread_lock: bool = False):
    """Serve the app on 127.0.0.1 (a public gradio link only when `share`). In Jupyter or Colab it shows inline
    and returns at once (a notebook cell never blocks); from a script it blocks unless `prevent_thread_lock`.
    Returns (app, local_url)."""
    from gradio.utils import ipython_check
    from starlette.middleware import Middleware
    in_notebook = ipython_check()
    limits = getattr(getattr(app, "chat_demo", None), "limits", None) or DemoLimits()
    app.queue(default_concurrency_limit=1, max_size=limits.queue_size)  # a full queue turns new requests away
    app.launch(server_name="127.0.0.1", server_port=port, share=share, css=DEMO_CSS, show_error=False, quiet=False,
               inline=in_notebook if inline is None else inline, prevent_thread_lock=prevent_thread_lock or in_notebook,
               max_file_size=limits.max_file_size,  # a second guard: uploads are refused before this cap
               app_kwargs={"middleware": [Middleware(RefuseUploads)]})  # the demo takes no files
    return app, app.local_url
