import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests import train_gpt and data.* from the repo root
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def local_corpus():
    """The bundled default corpus in the repo's data/ (built once, then reused:
    prepare_local is idempotent). Returns (dataset_dir, tokenizer_path)."""
    from data import prepare_local

    result = prepare_local.run(log=lambda *args: None)
    return result["dataset_dir"], result["tokenizer_path"]
