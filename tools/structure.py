"""Measure how the notebook reads (issues 17 and 31) and write docs/structure.md:

    .venv/bin/python tools/structure.py              # rlft.py -> docs/structure.md
    .venv/bin/python tools/structure.py --check      # exit 1 if docs/structure.md is not what rlft.py gives
    .venv/bin/python tools/structure.py --before FILE  # print the figures of another rlft.py (e.g. `git show
                                                       # ed749a0:rlft.py > /tmp/before.py`): how BEFORE was made

Figures, from the jupytext source rlft.py (non-blank lines only):
- lines per section, markdown / code, and its largest code cell;
- the largest code cell and the largest function (def to its last line) of the notebook;
- the share of definition lines (`#| export` cells) in METHOD sections: those that state the method the seed names
  (model + LoRA, data, generation, evaluation, rewards, PPO, the training run); the rest is the run's plumbing
  (imports, checkpoints and logs, data parallelism), the results, the FFT experiment and the demo;
- for each display equation ($$ ... $$), the lines from it down to the code that implements it: the nearest
  top-level `def`/`class` after it of a name its paragraph (or the next) mentions in backticks, else the next
  code cell;
- knobs: names in the parameters cell, `Config` fields with a default (rlft_support/config.py), and how many knobs
  reach the code under a second name (a `field="KNOB"` map such as the old `PPO_PARAMETERS`);
- the notebook's length, and the lines of each rlft_support/ module.
The "before" column is these figures of rlft.py at commit ed749a0 (issue 31's starting point), measured with
`--before` and kept as constants (BEFORE), so a clone without that history still regenerates the page.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE, OUT = ROOT / "rlft.py", ROOT / "docs" / "structure.md"
METHOD = ("model", "data", "generate", "evaluate", "similarity", "reward_model", "ppo", "pipeline")
SUPPORT, CONFIG = ROOT / "rlft_support", ROOT / "rlft_support" / "config.py"
TARGETS = {"largest code cell": 60, "equation to its code": 15, "notebook lines": 2600, "method share": 0.75}
# `--before` on rlft.py at ed749a0 (5,113 lines; METHOD as above, so the FFT and the demo count as non-method).
# (Issue 31 quotes 837 lines for the PPO cell and a 34% method share: all lines, and plumbing inside the method
# sections counted as plumbing; this tool counts non-blank lines and whole sections.)
BEFORE = {"notebook_lines": 5113, "largest_cell": 707, "largest_function": ("ChatDemo", 79), "method_share": 0.58,
          "far_equations": "11 of 14", "knobs": 101, "renamed": 33, "config_defaults": 0}


def cells(text: str) -> list[dict]:
    """The percent-format cells: {start (1-based line of the `# %%` marker), kind, section, lines}."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("# %%"):
            m = re.search(r'"section": "([^"]+)"', line)
            out.append({"start": i, "kind": "md" if "[markdown]" in line else "code",
                        "section": m.group(1) if m else "", "lines": []})
        elif out:
            out[-1]["lines"].append(line)
    return out


def nonblank(cell: dict) -> int:
    return sum(1 for line in cell["lines"] if line.strip())


def is_export(cell: dict) -> bool:
    return cell["kind"] == "code" and any(line.startswith("#| export") for line in cell["lines"][:2])


def definitions(cs: list[dict]) -> dict[str, tuple[int, int]]:
    """name -> (first line, last line) in the file of every top-level function and class."""
    found = {}
    for c in cs:
        if c["kind"] != "code":
            continue
        try:
            tree = ast.parse("\n".join(c["lines"]))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.setdefault(node.name, (c["start"] + node.lineno, c["start"] + node.end_lineno))
    return found


def paragraph(lines: list[str], j: int) -> str:
    """The paragraph of markdown line j (up to the blank comment lines around it) and the paragraph after it."""
    blank = lambda k: lines[k].strip() in ("", "#")  # noqa: E731
    lo = j
    while lo > 0 and not blank(lo - 1):
        lo -= 1
    hi, seen = j, 0
    while hi < len(lines) - 1 and seen < 2:
        hi += 1
        seen += blank(hi) and not blank(hi - 1)
    return "\n".join(lines[lo:hi + 1])


def equation_distances(cs: list[dict], defs: dict) -> list[dict]:
    """Each display equation: its line, the code it is measured to, and the distance in lines."""
    rows = []
    for k, c in enumerate(cs):
        if c["kind"] != "md":
            continue
        next_code = next((d["start"] for d in cs[k + 1:] if d["kind"] == "code"), None)
        opened = None
        for j, line in enumerate(c["lines"]):
            for _ in range(line.count("$$")):
                if opened is None:
                    opened = c["start"] + 1 + j
                    continue
                end = c["start"] + 1 + j
                named = set(re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)", paragraph(c["lines"], j)))
                after = sorted((first, name) for name, (first, _) in defs.items() if name in named and first > end)
                target, name = after[0] if after else (next_code, "next code cell")
                if target is not None:
                    rows.append({"line": opened, "section": c["section"], "to": name, "distance": target - end})
                opened = None
    return rows


def parameter_names(cs: list[dict]) -> set[str]:
    """The names the parameters cell assigns."""
    params = next(c for c in cs if c["section"] == "parameters" and c["kind"] == "code")
    return {m.group(1) for line in params["lines"] if (m := re.match(r"([A-Z][A-Z0-9_]*) = ", line))}


def config_defaults(path: Path = CONFIG) -> set[str]:
    """The `Config` fields that have a default (the support knobs); empty when there is no Config."""
    if not path.exists():
        return set()
    tree = ast.parse(path.read_text())
    config = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config"), None)
    return {n.target.id for n in (config.body if config else []) if isinstance(n, ast.AnnAssign) and n.value}


