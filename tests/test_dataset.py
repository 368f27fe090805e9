"""Section 2: the shipped dataset (data/pairs.jsonl) validates through the notebook's own loader.

Near-identical references are found by token Jaccard: the share of distinct lower-cased words two references
have in common (|A ∩ B| / |A ∪ B|), flagged at >= 0.5. That catches a light edit of another reference ("A harbour is
a sheltered stretch of water where ships can anchor safely." / "... a sheltered area of water where ships and boats
can anchor." = 0.67), a reordering (= 1.0) and a one-frame template with two words swapped ("Tokyo is the capital
city of Japan." / "Paris is the capital city of France." = 0.56). Distinct answers score well below: the closest
two references in data/pairs.jsonl score 0.41 (sneezing / coughing). It does not catch paraphrases with different
words ("A spider has eight legs." / "Spiders have eight legs." = 0.29): when the file was written, a one-off
MiniLM check found no two references above cosine 0.85 (none is a paraphrase of another), not repeated here.
"""
import hashlib
import itertools
import json
import re
from collections import Counter, defaultdict

import pytest

from nbimport import ROOT
from rlft_support import assets

NEAR_IDENTICAL = 0.5  # token-Jaccard at or above which two references count as near-identical
DATA = ROOT / "data" / "pairs.jsonl"


def _words(text: str) -> frozenset:
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def near_identical(references: list[str], threshold: float = NEAR_IDENTICAL) -> list[tuple[float, str, str]]:
    """Every pair of references whose token Jaccard is >= threshold, as (score, first, second)."""
    words = [_words(r) for r in references]
    close = []
    for i, j in itertools.combinations(range(len(references)), 2):
        score = len(words[i] & words[j]) / len(words[i] | words[j]) if words[i] | words[j] else 1.0
        if score >= threshold:
            close.append((score, references[i], references[j]))
    return close


@pytest.fixture(scope="module")
def pairs():
    return assets.load_pairs(DATA)


def test_default_data_path_is_the_dataset(cfg):
    assert cfg.DATA_PATH == "data/pairs.jsonl"


def test_size_and_families(pairs):
    assert len(pairs) >= 400
    families = Counter(p["family"] for p in pairs)
    assert len(families) >= 3 and "general" not in families, families
    assert min(families.values()) >= 0.15 * len(pairs), f"families are unbalanced: {families}"


def test_eval_split_covers_every_family(pairs):
    eval_pairs = assets.split_pairs(pairs, "eval")
    assert len(eval_pairs) >= 100
    assert 0.2 <= len(eval_pairs) / len(pairs) <= 0.35
    per_family = Counter(p["family"] for p in eval_pairs)
    assert set(per_family) == {p["family"] for p in pairs}
    assert min(per_family.values()) >= 20, per_family


def test_every_pair_names_its_concept(pairs):
    raw = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert all(row.get("concept") for row in raw), "every shipped pair has an explicit concept"
    assert all(p["concept"] == p["concept"].strip().lower() for p in pairs)


def test_no_concept_or_prompt_in_both_splits(pairs):
    splits_of = defaultdict(set)
    for p in pairs:
        splits_of[("concept", p["concept"])].add(p["split"])
        splits_of[("prompt", p["prompt"].lower())].add(p["split"])
    leaks = [key for key, splits in splits_of.items() if len(splits) > 1]
    assert not leaks, f"in both splits: {leaks[:10]}"


def test_split_follows_the_documented_concept_hash(pairs):
    """data/README.md: a concept is in eval iff the first 8 hex digits of sha256(concept) mod 100 < 28."""
    def expected(concept):
        return "eval" if int(hashlib.sha256(concept.encode()).hexdigest()[:8], 16) % 100 < 28 else "train"
    wrong = [p["prompt"] for p in pairs if p["split"] != expected(p["concept"])]
    assert not wrong, wrong[:5]


def test_no_duplicate_prompts(pairs):
    counts = Counter(" ".join(p["prompt"].lower().split()) for p in pairs)
    assert not [p for p, n in counts.items() if n > 1]


def test_references_are_short_non_empty_sentences(pairs):
    for p in pairs:
        n_words = len(p["reference"].split())
        assert 5 <= n_words <= 40, (n_words, p["reference"])
        assert p["reference"][0].isupper() or p["reference"][0].isdigit(), p["reference"]


def test_no_near_identical_references(pairs):
    close = near_identical([p["reference"] for p in pairs])
    assert not close, f"{len(close)} near-identical reference pair(s), e.g. {close[:3]}"


def test_references_do_not_share_one_template(pairs):
    openers = Counter(" ".join(p["reference"].lower().split()[:2]) for p in pairs)
    word, n = openers.most_common(1)[0]
    assert n <= 0.1 * len(pairs), f"{n} references start with {word!r}"


def test_near_identical_check_catches_edits_and_templates():
    edit = ("A harbour is a sheltered stretch of water where ships can anchor safely.",
            "A harbour is a sheltered area of water where ships and boats can anchor.")
    template = ("Tokyo is the capital city of Japan.", "Paris is the capital city of France.")
    distinct = ("Ottawa, in the province of Ontario, is the capital city of Canada.",
                "Madrid, in the centre of the country, is the capital of Spain.")
    found = {(a, b) for _, a, b in near_identical([*edit, *template, *distinct])}
    assert found == {edit, template}


def test_parse_pair_keeps_concept():
    base = {"prompt": "What is a Harbour?", "reference": "A sheltered place for ships.", "split": "eval"}
    assert assets.parse_pair(json.dumps({**base, "concept": " Harbour "}))["concept"] == "harbour"
    assert assets.parse_pair(json.dumps(base))["concept"] == "what is a harbour?"
