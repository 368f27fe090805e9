"""The notebook's data (section 2): prompt -> reference pairs from a JSON Lines file, a CSV / TSV / Parquet file, a
folder written by `datasets`' `save_to_disk`, or a Hugging Face `datasets` id (`load_pairs`). `DATA_COLUMNS` maps
the file's column names to ours; a file with no split column is split by concept with `EVAL_FRAC` (`auto_split`,
a sha256 of the concept: the same split on every machine and run). Every malformed row is named (file and line or
row) in one DataError, and nothing is half-loaded."""
from __future__ import annotations

import hashlib, json, re
from pathlib import Path

SPLITS = ("train", "eval")
DATA_FIELDS = ("prompt", "reference", "split", "family", "concept")  # what DATA_COLUMNS may map a column to
DEFAULT_FAMILY = "general"
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")  # read with `datasets`; any other file is read as JSON Lines
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "owner/name"


class DataError(ValueError):
    """A malformed data file; the message names the file and the line (or row) of each problem."""


def columns_problem(columns) -> str | None:
    """What is wrong with a DATA_COLUMNS value ({your column: one of DATA_FIELDS}, or None / {}), or None."""
    if columns is None:
        return None
    if isinstance(columns, str):
        return ("a string, not a dict: papermill's -p passes text, so give it with -y (YAML), e.g. "
                "-y 'DATA_COLUMNS: {question: prompt, answer: reference}'")
    if not isinstance(columns, dict):
        return f"expected a dict {{your column: one of {DATA_FIELDS}}}, got {type(columns).__name__}"
    for source, target in columns.items():
        if not isinstance(source, str) or not source:
            return f"column name {source!r} is not a non-empty string"
        if target not in DATA_FIELDS:
            return f"{source!r} is mapped to {target!r}; expected one of {DATA_FIELDS}"
    targets = list(columns.values())
    if len(set(targets)) < len(targets):
        return f"two columns are mapped to the same field: {sorted(t for t in targets if targets.count(t) > 1)}"
    return None


def eval_bucket(concept: str) -> int:
    """The concept's bucket in [0, 100): the first 8 hex digits of sha256(concept) mod 100 (data/README.md's rule;
    no salted hash(), so it is the same under any PYTHONHASHSEED, on any machine)."""
    return int(hashlib.sha256(concept.encode("utf-8")).hexdigest()[:8], 16) % 100


def auto_split(concept: str, eval_frac: float) -> str:
    """'eval' for about `eval_frac` of the concepts (bucket / 100 < eval_frac), else 'train'. At 0.28 this is the
    rule that split data/pairs.jsonl."""
    return "eval" if eval_bucket(concept) / 100 < eval_frac else "train"  # k / 100 == the float k / 100 exactly


def _encodable(text: str) -> bool:
    """False for text that UTF-8 cannot encode (a lone surrogate from a JSON escape such as "\\ud800")."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def rename(row: dict, columns: dict | None) -> dict:
    """The row with the user's column names replaced by ours (DATA_COLUMNS); a ValueError if a renamed column
    would overwrite a column that already has that name."""
    columns = columns or {}
    clash = [f"{src!r} -> {dst!r}" for src, dst in columns.items() if src in row and dst in row and dst != src]
    if clash:
        raise ValueError(f"DATA_COLUMNS maps {', '.join(clash)}, but the data already has a column named that")
    return {columns.get(key, key): value for key, value in row.items()}


def check_row(row: dict, eval_frac: float | None = None, kind: str = "field", names: dict | None = None) -> dict:
    """One row (our field names) -> {'prompt', 'reference', 'split', 'family', 'concept'}; a ValueError saying what
    is wrong. `eval_frac` set: the split comes from the concept (`auto_split`), not from the row. `names` maps our
    field names back to the user's column names for the message; `kind` is "field" (JSONL) or "column"."""
    def label(key):
        name = (names or {}).get(key, key)
        return f"{kind} {name!r}" + (f" (DATA_COLUMNS: {key})" if name != key else "")

    for key in ("prompt", "reference") + (() if eval_frac is not None else ("split",)):
        if key not in row:
            raise ValueError(f"missing {label(key)}; {kind}s found: {sorted((names or {}).get(k, k) for k in row)}")
        if row[key] is None or (isinstance(row[key], str) and not row[key].strip()):
            raise ValueError(f"{label(key)} is empty")
        if not isinstance(row[key], str):
            raise ValueError(f"{label(key)} is not text (got {type(row[key]).__name__} {row[key]!r})")
    for key, value in row.items():
        if isinstance(value, str) and not _encodable(value):
            raise ValueError(f"{label(key)} holds a lone surrogate escape (e.g. \\ud800), not valid Unicode text")
    concept = (str(row.get("concept") or "").strip() or row["prompt"].strip()).lower()
    split = auto_split(concept, eval_frac) if eval_frac is not None else row["split"].strip()
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} in {label('split')} (expected one of {SPLITS})")
    family = row.get("family")
    family = DEFAULT_FAMILY if family is None or not str(family).strip() else str(family).strip()
    return {"prompt": row["prompt"].strip(), "reference": row["reference"].strip(), "split": split,
            "family": family, "concept": concept}


