"""Section 2, bring your own data (issue 34): DATA_PATH as CSV / TSV / Parquet, a save_to_disk folder or a `datasets`
id; DATA_COLUMNS renames the columns, EVAL_FRAC splits data without a split column by concept (sha256, so the
same on every run and under any PYTHONHASHSEED); every malformed row is named and nothing is half-loaded."""
import json
import os
import subprocess
import sys
from collections import defaultdict

import pandas as pd
import pytest

from nbimport import ROOT, notebook_config
from rlft_support import data
from rlft_support.data import DataError, load_pairs

STARTER = ROOT / "data" / "starter.jsonl"
SHIPPED = ROOT / "data" / "pairs.jsonl"
RENAMED = {"question": "prompt", "answer": "reference", "part": "split", "kind": "family", "topic": "concept"}
OURS_TO_THEIRS = {ours: theirs for theirs, ours in RENAMED.items()}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it reads: keep that cache in the test's folder, not the user's."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def raw_rows(path=STARTER) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_table(frame: pd.DataFrame, path):
    """The frame as .csv, .tsv or .parquet (by the suffix of `path`)."""
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index=False)
    return path


def renamed_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).rename(columns=OURS_TO_THEIRS)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_a_table_with_renamed_columns_loads_to_the_jsonl_pairs(tmp_path, suffix):
    path = write_table(renamed_frame(raw_rows()), tmp_path / f"mine{suffix}")
    assert load_pairs(path, RENAMED, 0.2) == load_pairs(STARTER)


def test_the_notebook_data_cell_reads_its_knobs(nb, tmp_path):
    """What section 2 runs: load_pairs(DATA_PATH, DATA_COLUMNS, EVAL_FRAC), then train_eval_pairs."""
    path = write_table(renamed_frame(raw_rows()), tmp_path / "mine.csv")
    cfg = notebook_config(DATA_PATH=str(path), DATA_COLUMNS=RENAMED)
    train, held_out = nb.train_eval_pairs(nb.load_pairs(cfg.DATA_PATH, cfg.DATA_COLUMNS, cfg.EVAL_FRAC), cfg.DATA_PATH)
    expected = load_pairs(STARTER)
    assert train == nb.split_pairs(expected, "train") and held_out == nb.split_pairs(expected, "eval")
    assert notebook_config().DATA_COLUMNS == {} and 0 < notebook_config().EVAL_FRAC < 1


def test_csv_cells_stay_text(tmp_path):
    """Commas, quotes, newlines, numbers and the words pandas would read as missing ('NA', 'None') stay as written."""
    texts = ['Say "hi", then wait.', "Line one\nline two", "NA", "None", "3.10", "007"]
    rows = [{"prompt": f"Prompt {i}: {t}", "reference": t, "split": "train"} for i, t in enumerate(texts)]
    path = write_table(pd.DataFrame(rows), tmp_path / "texts.csv")
    assert [p["reference"] for p in load_pairs(path)] == texts


def test_a_missing_column_names_the_file_the_column_and_the_columns_found(tmp_path):
    path = write_table(renamed_frame(raw_rows()).drop(columns=["answer"]), tmp_path / "no-answer.csv")
    with pytest.raises(DataError) as err:
        load_pairs(path, RENAMED, 0.2)
    message = str(err.value)
    assert str(path) in message and "'reference' (looked for 'answer')" in message
    assert "columns found: ['question', 'part', 'kind']" in message and "nothing was loaded" in message


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_an_empty_cell_names_the_row_and_the_column(tmp_path, suffix):
    rows = raw_rows()[:5]
    rows[2]["reference"] = None
    rows[3]["prompt"] = "   "
    path = write_table(renamed_frame(rows), tmp_path / f"holes{suffix}")
    with pytest.raises(DataError, match=r"2 malformed row\(s\); nothing was loaded") as err:
        load_pairs(path, RENAMED, 0.2)
    assert f"{path}: row 3: column 'answer' (DATA_COLUMNS: reference) is empty" in str(err.value)
    assert f"{path}: row 4: column 'question' (DATA_COLUMNS: prompt) is empty" in str(err.value)


def test_a_bad_split_value_names_the_row(tmp_path):
    rows = raw_rows()[:4]
    rows[1]["split"] = "test"
    path = write_table(pd.DataFrame(rows), tmp_path / "bad-split.tsv")
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert f"{path}: row 2: unknown split 'test' in column 'split' (expected one of ('train', 'eval'))" in str(err.value)


