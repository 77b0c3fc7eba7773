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
    ({"TRAIN_BATCH_SIZE": "8"}, "TRAIN_BATCH_TOKENS"),            # a common alternative name
    ({"model_dim": "64"}, "did you mean MODEL_DIM"),              # lowercase is not silently ignored
    ({"MATRIX_LR": "nan"}, "MATRIX_LR"),                          # non-finite floats
    ({"TIED_EMBED_LR": "inf"}, "TIED_EMBED_LR"),
    ({"MAX_WALLCLOCK_SECONDS": "nan"}, "MAX_WALLCLOCK_SECONDS"),
    ({"LOOP_DT": "nan"}, "LOOP_DT"),
    ({"CRAWLER_LOOP_ROPE_SCALES": "1,nan"}, "CRAWLER_LOOP_ROPE_SCALES"),
    ({"RUN_ID": "a/b"}, None),                                    # checked when the run starts (make_run_id)
    ({"TRIGRAM_VOCAB_SIZE": "8192"}, "NGRAM_HASH=trigram"),
    ({"TTT_BURST_EPOCHS": "2"}, "replay and self-distillation were deleted"),
    ({"REPLAY_BATCHES": "4"}, "REPLAY_BATCHES: not a knob of train_gpt.py; its arm was deleted"),
    ({"DEVICE": "cuda"}, "DEVICE: .*CUDA_VISIBLE_DEVICES"),                # nanoGPT's knob: says how to force CPU
    ({"DROPOUT": "0.1"}, "DROPOUT: .*no dropout"),
    ({"SEED": "4294967296"}, "SEED=4294967296: must be a finite number in \\[0, 4294967295\\]"),
    ({"SEED": "1e30"}, "SEED"),
    ({"MODEL_DIM": "1e30", "NUM_HEADS": "4"}, "MODEL_DIM=.*must be"),
    ({"CRAWLER_LOOPS": "1e30"}, "CRAWLER_LOOPS"),
    ({"MLP_MULT": "1e30"}, "MLP_MULT"),
    ({"NUM_CRAWLER_LAYERS": "1e30"}, "NUM_CRAWLER_LAYERS"),
    ({"VE_LAYERS": "crawlers"}, "VE_LAYERS"),
    ({"VE_LAYERS": "0,9"}, "VE_LAYERS"),
    ({"EMA_DECAY": "0"}, "EMA_DECAY"),                           # EXPORT_WEIGHTS=ema needs an EMA
    ({"EXPORT_WEIGHTS": "swa"}, "EXPORT_WEIGHTS"),
    ({"SWA_EVERY": "50"}, "SWA_EVERY: not a knob.*its arm was deleted"),
    ({"RESUME": "1"}, "RESUME"),                                  # needs an explicit RUN_ID
    ({"GPTQ_RESERVE_SECONDS": "600"}, "GPTQ_RESERVE_SECONDS"),
    ({"EMBED_WD": "-0.5"}, "EMBED_WD.*-1 \\(= ADAM_WD\\) or >= 0"),
    ({"MUON_NS": "cubic"}, "MUON_NS"),
    ({"MUON_ROW_NORM": "2"}, "MUON_ROW_NORM"),
    ({"MUON_ROW_NORMALIZE": "1"}, "here it is MUON_ROW_NORM"),   # the records' names point to ours
    ({"SKIP_GATES_ENABLED": "1"}, "here it is SKIP_GATES"),
    ({"LOOP_START": "3"}, "here it is CRAWLER_POSITION / CRAWLER_LOOPS / CRAWLER_LOOPS_SCHEDULE"),
    ({"SKIPS": "unet"}, "SKIPS"),
    ({"MATRIX_INIT": "xavier"}, "MATRIX_INIT"),
    ({"LN_SCALE_DEPTH": "physical"}, "LN_SCALE_DEPTH"),
    ({"PARALLEL_START": "-2"}, "PARALLEL_START"),
    ({"LOOP_EMBED": "0"}, "LOOP_EMBED: not a knob"),
])
def test_bad_values_name_the_variable(env, var):
    if var is None:
        with pytest.raises(tg.HyperparameterError, match="RUN_ID"):
            tg.make_run_id(tg.Hyperparameters.from_env(env), tg.DistInfo())
        return
    with pytest.raises(tg.HyperparameterError, match=var):
        tg.Hyperparameters.from_env(env)


def test_typo_suggests_the_knob():
    with pytest.raises(tg.HyperparameterError, match="did you mean CRAWLER_LOOPS"):
        tg.Hyperparameters.from_env({"NUM_CRAWLER_LOOPZ": "2"})


