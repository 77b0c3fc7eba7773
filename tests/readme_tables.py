"""Regenerate README.md's generated tables: `python tests/readme_tables.py` (tests check they are current)."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402

TABLES = {"knobs": train_gpt.knob_table_markdown, "renamed": train_gpt.renamed_table_markdown}


def render(text: str) -> str:
    for name, make in TABLES.items():
        text = re.sub(rf"(<!-- {name} -->\n).*?(\n<!-- /{name} -->)", lambda m: m.group(1) + make() + m.group(2),
                      text, flags=re.S)
    return text


if __name__ == "__main__":
    readme = ROOT / "README.md"
    readme.write_text(render(readme.read_text()))
    print("README.md tables regenerated")
