"""Regenerate README.md's generated tables: `python tests/readme_tables.py` (tests check they are current).
The knob table comes from train_gpt.py's Hyperparameters: each field's `#:` comment (on its line, or the
lines just above it) is its documentation. Comments are stripped from the packed script, so documentation
costs no counted bytes."""
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402


def knob_docs() -> dict[str, str]:
    """{field name: its #: documentation} for every field of Hyperparameters."""
    lines = (ROOT / "train_gpt.py").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("class Hyperparameters"))
    comments = {tok.start[0] - 1: tok.string for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines)).readline)
                if tok.type == tokenize.COMMENT and tok.string.startswith("#:")}
    docs, above = {}, []
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if line and not line.startswith(" "):
            break
        field = re.match(r"    (\w+): [\w\[\], .|]+ = knob\(", line)
        if field:
            docs[field.group(1)] = " ".join(above + ([comments[i][2:].strip()] if i in comments else []))
            above = []
        elif line.strip().startswith("#:"):
            above.append(line.strip()[2:].strip())
        elif line.strip() and not (line.strip().startswith("#") or field):
            above = []
    return docs


def value_range(f) -> str:
    meta = f.metadata
    if meta["choices"]:
        return " / ".join(map(str, meta["choices"]))
    if meta["lo"] is not None:
        return f"{meta['lo']:g} to {meta['hi']:g}" if meta["hi"] is not None else f">= {meta['lo']:g}"
    return "on / off" if isinstance(f.default, bool) else "text"


def knob_table() -> str:
    docs = knob_docs()
    rows = ["| variable | default | range | meaning |", "| --- | --- | --- | --- |"]
    for f in sorted(train_gpt.knob_fields(), key=lambda f: f.name):
        rows.append(f"| `{f.name.upper()}` | `{f.default}` | {value_range(f)} | {docs[f.name]} |")
    return "\n".join(rows)


def alias_table() -> str:
    rows = ["| other scripts' name | here |", "| --- | --- |"]
    rows += [f"| `{old}` | {why} |" for old, why in sorted(train_gpt.ALIASES.items())]
    return "\n".join(rows)


TABLES = {"knobs": knob_table, "renamed": alias_table}


def render(text: str) -> str:
    for name, make in TABLES.items():
        text = re.sub(rf"(<!-- {name} -->\n).*?(\n<!-- /{name} -->)", lambda m: m.group(1) + make() + m.group(2),
                      text, flags=re.S)
    return text


if __name__ == "__main__":
    readme = ROOT / "README.md"
    readme.write_text(render(readme.read_text()))
    print("README.md tables regenerated")