def test_a_jsonl_file_with_renamed_fields_and_no_split(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{OURS_TO_THEIRS[k]: v for k, v in row.items() if k != "split"} for row in raw_rows()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(path, RENAMED, 0.2)
    assert [p["prompt"] for p in pairs] == [p["prompt"] for p in load_pairs(STARTER)]
    assert {p["split"] for p in pairs} == {"train", "eval"}
    with pytest.raises(DataError, match=r"mine.jsonl:1: missing field 'reference'; fields found: \['answer', 'kind', "
                       r"'question'\]"):
        load_pairs(path, {"question": "prompt"}, 0.2)


def test_the_automatic_split_is_the_shipped_rule_and_keeps_each_concept_in_one_split(tmp_path):
    """Without a split column, EVAL_FRAC=0.28 reproduces data/pairs.jsonl's split (data/README.md's rule)."""
    shipped = raw_rows(SHIPPED)
    path = write_table(pd.DataFrame(shipped).drop(columns=["split"]), tmp_path / "unsplit.parquet")
    pairs = load_pairs(path, None, 0.28)
    assert pairs == load_pairs(SHIPPED) and pairs == load_pairs(path, None, 0.28)  # deterministic
    splits_of = defaultdict(set)
    for p in load_pairs(path, None, 0.5):
        splits_of[p["concept"]].add(p["split"])
    assert max(len(s) for s in splits_of.values()) == 1
    share = sum(len(s & {"eval"}) for s in splits_of.values()) / len(splits_of)
    assert 0.4 < share < 0.6, share


def test_without_a_concept_the_prompt_decides_and_family_defaults(tmp_path):
    rows = [{"q": f"Question number {i}?", "a": f"Answer {i}."} for i in range(200)]
    path = write_table(pd.DataFrame(rows), tmp_path / "bare.csv")
    pairs = load_pairs(path, {"q": "prompt", "a": "reference"}, 0.2)
    assert {p["family"] for p in pairs} == {"general"}
    assert all(p["split"] == data.auto_split(p["prompt"].lower(), 0.2) for p in pairs)
    assert 0.1 < sum(p["split"] == "eval" for p in pairs) / len(pairs) < 0.3


def test_the_automatic_split_does_not_depend_on_pythonhashseed(tmp_path):
    path = tmp_path / "unsplit.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n" for r in raw_rows()))
    code = (f"from rlft_support.data import load_pairs; "
            f"print([p['split'] for p in load_pairs({str(path)!r}, None, 0.3)])")
    outputs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1 and "eval" in outputs.pop()


def test_a_save_to_disk_folder_loads(tmp_path):
    import datasets
    frame = renamed_frame(raw_rows())
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "one"))
    assert load_pairs(tmp_path / "one", RENAMED, 0.2) == load_pairs(STARTER)
    halves = datasets.DatasetDict({"a": datasets.Dataset.from_pandas(frame[:20]),
                                   "b": datasets.Dataset.from_pandas(frame[20:].reset_index(drop=True))})
    halves.save_to_disk(str(tmp_path / "dict"))
    assert load_pairs(tmp_path / "dict", RENAMED, 0.2) == load_pairs(STARTER)
    frame.loc[25, "answer"] = ""
    datasets.DatasetDict({"b": datasets.Dataset.from_pandas(frame[20:].reset_index(drop=True))}).save_to_disk(
        str(tmp_path / "bad"))
    with pytest.raises(DataError) as err:
        load_pairs(tmp_path / "bad", RENAMED, 0.2)
    assert f"{tmp_path / 'bad'} [b]: row 6: column 'answer' (DATA_COLUMNS: reference) is empty" in str(err.value)


def test_a_hub_id_without_network_says_so_and_names_the_offline_way(monkeypatch):
    from rlft_support import assets
    monkeypatch.setattr(assets, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConnectionError) as err:
        load_pairs("someone/their-pairs:default:train", None, 0.2)
    message = str(err.value)
    assert "'someone/their-pairs:default:train'" in message and "could not be reached" in message
    assert "A local file works offline" in message and ".csv" in message
    assert data.parse_hub_spec("someone/their-pairs::train[:100]") == ("someone/their-pairs", None, "train[:100]")


def test_a_missing_local_file_is_not_taken_for_a_hub_id(tmp_path):
    for missing in (str(tmp_path / "nope.csv"), "data/nope.parquet", "./nope"):
        with pytest.raises(FileNotFoundError, match="no such file"):
            load_pairs(missing)


@pytest.mark.parametrize("knob, value, message", [
    ("DATA_COLUMNS", '{"question": "prompt"}', "with -y"),
    ("DATA_COLUMNS", {"question": "query"}, "'question' is mapped to 'query'"),
    ("DATA_COLUMNS", {"q": "prompt", "question": "prompt"}, "two columns are mapped to the same field"),
    ("EVAL_FRAC", 0, r"a share of the concepts in \(0, 1\)"),
    ("EVAL_FRAC", 1.0, r"a share of the concepts in \(0, 1\)"),
])
def test_config_checks_the_data_knobs(knob, value, message):
    with pytest.raises(ValueError, match=message):
        notebook_config(**{knob: value})


def test_a_renamed_column_that_clashes_with_an_existing_one_is_named(tmp_path):
    frame = renamed_frame(raw_rows()).assign(prompt="x")
    path = write_table(frame, tmp_path / "clash.csv")
    with pytest.raises(DataError, match=r"clash.csv: DATA_COLUMNS maps 'question' -> 'prompt', but the data already"):
        load_pairs(path, RENAMED, 0.2)