def knob_names(cs: list[dict], text: str) -> tuple[int, int]:
    """(knobs in the parameters cell, knobs the code reaches under a second name through a `field="KNOB"` map)."""
    knobs = parameter_names(cs)
    renamed = set(re.findall(r'\b[a-z_]+="([A-Z][A-Z0-9_]*)"', text)) & knobs
    return len(knobs), len(renamed)


def measure(text: str) -> dict:
    cs = cells(text)
    defs = definitions(cs)
    sections: dict[str, dict] = {}
    for c in cs:
        s = sections.setdefault(c["section"], {"md": 0, "code": 0, "largest": 0, "export": 0})
        s[c["kind"]] += nonblank(c)
        if c["kind"] == "code":
            s["largest"] = max(s["largest"], nonblank(c))
            s["export"] += nonblank(c) if is_export(c) else 0
    code_cells = [c for c in cs if c["kind"] == "code" and c["section"] != "parameters"]
    biggest = max(code_cells, key=nonblank)
    fn = max(((name, last - first + 1) for name, (first, last) in defs.items()), key=lambda x: x[1])
    export = sum(s["export"] for s in sections.values())
    knobs, renamed = knob_names(cs, text)
    eqs = equation_distances(cs, defs)
    return {"sections": sections, "largest_cell": (nonblank(biggest), biggest["section"], biggest["start"]),
            "largest_function": fn, "code_cells": len(code_cells),
            "method_share": sum(s["export"] for k, s in sections.items() if k in METHOD) / max(export, 1),
            "export_lines": export, "equations": eqs, "knobs": knobs, "renamed": renamed,
            "notebook_lines": len(text.splitlines())}


def support_lines(folder: Path = SUPPORT) -> dict[str, int]:
    """Lines of each rlft_support/ module."""
    return {f.name: len(f.read_text().splitlines()) for f in sorted(folder.glob("*.py"))} if folder.exists() else {}


def figure_rows(m: dict) -> list[tuple[str, str, str, str]]:
    """(figure, before at ed749a0, now, target) rows of the summary table."""
    size, section, start = m["largest_cell"]
    far = [e for e in m["equations"] if e["distance"] > TARGETS["equation to its code"]]
    defaults, b = len(config_defaults()), BEFORE
    names = 2 if m["renamed"] else 1
    return [
        ("notebook lines (rlft.py, all)", f"{b['notebook_lines']:,}", f"{m['notebook_lines']:,}",
         f"<= {TARGETS['notebook lines']:,}"),
        ("largest code cell (non-blank lines)", str(b["largest_cell"]), f"{size} ({section}, rlft.py line {start})",
         f"<= {TARGETS['largest code cell']}"),
        ("largest function", f"`{b['largest_function'][0]}`, {b['largest_function'][1]}",
         f"`{m['largest_function'][0]}`, {m['largest_function'][1]}", "<= ~40"),
        (f"method share of the definition lines ({m['export_lines']} now)", f"{b['method_share']:.0%}",
         f"{m['method_share']:.0%}", f">= {TARGETS['method share']:.0%}"),
        (f"display equations more than {TARGETS['equation to its code']} lines above their code", b["far_equations"],
         f"{len(far)} of {len(m['equations'])}", "0"),
        ("knobs in the parameters cell", str(b["knobs"]), str(m["knobs"]), ""),
        ("knobs with their only default in `Config` (rlft_support/config.py)", str(b["config_defaults"]),
         str(defaults), ""),
        ("knobs reached under a second name", str(b["renamed"]), str(m["renamed"]), "0"),
        ("names per knob (most)", "up to 4 (issue 31)", str(names), "1"),
    ]


def report(m: dict) -> str:
    lines = ["# How the notebook reads (issues 17 and 31)", "",
             "Generated by `tools/structure.py` from `rlft.py` and `rlft_support/` (non-blank lines unless said; the "
             "parameters cell is not counted as a code cell). Regenerate with `.venv/bin/python tools/structure.py`.",
             "", "| figure | before (ed749a0) | now | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in figure_rows(m)]
    lines += ["", "| section | markdown lines | code lines | largest code cell | definition lines |",
              "|---|---|---|---|---|"]
    for name, s in m["sections"].items():
        lines.append(f"| {name or '(none)'} | {s['md']} | {s['code']} | {s['largest']} | {s['export']} |")
    support = support_lines()
    lines += ["", f"The plumbing, `rlft_support/` ({sum(support.values()):,} lines, never imports the notebook):", "",
              "| module | lines |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in support.items()]
    lines += ["", f"Method sections: {', '.join(METHOD)}.", "",
              "| equation (rlft.py line) | section | measured to | lines |", "|---|---|---|---|"]
    lines += [f"| {e['line']} | {e['section']} | `{e['to']}` | {e['distance']} |" for e in m["equations"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/structure.md is out of date")
    ap.add_argument("--before", type=Path, help="print the figures of another rlft.py (for BEFORE) and exit")
    args = ap.parse_args()
    if args.before:
        m = measure(args.before.read_text())
        far = sum(e["distance"] > TARGETS["equation to its code"] for e in m["equations"])
        print({"notebook_lines": m["notebook_lines"], "largest_cell": m["largest_cell"][0],
               "largest_function": m["largest_function"], "method_share": round(m["method_share"], 2),
               "far_equations": f"{far} of {len(m['equations'])}", "knobs": m["knobs"], "renamed": m["renamed"]})
        return 0
    text = report(measure(SOURCE.read_text()))
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run .venv/bin/python tools/structure.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