def test_unrelated_environment_is_accepted():
    env = {"HOME": "/root", "PATH": "/bin", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0",
           "NCCL_DEBUG": "INFO", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "29500",
           "PYTHONPATH": ".", "CI": "true", "HF_HOME": "/tmp", "LANG": "C.UTF-8"}
    platform = ("LOCAL_WORLD_SIZE MASTER_ADDR GROUP_RANK ROLE_RANK ROLE_NAME ROLE_WORLD_SIZE GROUP_WORLD_SIZE JOB_ID "
                "TORCHELASTIC_RESTART_COUNT TORCHELASTIC_RUN_ID TORCHELASTIC_MAX_RESTARTS NODE_RANK NUM_GPUS "
                "NUM_WORKERS NUM_NODES")   # torchrun's and schedulers' (the last three share our NUM_ prefix)
    tg.Hyperparameters.from_env({**env, **dict.fromkeys(platform.split(), "1")})
    tg.Hyperparameters.from_env(dict(os.environ))


def test_readme_documents_every_knob():
    import readme_tables
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in tg.knob_names() if f"| `{k}` |" not in readme]
    assert not missing, f"README knob table lacks {missing}; run python tests/readme_tables.py"
    assert readme_tables.render(readme) == readme, "README tables are stale; run python tests/readme_tables.py"
    assert all(f"| `{old}` |" in readme for old in tg.ALIASES)


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


# Environment variables a researcher's shell, a pod image, CI or a library sets: never ours, always accepted.
UNRELATED = """HOME PATH USER SHELL PWD OLDPWD TERM LANG LANGUAGE LC_ALL LC_CTYPE TZ HOSTNAME LOGNAME MAIL EDITOR VISUAL
PAGER LESS DISPLAY SSH_AUTH_SOCK SSH_CLIENT SSH_CONNECTION SSH_TTY TMPDIR TMP TEMP XDG_RUNTIME_DIR XDG_CONFIG_HOME
XDG_CACHE_HOME XDG_DATA_HOME XDG_SESSION_ID DBUS_SESSION_BUS_ADDRESS COLORTERM TERM_PROGRAM SHLVL _ PS1 HISTSIZE HISTFILE
MANPATH INFOPATH LD_LIBRARY_PATH LD_PRELOAD LIBRARY_PATH CPATH PKG_CONFIG_PATH CC CXX CFLAGS CXXFLAGS LDFLAGS MAKEFLAGS
PYTHONPATH PYTHONHASHSEED PYTHONUNBUFFERED PYTHONDONTWRITEBYTECODE PYTHONWARNINGS PYTHONFAULTHANDLER VIRTUAL_ENV
CONDA_PREFIX CONDA_DEFAULT_ENV CONDA_EXE PIP_INDEX_URL PIP_NO_CACHE_DIR PIP_CONSTRAINT PIP_NO_INDEX OMP_NUM_THREADS
MKL_NUM_THREADS OPENBLAS_NUM_THREADS NUMEXPR_NUM_THREADS KMP_AFFINITY CUDA_VISIBLE_DEVICES CUDA_HOME CUDA_PATH
CUDA_LAUNCH_BLOCKING CUDNN_PATH NVIDIA_VISIBLE_DEVICES NVIDIA_DRIVER_CAPABILITIES NCCL_DEBUG NCCL_IB_DISABLE
NCCL_P2P_DISABLE NCCL_SOCKET_IFNAME NCCL_TIMEOUT TORCH_LOGS TORCH_HOME TORCH_CUDA_ARCH_LIST TORCHINDUCTOR_CACHE_DIR
TORCHINDUCTOR_FX_GRAPH_CACHE TORCH_COMPILE_DEBUG TORCHDYNAMO_VERBOSE TORCH_DISTRIBUTED_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING
PYTORCH_CUDA_ALLOC_CONF TRITON_CACHE_DIR HF_HOME HF_TOKEN HF_HUB_OFFLINE HF_HUB_ENABLE_HF_TRANSFER HF_DATASETS_CACHE
TRANSFORMERS_CACHE HUGGING_FACE_HUB_TOKEN WANDB_API_KEY WANDB_PROJECT WANDB_ENTITY WANDB_MODE WANDB_DIR RUNPOD_POD_ID
RUNPOD_API_KEY RUNPOD_GPU_COUNT JUPYTER_TOKEN CI GITHUB_ACTIONS GITHUB_SHA GITHUB_REF GITHUB_WORKSPACE RUNNER_OS
GIT_AUTHOR_NAME GIT_COMMITTER_EMAIL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION
GOOGLE_APPLICATION_CREDENTIALS DOCKER_HOST KUBERNETES_SERVICE_HOST HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy
https_proxy no_proxy SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE PYTEST_CURRENT_TEST PYTEST_ADDOPTS COLUMNS LINES
PROFILE THRESHOLD BUDGET_MINUTES SLURM_JOB_ID""".split()


