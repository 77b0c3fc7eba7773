"""How data/corpus/python_docs.jsonl.xz was made: English text harvested from a Python installation.

The file in the repository is the harvest of CPython 3.11.7 (2026-12-03) and is what
`data/prepare_local.py` builds the demo corpus from, on any Python, so every machine trains on the same
tokens. Rerunning this script on another Python gives another corpus; only 3.11.7 reproduces the file
(tests/test_data.py checks that the shipped file is what this script reads from 3.11.7, where it can).

Documents, one JSON object per line, in harvest order:
- the pydoc help topics (`pydoc_data.topics`), in sorted key order;
- one document per standard-library module: its docstrings (module, classes, functions, read with `ast`,
  never imported), skipping tests, demos and legacy tooling, and modules with under 200 characters;
- `"heldout": true`: the docstrings of what the corpus skips (the stdlib's tests, IDLE, lib2to3, turtledemo)
  and of the pip and setuptools wheels in ensurepip: a validation pool of the same kind of text that is
  never trained on, tokenizer included.

Usage: python data/harvest_python_docs.py [--out data/corpus/python_docs.jsonl.xz]
"""

from __future__ import annotations

import argparse
import ast
import json
import lzma
import os
import platform
import sysconfig
import warnings
import zipfile
from pathlib import Path

CORPUS_FILE = Path(__file__).resolve().parent / "corpus" / "python_docs.jsonl.xz"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
HELDOUT_DIRS = sorted(SKIP_DIRS - {"site-packages", "dist-packages", "__pycache__"})
MIN_MODULE_DOC_CHARS = 200
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def module_docstrings(source: bytes) -> str:
    """Module, class and function docstrings in source order (defs nested in if/try/with included)."""
    found: list[str] = []

    def record(node) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            found.append(doc.strip())

    def visit(node) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, _DEFS):
                record(child)
                visit(child)
            elif not isinstance(child, ast.expr):  # expressions hold no defs
                visit(child)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes etc. in old files
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    record(tree)
    visit(tree)
    return "\n\n".join(found)


def stdlib_sources(root: Path):
    """(name, path) of the .py files under root, sorted, skipping SKIP_DIRS."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            yield Path(dirpath) / filename


def harvest(stdlib: Path | None = None) -> list[dict]:
    from pydoc_data.topics import topics

    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs = [{"source": f"pydoc:{key}", "text": topics[key]} for key in sorted(topics) if topics[key].strip()]
    modules = [(p.relative_to(stdlib).as_posix(), p.read_bytes) for p in stdlib_sources(stdlib)]
    heldout = [(p.relative_to(stdlib).as_posix(), p.read_bytes) for d in HELDOUT_DIRS for p in stdlib_sources(stdlib / d)]
    for wheel in sorted((stdlib / "ensurepip" / "_bundled").glob("*.whl")):
        archive = zipfile.ZipFile(wheel)
        heldout += [(f"{wheel.name}:{n}", lambda n=n, a=archive: a.read(n))
                    for n in sorted(archive.namelist()) if n.endswith(".py")]
    for kind, sources in ((False, modules), (True, heldout)):
        for name, read in sources:
            text = module_docstrings(read())
            if len(text) >= MIN_MODULE_DOC_CHARS:
                docs.append({"source": name, "text": text, **({"heldout": True} if kind else {})})
    return docs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Harvest the running Python's documentation into a JSONL.xz corpus.")
    p.add_argument("--out", type=Path, default=CORPUS_FILE)
    args = p.parse_args(argv)
    docs = harvest()
    lines = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(lzma.compress(lines.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    held = sum(bool(d.get("heldout")) for d in docs)
    print(f"harvest: Python {platform.python_version()}: {len(docs) - held} documents + {held} held out -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
