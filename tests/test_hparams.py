"""Hyperparameters: parsing, every error path, unknown-knob detection, the README table, import hygiene."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_env_overrides_types():
    hp = tg.Hyperparameters.from_env({"MODEL_DIM": "160", "MLP_MULT": "2.5", "LN_SCALE": "off",
                                      "CRAWLER_POSITION": "bottleneck", "TRAIN_BATCH_TOKENS": "786_432"})
    assert (hp.model_dim, hp.mlp_mult, hp.ln_scale, hp.crawler_position) == (160, 2.5, False, "bottleneck")
    assert hp.train_batch_tokens == 786432
    assert tg.Hyperparameters().effective_depth == hp.num_flat_layers + hp.num_crawler_layers * hp.crawler_loops


@pytest.mark.parametrize("env, var", [
    ({"MODEL_DIM": "abc"}, "MODEL_DIM"),
    ({"MODEL_DIM": "12.5"}, "MODEL_DIM"),
    ({"MATRIX_LR": "fast"}, "MATRIX_LR"),
    ({"LN_SCALE": "maybe"}, "LN_SCALE"),
    ({"CRAWLER_POSITION": "middle"}, "CRAWLER_POSITION"),
    ({"MLP_ACT": "gelu"}, "MLP_ACT"),
    ({"CRAWLER_LOOPS": "0"}, "CRAWLER_LOOPS"),
    ({"BETA2": "1.5"}, "BETA2"),
    ({"MODEL_DIM": "130"}, "MODEL_DIM"),                       # not divisible by 10 heads
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"ROPE_DIMS": "70"}, "ROPE_DIMS"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE"),
    ({"NUM_FLAT_LAYERS": "0", "NUM_CRAWLER_LAYERS": "0"}, "NUM_FLAT_LAYERS"),
    ({"NUM_CRAWLER_LOOPZ": "2"}, "NUM_CRAWLER_LOOPZ"),           # typo of a knob
    ({"CRAWLER_LOPS": "2"}, "CRAWLER_LOPS"),
    ({"CRAWLER_FOO": "1"}, "CRAWLER_FOO"),                       # our prefix, no such knob
    ({"NUM_LAYERS": "9"}, "NUM_FLAT_LAYERS"),                    # the seeds' name: points to ours
    ({"TRIGRAM_VOCAB_SIZE": "8192"}, "NGRAM_HASH=trigram"),
    ({"TTT_BURST_EPOCHS": "2"}, "REPLAY_EPOCHS"),
    ({"VE_LAYERS": "crawlers"}, "VE_LAYERS"),
    ({"VE_LAYERS": "0,9"}, "VE_LAYERS"),
    ({"EMA_DECAY": "0"}, "EMA_DECAY"),                           # EXPORT_WEIGHTS=ema needs an EMA
    ({"EXPORT_WEIGHTS": "swa", "SWA_EVERY": "0"}, "SWA_EVERY"),
    ({"RESUME": "1"}, "RESUME"),                                  # needs an explicit RUN_ID
    ({"GPTQ_RESERVE_SECONDS": "600"}, "GPTQ_RESERVE_SECONDS"),
])
def test_bad_values_name_the_variable(env, var):
    with pytest.raises(tg.HyperparameterError, match=var):
        tg.Hyperparameters.from_env(env)


def test_typo_suggests_the_knob():
    with pytest.raises(tg.HyperparameterError, match="did you mean CRAWLER_LOOPS"):
        tg.Hyperparameters.from_env({"NUM_CRAWLER_LOOPZ": "2"})


def test_unrelated_environment_is_accepted():
    env = {"HOME": "/root", "PATH": "/bin", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0",
           "NCCL_DEBUG": "INFO", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "29500",
           "PYTHONPATH": ".", "CI": "true", "SEEDS": "1,2", "HF_HOME": "/tmp", "LANG": "C.UTF-8"}
    tg.Hyperparameters.from_env(env)
    tg.Hyperparameters.from_env(dict(os.environ))


def test_readme_documents_every_knob():
    import readme_tables
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in tg.knob_names() if f"| `{k}` |" not in readme]
    assert not missing, f"README knob table lacks {missing}; run python tests/readme_tables.py"
    assert readme_tables.render(readme) == readme, "README tables are stale; run python tests/readme_tables.py"
    assert all(f"| `{old}` |" in readme for old in tg.RENAMED_KNOBS)


def test_cli_rejects_typo_before_doing_anything(tmp_path):
    env = dict(os.environ)
    env["NUM_CRAWLER_LOOPZ"] = "2"
    out = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "NUM_CRAWLER_LOOPZ" in out.stderr
    assert not (tmp_path / "logs").exists()


def test_import_has_no_side_effects():
    code = ("import torch, torch.distributed as dist, train_gpt; "
            "assert not dist.is_initialized(); "
            "assert not torch.cuda.is_initialized(); print('clean')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"