def parse_pair(line: str) -> dict:
    """One JSONL line (our field names, a split) -> a pair (see `check_row`); raises ValueError saying what is wrong."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    return check_row(row)


def read_jsonl(path: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """([(where, row)], [error]) of a JSON Lines file: where = 'file:line'; a line that is not UTF-8 or not a JSON
    object is an error; blank lines are skipped; a leading BOM (Notepad) is fine."""
    rows, errors = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                errors.append(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{where}: bad JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                errors.append(f"{where}: expected a JSON object")
                continue
            rows.append((where, row))
    return rows, errors


def _table(path: Path):
    """A CSV / TSV / Parquet file as a `datasets.Dataset`. CSV and TSV cells are read as text (a number stays as
    written, e.g. '3.10'); only an empty cell is missing (not 'NA' or 'None', which are text)."""
    import datasets
    if path.suffix.lower() == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    import pandas as pd
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    header = pd.read_csv(path, sep=sep, nrows=0, encoding="utf-8").columns
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return datasets.load_dataset("csv", data_files=str(path), split="train", sep=sep, features=features,
                                 keep_default_na=False, na_values=[""], encoding="utf-8")


def parse_hub_spec(spec: str) -> tuple[str, str | None, str | None] | None:
    """'owner/name', 'owner/name:config' or 'owner/name:config:split' ('owner/name::split' without a config) ->
    (id, config, split); None if `spec` is not spelled like a hub id."""
    name, config, split = (spec.split(":", 2) + [None, None])[:3]
    if not HUB_ID.fullmatch(name):
        return None
    return name, config or None, split or None


def _hub_dataset(spec: str):
    """A Hugging Face `datasets` id (see parse_hub_spec) loaded with the network; a ConnectionError saying so when
    the hub cannot be reached (a local file works offline)."""
    import datasets
    from huggingface_hub import constants
    from rlft_support import assets
    name, config, split = parse_hub_spec(spec)
    if constants.HF_HUB_OFFLINE or not assets.hub_reachable() \
            or not assets.hub_answers(f"datasets/{name}", constants.HF_HUB_ETAG_TIMEOUT):
        raise ConnectionError(
            f"DATA_PATH={spec!r}: no such local file, and the Hugging Face hub ({constants.ENDPOINT}) could not be "
            "reached to load it as a `datasets` id (no network, no answer, or HF_HUB_OFFLINE is set). A local file "
            "works offline: .jsonl, .csv, .tsv, .parquet, or a folder written by Dataset.save_to_disk.")
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # not found, gated, a config or split that does not exist: say which DATA_PATH
        raise DataError(f"DATA_PATH={spec!r}: `datasets` could not load {name!r} (config {config!r}, split "
                        f"{split!r}): {type(e).__name__}: {e}") from e


def read_dataset(spec: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """([(where, row)], column names) of a table file, a save_to_disk folder or a hub id; where = '<file>: row N'
    (rows counted from 1, the header not counted; '<file> [split]: row N' for each split of a DatasetDict, all
    read)."""
    import datasets
    path = Path(spec).expanduser()
    if path.is_dir():
        if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            raise DataError(f"DATA_PATH={spec!r} is a folder but not one written by Dataset.save_to_disk")
        data = datasets.load_from_disk(str(path))
    elif path.exists():
        try:
            data = _table(path)
        except Exception as e:  # pandas / arrow: not UTF-8, a ragged row, not a Parquet file
            raise DataError(f"{spec}: could not be read as {path.suffix} ({type(e).__name__}: {e}); "
                            "nothing was loaded") from e
    else:
        data = _hub_dataset(spec)
    parts = data.items() if isinstance(data, datasets.DatasetDict) else [(None, data)]
    rows, columns = [], []
    for split, part in parts:
        columns = columns or list(part.column_names)
        prefix = spec if split is None else f"{spec} [{split}]"
        rows += [(f"{prefix}: row {i}", row) for i, row in enumerate(part.to_list(), start=1)]
    return rows, columns


def is_table_or_dataset(spec: str) -> bool:
    """Whether DATA_PATH is read with `datasets` (a table file, a folder, a hub id) rather than as JSON Lines."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.is_dir() or path.suffix.lower() in TABLE_SUFFIXES
    if path.suffix.lower() in TABLE_SUFFIXES + (".jsonl", ".json") or spec.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"DATA_PATH={spec!r}: no such file")
    if parse_hub_spec(spec) is None:
        raise FileNotFoundError(f"DATA_PATH={spec!r}: no such file or folder, and not a `datasets` id "
                                "('owner/name', 'owner/name:config' or 'owner/name:config:split')")
    return True


