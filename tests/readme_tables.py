"""Regenerate README.md's generated tables: `python tests/readme_tables.py` (tests check they are current).
They live here, not in train_gpt.py, whose every byte counts against the cap."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402


def knob_table() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for f in sorted(train_gpt.knob_fields(), key=lambda f: f.name):
        choices = f" ({' / '.join(map(str, f.metadata['choices']))})" if f.metadata["choices"] else ""
        rows.append(f"| `{f.name.upper()}` | `{f.default}` | {f.metadata['doc']}{choices} |")
    return "\n".join(rows)


def alias_table() -> str:
    rows = ["| other scripts' name | here |", "| --- | --- |"]
    rows += [f"| `{old}` | `{new}` |" for old, new in sorted(train_gpt.ALIASES.items())]
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
