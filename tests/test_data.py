"""Section 2: the data loader."""
import json

import pytest

from nbimport import ROOT


def test_shipped_data_validates(nb, params):
    pairs = nb.load_pairs(ROOT / params["DATA_PATH"])
    assert len(nb.split_pairs(pairs, "train")) > 0 and len(nb.split_pairs(pairs, "eval")) > 0
    assert len({p["family"] for p in pairs}) >= 3
    assert all(p["prompt"] and p["reference"] for p in pairs)


GOOD = {"prompt": "Define 'harbour'.", "reference": "A sheltered place for ships.", "split": "train"}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "reference": ', "bad JSON"),
    ('["a list"]', "expected a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "reference"}), "missing field 'reference'"),
    (json.dumps({**GOOD, "prompt": "   "}), "field 'prompt' is empty"),
    (json.dumps({**GOOD, "split": "test"}), "unknown split 'test'"),
])
def test_malformed_line_names_file_and_line(nb, tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(nb.DataError) as err:
        nb.load_pairs(path)
    assert f"{path}:3: {message}" in str(err.value)
    assert "nothing was loaded" in str(err.value)


def test_every_bad_line_is_listed(nb, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("not json\n" + json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "split": ""}) + "\n")
    with pytest.raises(nb.DataError, match=r"2 malformed") as err:
        nb.load_pairs(path)
    assert f"{path}:1:" in str(err.value) and f"{path}:3:" in str(err.value)


def test_empty_file_is_an_error(nb, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(nb.DataError, match="no pairs"):
        nb.load_pairs(path)


def test_family_defaults_and_chat_template(nb, tiny):
    _, tokenizer = tiny
    pair = nb.parse_pair(json.dumps(GOOD))
    assert pair["family"] == "general"
    text = nb.chat_prompt(tokenizer, pair["prompt"])
    assert pair["prompt"] in text and text.endswith("<|im_start|>assistant\n")
