"""Edit rlft.ipynb one section at a time, safely from several shells at once.

Each notebook cell carries `metadata.rlft.section`. This tool moves a section's cells to and from a
small text format so a section can be written in an editor, and replaces them under a file lock
(so two people editing two sections never overwrite each other). Outputs are always stripped.

    python tools/nbsection.py list
    python tools/nbsection.py get SECTION > part.txt      # edit part.txt ...
    python tools/nbsection.py put SECTION part.txt        # ... then put it back
    python tools/nbsection.py put NEW part.txt --after SECTION   # a new section, right after SECTION
    python tools/nbsection.py param NAME VALUE [--comment TEXT] [--after NAME]

Text format: a line `#%% markdown` or `#%% code` (optionally `tags=a,b`) starts each cell.
`param` adds or replaces one `NAME = VALUE  # comment` line of the parameters cell.
"""
import argparse, contextlib, fcntl, json, re, sys, uuid
from pathlib import Path

NB = Path(__file__).resolve().parent.parent / "rlft.ipynb"
HEADER = re.compile(r"^#%% (markdown|code)(?: tags=(\S+))?\s*$")


@contextlib.contextmanager
def locked_notebook(write: bool):
    """Yield the notebook as a dict; write it back (outputs stripped) if `write`."""
    with open(NB.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        nb = json.loads(NB.read_text())
        yield nb
        if write:
            for c in nb["cells"]:
                c.setdefault("id", uuid.uuid4().hex[:8])
                if c["cell_type"] == "code":
                    c["outputs"], c["execution_count"] = [], None
            tmp = NB.with_suffix(".tmp")
            tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            tmp.replace(NB)


def section_of(cell) -> str:
    return cell.get("metadata", {}).get("rlft", {}).get("section", "")


def to_text(cells) -> str:
    out = []
    for c in cells:
        tags = c.get("metadata", {}).get("tags", [])
        out.append(f"#%% {c['cell_type']}" + (f" tags={','.join(tags)}" if tags else ""))
        out.append("".join(c["source"]) if isinstance(c["source"], list) else c["source"])
    return "\n".join(out) + "\n"


def from_text(text: str, section: str):
    cells, cur = [], None
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            cur = {"cell_type": m.group(1), "metadata": {"rlft": {"section": section}}, "source": []}
            if m.group(2):
                cur["metadata"]["tags"] = m.group(2).split(",")
            if cur["cell_type"] == "code":
                cur.update(outputs=[], execution_count=None)
            cells.append(cur)
        elif cur is None:
            if line.strip():
                sys.exit(f"text before the first '#%%' header: {line!r}")
        else:
            cur["source"].append(line)
    for c in cells:
        c["source"] = "\n".join(c["source"]).strip("\n")
    return cells


def put(section: str, text: str, after: str = ""):
    """Replace SECTION's cells; a section that does not exist yet is inserted right after section `after`."""
    new = from_text(text, section)
    with locked_notebook(write=True) as nb:
        idx = [i for i, c in enumerate(nb["cells"]) if section_of(c) == section]
        if not idx:
            at = [i for i, c in enumerate(nb["cells"]) if after and section_of(c) == after]
            if not at:
                sys.exit(f"no section {section!r} (a new one needs --after EXISTING_SECTION); see `list`")
            idx = [at[-1] + 1, at[-1]]  # an empty slice just after `after`
        nb["cells"][idx[0]: idx[-1] + 1] = new


def set_param(name: str, value: str, comment: str, after: str):
    line = f"{name} = {value}" + (f"  # {comment}" if comment else "")
    with locked_notebook(write=True) as nb:
        cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        lines = src.split("\n")
        hit = [i for i, l in enumerate(lines) if re.match(rf"^{name}\s*=", l)]
        if hit:
            lines[hit[0]] = line
        elif after:
            at = [i for i, l in enumerate(lines) if re.match(rf"^{after}\s*=", l)]
            lines.insert(at[0] + 1 if at else len(lines), line)
        else:
            lines.append(line)
        cell["source"] = "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["list", "get", "put", "param"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--comment", default="")
    ap.add_argument("--after", default="")
    a = ap.parse_args()
    if a.cmd == "list":
        with locked_notebook(write=False) as nb:
            for i, c in enumerate(nb["cells"]):
                first = (c["source"] if isinstance(c["source"], str) else "".join(c["source"])).split("\n")[0]
                print(f"{i:3d} {section_of(c):14s} {c['cell_type']:8s} {first[:70]}")
    elif a.cmd == "get":
        with locked_notebook(write=False) as nb:
            sys.stdout.write(to_text([c for c in nb["cells"] if section_of(c) == a.args[0]]))
    elif a.cmd == "put":
        put(a.args[0], Path(a.args[1]).read_text(), a.after)
    elif a.cmd == "param":
        set_param(a.args[0], a.args[1], a.comment, a.after)


if __name__ == "__main__":
    main()