def test_unrelated_names_are_accepted():
    assert len(UNRELATED) >= 127
    for var in UNRELATED:
        tg.Hyperparameters.from_env({var: "1"})


def typos(name: str) -> list[str]:
    """The four kinds of one-edit typo: a letter dropped, doubled, swapped with its neighbour (when two
    neighbours differ: TTT has none), replaced."""
    letters = [i for i, c in enumerate(name) if c.isalpha()]
    i, j = letters[len(letters) // 2], letters[-1]
    swaps = [k for k in letters[:-1] if name[k] != name[k + 1] and name[k + 1].isalpha()][:1]
    other = "Q" if name[j] != "Q" else "Z"
    return [name[:i] + name[i + 1:], name[:i] + name[i] + name[i:], name[:j] + other + name[j + 1:],
            *(name[:k] + name[k + 1] + name[k] + name[k + 2:] for k in swaps)]


def test_one_edit_typos_of_every_knob_are_rejected():
    """Every knob, short ones included (SEED, QUANT, RESUME): 4 typo kinds each, 100% rejected."""
    names = tg.knob_names()
    assert len(names) >= 30
    missed = []
    for name in names:
        for typo in typos(name):
            if typo in names:
                continue
            try:
                tg.Hyperparameters.from_env({typo: "1"})
                missed.append(typo)
            except tg.HyperparameterError as err:
                assert typo in str(err)
    assert not missed, missed
    for short in ("SED", "SEEDS", "RESME", "COMPLE", "QUNT"):
        with pytest.raises(tg.HyperparameterError, match=short):
            tg.Hyperparameters.from_env({short: "1"})


def test_the_submission_stays_within_its_byte_and_column_budget():
    """Issue 21: every packed byte is a byte of model the cap takes away; the issues after it add their
    features within 36,000 packed bytes, in lines of at most 110 columns."""
    assert len(tg.packed_code()) <= 36_000
    lines = (ROOT / "train_gpt.py").read_text().splitlines()
    assert not [i + 1 for i, line in enumerate(lines) if len(line) > 110]


def test_the_packed_script_is_base93_ascii_that_decodes_to_the_stripped_source_and_packs_itself(tmp_path):
    """The packed script: three ASCII lines (import, the base-93 string, the stub's decoder and exec); imported as
    train_gpt it is the same program (its knobs, their defaults) and its own packing."""
    packed = tg.packed_code()
    assert packed.isascii() and packed.startswith(tg.PACKED_PREFIX) and packed.count(b"\n") == 3
    folder = tmp_path / "packed"
    folder.mkdir()
    (folder / "train_gpt.py").write_bytes(packed)
    probe = ("import ast, train_gpt as tg; hp = tg.Hyperparameters(); "
             "print(tg.__file__, tg.packed_code() == open(tg.__file__, 'rb').read(), hp.model_dim, "
             "[f.name for f in tg.knob_fields()] == %r)" % [f.name for f in tg.knob_fields()])
    out = subprocess.run([sys.executable, "-c", probe], cwd=folder, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(folder / "train_gpt.py"), "True", str(tg.Hyperparameters().model_dim), "True"]


def test_validation_globs_take_the_shards_not_their_byte_sidecars():
    """A CaseOps dataset ships fineweb_val_bytes_000000.bin beside fineweb_val_000000.bin (prepare_local --caseops
    writes <name>_val_bytes_* and <name>_heldout_bytes_*): the default and the profiles' globs must skip them."""
    import fnmatch
    import re
    names = ["fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin", "local_heldout_000000.bin",
             "local_heldout_bytes_000000.bin", "fineweb_train_000001.bin"]
    assert fnmatch.filter(names, tg.Hyperparameters().val_files) == ["fineweb_val_000000.bin"]
    profile = (ROOT / "experiments" / "profile.sh").read_text()
    assert fnmatch.filter(names, re.search(r'VAL_FILES:-([^}]*)', profile).group(1)) == ["local_heldout_000000.bin"]
    second = (ROOT / "experiments" / "second_corpus.sh").read_text()
    assert fnmatch.filter(names, re.search(r"VAL_FILES='([^']*)'", second).group(1)) == ["fineweb_val_000000.bin"]