def check_columns(spec: str, found: list[str], columns: dict) -> bool:
    """A DataError naming the file, the column and the columns found when a table lacks 'prompt' or 'reference'
    (after DATA_COLUMNS) or a renamed column clashes with an existing one; else whether it has a split column."""
    try:
        rename(dict.fromkeys(found), columns)
    except ValueError as e:
        raise DataError(f"{spec}: {e}; columns found: {found}; nothing was loaded") from None
    ours = [columns.get(c, c) for c in found]
    missing = [key for key in ("prompt", "reference") if key not in ours]
    if missing:
        names = {dst: src for src, dst in columns.items()}
        wanted = ", ".join(f"{k!r} (looked for {names.get(k, k)!r})" for k in missing)
        raise DataError(f"{spec}: no column for {wanted}; columns found: {found}. Map yours with DATA_COLUMNS, "
                        "e.g. {'question': 'prompt', 'answer': 'reference'}; nothing was loaded")
    return "split" in ours


def load_pairs(path, columns: dict | None = None, eval_frac: float = 0.0) -> list[dict]:
    """Read and check every row of DATA_PATH (JSON Lines, .csv, .tsv, .parquet, a save_to_disk folder or a hub
    id) -> pairs {'prompt', 'reference', 'split', 'family', 'concept'}. `columns` (DATA_COLUMNS) renames the user's
    columns to ours; without a split column the split is `auto_split(concept, eval_frac)`. Any bad row raises one
    DataError listing them all (file and line / row each): nothing is half-loaded."""
    spec, problem = str(path), columns_problem(columns)
    if problem:
        raise ValueError(f"DATA_COLUMNS={columns!r}: {problem}")
    columns = columns or {}
    if is_table_or_dataset(spec):
        (rows, found), errors, kind = read_dataset(spec), [], "column"
        has_split = check_columns(spec, found, columns)
    else:
        (rows, errors), kind = read_jsonl(spec), "field"
        has_split = any("split" in {columns.get(key, key) for key in row} for _, row in rows)
    return _check_rows(spec, rows, errors, columns, None if has_split else eval_frac, kind)


def _check_rows(spec: str, rows: list, errors: list, columns: dict, eval_frac: float | None, kind: str) -> list:
    """The pairs of `rows` ([(where, row)]) or one DataError listing every problem (with `errors` already found)."""
    names, pairs = {dst: src for src, dst in columns.items()}, []
    if rows and eval_frac is not None and not eval_frac > 0:
        errors.append(f"{spec}: no row has a split ({kind} 'split', or one mapped to it by DATA_COLUMNS); set "
                      "EVAL_FRAC (e.g. 0.2) to split by concept")
        rows = []
    for where, row in rows:
        try:
            pairs.append(check_row(rename(row, columns), eval_frac, kind, names))
        except ValueError as e:
            errors.append(f"{where}: {e}")
    if errors:
        raise DataError(f"{len(errors)} malformed {'line' if kind == 'field' else 'row'}(s); nothing was loaded:\n"
                        + "\n".join(errors[:20]) + (f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""))
    if not pairs:
        raise DataError(f"{spec}: no pairs found")
    return pairs


def split_pairs(pairs: list[dict], split: str) -> list[dict]:
    """The pairs of one split, in file order."""
    return [p for p in pairs if p["split"] == split]


def train_eval_pairs(pairs: list[dict], path: str) -> tuple[list[dict], list[dict]]:
    """(train pairs, eval pairs); a DataError naming the file when either split is empty (both are needed)."""
    train, held_out = split_pairs(pairs, "train"), split_pairs(pairs, "eval")
    for name, part in (("train", train), ("eval", held_out)):
        if not part:
            raise DataError(f"{path}: no pairs with split {name!r} ({len(pairs)} pairs, all "
                            f"{'eval' if name == 'train' else 'train'}); the notebook needs both train and eval pairs "
                            "(a file without a split column is split by concept: EVAL_FRAC is the share in eval)")
    return train, held_out


UNLABELLED_SALT = "unlabelled:"  # salts the concept's hash: the unlabelled share does not follow the eval split's


def unlabelled_split(train_pairs: list[dict], frac: float) -> tuple[list[dict], list[dict]]:
    """(labelled, unlabelled) TRAIN pairs for UNLABELLED_FRAC = `frac`: a pair is unlabelled when its concept's
    bucket, eval_bucket(UNLABELLED_SALT + concept), is < 100 * frac (so about `frac` of the concepts, the same on
    every machine and run, all pairs of a concept on one side); the unlabelled keep their prompt, family and
    concept, and their reference becomes "" (nothing downstream can read it). An eval pair is a ValueError (this
    never touches the eval split); so is a share that leaves either side empty. frac 0: (train_pairs, [])."""
    if any(p.get("split") == "eval" for p in train_pairs):
        raise ValueError("unlabelled_split takes the TRAIN pairs only; an eval pair was passed")
    if frac <= 0:
        return train_pairs, []
    labelled, unlabelled = [], []
    for p in train_pairs:
        (unlabelled if eval_bucket(UNLABELLED_SALT + (p.get("concept") or p["prompt"].strip().lower())) / 100 < frac else labelled).append(p)
    if not labelled or not unlabelled:
        raise ValueError(f"UNLABELLED_FRAC={frac} leaves {len(labelled)} labelled and {len(unlabelled)} unlabelled "
                         f"of {len(train_pairs)} train pairs; both must be non-empty")
    return labelled, [{**p, "reference": ""} for p in unlabelled]
