"""The faults of the issue "Bad input never gets scored or trained on" (found on 5820dc0): one or more
tests each, every one failing on 5820dc0's behaviour. One tiny trained model (module fixture) serves most.

Already covered elsewhere, not repeated: every byte flip of small artifacts (test_export_core), the typo
fuzz, unrelated names and nan/inf knob values (test_hparams), the over-cap rename in-process (test_e2e)."""
import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt as tg
from experiments import records
from data.prepare_local import SP_TRAINER_SPEC
from data.shard_io import write_shard
from test_data import _corrupt
from test_e2e import ROOT, TINY, tiny_env

SCRIPT = ROOT / "train_gpt.py"
VAL_TOKENS = 6000   # a short val shard keeps every evaluation here under a second
FAST = {"ITERATIONS": "4", "TRAIN_BATCH_TOKENS": "1024", "EVAL_STRIDE": "128", "VAL_LOSS_EVERY": "0", "QUANT": "rtn",
        "SIZE_TARGET": "none", "COMPRESS_LEVEL": "5"}


def fast_env(small, tmp: Path, **overrides) -> dict:
    return tiny_env(small.corpus, tmp, **{**FAST, **overrides})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs on one thread, as the CLI runs here (OMP_NUM_THREADS=1): shared CPUs slow
    two threads down far more than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small(local_corpus, tmp_path_factory):
    """The bundled corpus with a short val shard: `data` (train + val) and `val_only` (the val shard alone)."""
    dataset, tokenizer = map(Path, local_corpus)
    root = tmp_path_factory.mktemp("corpus")
    val = tg.load_data_shard(next(dataset.glob("*_val_*.bin")))[:VAL_TOKENS].numpy()
    for folder in ("data", "val_only"):
        write_shard(root / folder / "local_val_000000.bin", val)
    shutil.copy(next(dataset.glob("*_train_*.bin")), root / "data")
    return SimpleNamespace(data=root / "data", val_only=root / "val_only", tokenizer=tokenizer,
                           corpus=(str(root / "data"), str(tokenizer)))


@pytest.fixture(scope="module")
def base(small, tmp_path_factory):
    """One tiny run, exported with brotli: its result, its env and its folder."""
    tmp = tmp_path_factory.mktemp("base")
    env = fast_env(small, tmp, RUN_ID="base", SUBMIT_BLURB="the first of two")
    out = tg.main(env)
    out["records"] = str(records.write_records(tmp / "logs" / "base.json"))
    return SimpleNamespace(out=out, env=env, tmp=tmp)


def cli(env: dict, cwd: Path | None = None, argv: list[str] | None = None) -> subprocess.CompletedProcess:
    """The script as a user runs it: this shell's variables (less our knobs and torchrun's) plus `env`."""
    ours = set(tg.knob_names()) | tg.FOREIGN_VARS
    full = {k: v for k, v in os.environ.items() if k not in ours}
    full.update(env, OMP_NUM_THREADS="1")
    return subprocess.run(argv or [sys.executable, str(SCRIPT)], env=full, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def one_error(proc: subprocess.CompletedProcess, code: int, subject: str, fix: bool = True) -> str:
    """Exit `code`, no traceback, and exactly one stderr line `error: <subject>: <what> — <the fix>`
    (`subject` is a regex: the variable or the file)."""
    report = f"exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}\nstdout tail:\n{proc.stdout[-1000:]}"
    assert proc.returncode == code, report
    assert "Traceback" not in proc.stderr + proc.stdout, report
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(rf"error: (?:{subject}): \S", errors[0]), report
    assert not fix or re.search(r"\S — \S", errors[0]), report
    return errors[0]


def all_finite(obj) -> bool:
    """Every floating tensor anywhere in a (nested) checkpoint is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def refusal(check) -> str:
    """The message of the GolfError check() raised, or "" if it passed."""
    try:
        check()
    except tg.GolfError as err:
        return str(err)
    return ""


# ---------------------------------------------------------------- 1. integrity


def test_a_flipped_byte_in_a_brotli_artifact_is_refused_not_scored(base, small, tmp_path):
    blob = Path(base.out["artifact"]).read_bytes()
    flipped = tmp_path / "flipped.ptz"
    flipped.write_bytes(blob[:len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 0xFF]) + blob[len(blob) // 2 + 1:])
    proc = cli(fast_env(small, tmp_path, EVAL_ONLY=flipped, RUN_ID="flipped"))
    one_error(proc, 2, re.escape(str(flipped)))
    assert not (tmp_path / "logs" / "flipped.txt").exists()          # refused before anything was scored
    # the same anywhere in the demo-size file: 17 places from the magic to the last byte
    for pos in [*range(0, len(blob), len(blob) // 16), len(blob) - 1]:
        mutated = bytearray(blob)
        mutated[pos] ^= 0x01
        path = tmp_path / f"flip_{pos}.ptz"
        path.write_bytes(bytes(mutated))
        with pytest.raises(tg.ArtifactError, match=re.escape(str(path))):
            tg.load_artifact(path)


def test_eval_only_checks_the_artifact_against_submission_json(base, small, tmp_path):
    """A valid artifact that is not the one submitted (same weights, other bytes) is refused."""
    entries, meta = tg.unpack_artifact(Path(base.out["artifact"]).read_bytes())
    folder = tmp_path / "submitted"
    folder.mkdir()
    (folder / "final_model.ptz").write_bytes(tg.pack_artifact(entries, meta, 4))   # the run packed at 5
    shutil.copy(Path(base.out["records"]) / "submission.json", folder)
    with pytest.raises(tg.ArtifactError, match=rf"^{re.escape(str(folder / 'final_model.ptz'))}: .*submission\.json"):
        tg.main(fast_env(small, tmp_path, EVAL_ONLY=folder / "final_model.ptz", RUN_ID="swapped"))


# ---------------------------------------------------------------- 2. checkpoints


def test_divergence_exits_4_naming_a_finite_checkpoint(small, tmp_path):
    """TIED_EMBED_LR=1e30: finite after step 1, non-finite weights after step 2, a nan loss at step 3."""
    proc = cli(fast_env(small, tmp_path, ITERATIONS=20, TIED_EMBED_LR="1e30", CHECKPOINT_EVERY=1,
                        RUN_ID="diverged"))
    named = re.search(r"last good checkpoint: (\S+?);", proc.stderr)
    assert named and Path(named[1]).is_file(), proc.stderr[-3000:]
    assert all_finite(torch.load(named[1], map_location="cpu", weights_only=True)), f"{named[1]} holds non-finite tensors"
    assert not list((tmp_path / "artifacts").glob("*.ptz"))
    assert named[1] in one_error(proc, 4, r"[^:]+")


def test_a_non_finite_state_is_never_written(small, tmp_path):
    """Checkpoints at even steps only: here step 2's state is already non-finite (the loss turns nan at
    step 3), so no file is written and the error names none."""
    with pytest.raises(FloatingPointError) as err:
        tg.main(fast_env(small, tmp_path, ITERATIONS=20, TIED_EMBED_LR="1e30", CHECKPOINT_EVERY=2,
                         RUN_ID="never"))
    written = sorted((tmp_path / "artifacts").glob("*.ckpt"))
    assert not [p for p in written if not all_finite(torch.load(p, map_location="cpu", weights_only=True))], written
    named = re.search(r"last good checkpoint: (\S+?);", str(err.value))
    assert named and ([Path(named[1])] == written if written else named[1] == "none"), (str(err.value), written)
    assert isinstance(err.value, tg.Diverged) and err.value.exit_code == 4


# ---------------------------------------------------------------- 3. typo guard


def test_a_typo_or_a_reused_run_id_never_overwrites_a_run(base):
    log, artifact = base.tmp / "logs" / "base.txt", Path(base.out["artifact"])
    before = (log.read_bytes(), artifact.read_bytes())
    with pytest.raises(tg.HyperparameterError, match="RESME.*did you mean RESUME"):
        tg.main({**base.env, "RESME": "1"})
    with pytest.raises(tg.HyperparameterError, match=r"^RUN_ID: base already has .*base\.(txt|ptz)"):
        tg.main(base.env)
    assert (log.read_bytes(), artifact.read_bytes()) == before
    with pytest.raises(tg.DataError, match="^RESUME: no checkpoint"):
        tg.main({**base.env, "RESUME": "1"})
    assert log.read_bytes().startswith(before[0]) and artifact.read_bytes() == before[1]


# ---------------------------------------------------------------- 5. one error style


def bad_input(case: str, small, tmp: Path) -> tuple[dict, str]:
    """The environment of one kind of bad input, and (as a regex) what its error line must name."""
    data = tmp / "data"
    if case in ("bad_magic", "bad_version", "shorter_than_header"):
        shutil.copytree(small.data, data)
        _corrupt(data / "local_val_000000.bin", case)
        return {"DATA_PATH": data}, re.escape(str(data / "local_val_000000.bin"))
    if case == "token_id_over_vocab":
        data.mkdir()
        shutil.copy(small.data / "local_val_000000.bin", data)
        tokens = np.full(4096, 7)
        tokens[-1] = 1500                                        # VOCAB_SIZE is 1024
        write_shard(data / "local_train_000000.bin", tokens)
        return {"DATA_PATH": data}, re.escape(str(data / "local_train_000000.bin"))
    if case == "garbage_tokenizer":
        (tmp / "garbage.model").write_bytes(b"\x00not a sentencepiece model\n" * 40)
        return {"TOKENIZER_PATH": tmp / "garbage.model"}, "TOKENIZER_PATH"
    if case == "log_dir_is_a_file":                              # root writes through chmod; a file blocks anyone
        (tmp / "log_file").write_text("not a folder\n")
        return {"LOG_DIR": tmp / "log_file"}, "LOG_DIR"
    if case == "eval_only_is_a_folder":
        return {"EVAL_ONLY": tmp}, re.escape(str(tmp))
    assert case == "run_id_with_slash"
    return {"RUN_ID": "team/run1"}, "RUN_ID"


BAD_INPUTS = ["bad_magic", "bad_version", "shorter_than_header", "token_id_over_vocab", "garbage_tokenizer",
              "log_dir_is_a_file", "eval_only_is_a_folder", "run_id_with_slash"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_with_exit_2(case, small, tmp_path):
    overrides, subject = bad_input(case, small, tmp_path)
    env = fast_env(small, tmp_path, RUN_ID=f"bad_{case}")
    proc = cli({**env, **{k: str(v) for k, v in overrides.items()}})
    one_error(proc, 2, subject, fix=case != "run_id_with_slash")   # its missing fix: test_input_errors_say_how_to_fix_them
    assert not list(tmp_path.rglob("*.txt")), "a run log was started: the input was not refused up front"


def test_only_rank_0_prints_the_error(small, tmp_path):
    overrides, _ = bad_input("garbage_tokenizer", small, tmp_path)
    env = fast_env(small, tmp_path, RUN_ID="rank1", TOKENIZER_PATH=overrides["TOKENIZER_PATH"])
    proc = cli({**env, "RANK": "1", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error:" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_unexpected_exceptions_keep_their_traceback(small, tmp_path):
    """A FileNotFoundError from inside (not a GolfError) is a bug to debug, not bad input to summarise."""
    code = ("import runpy, torch\n"
            "def seed(*args, **kwargs):\n"
            "    raise FileNotFoundError('raised from inside the run')\n"
            "torch.manual_seed = seed\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    proc = cli(fast_env(small, tmp_path, RUN_ID="inside"), argv=[sys.executable, "-c", code])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "FileNotFoundError: raised from inside the run" in proc.stderr, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_over_the_cap_exits_3_and_keeps_the_artifact_aside(small, tmp_path):
    proc = cli(fast_env(small, tmp_path, ITERATIONS=1, COMPRESS_LEVEL=1,
                        SIZE_LIMIT=100_000, RUN_ID="over"))
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["over.over_cap.ptz"]
    assert not list((tmp_path / "records").glob("*over*"))
    one_error(proc, 3, "SIZE_LIMIT")


def test_over_the_cap_on_two_ranks_rank_0_alone_moves_the_artifact(small, tmp_path):
    """Issue 40: every rank raised the cap error, and every rank renamed the artifact (all but one then died of
    FileNotFoundError, or a rank's stat missed the file rank 0 had moved). Both ranks exit 3, one error line."""
    env = fast_env(small, tmp_path, ITERATIONS=1, COMPRESS_LEVEL=1, SIZE_LIMIT=100_000, RUN_ID="over2")
    proc = cli(env, argv=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(SCRIPT)])
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["over2.over_cap.ptz"], proc.stderr[-3000:]
    assert "FileNotFoundError" not in proc.stderr, proc.stderr[-3000:]
    # torchrun's failure table ("exitcode  : 3", one row a rank); its agent may also log "failed (exitcode: 3)"
    assert re.findall(r"exitcode\s+: (\d+)", proc.stderr) == ["3", "3"], proc.stderr[-3000:]
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error: SIZE_LIMIT: ")]) == 1


@pytest.mark.parametrize("var, value", [("RUN_ID", "team/run1"), ("EVAL_SEQ_LEN", str(VAL_TOKENS + 128)),
                                        ("TRAIN_BATCH_TOKENS", str(2 ** 21))])   # a window/a step longer than the data
def test_input_errors_say_how_to_fix_them(var, value, small, tmp_path):
    hp = tg.Hyperparameters.from_env(fast_env(small, tmp_path, **{"RUN_ID": "fix", var: value}))

    def start() -> None:   # what run() checks before training
        tg.make_run_id(hp, tg.DistInfo())
        tg.preflight(hp, tg.DistInfo(), torch.device("cpu"))
    message = refusal(start)
    if not message.startswith(f"{var}: "):
        pytest.fail(f"not refused as {var}: {message!r}")
    assert re.fullmatch(rf"{var}: \S.* — \S.*", message), message


# ---------------------------------------------------------------- 6. data vs tokenizer


@pytest.fixture(scope="module")
def other_tokenizers(local_corpus, tmp_path_factory):
    """SentencePiece models the shards were not made with, trained on the bundled val text: 512 pieces;
    1024 with the bundled spec (other pieces: other text); 1024 unigram."""
    import sentencepiece as spm
    dataset, tokenizer = map(Path, local_corpus)
    text = spm.SentencePieceProcessor(model_file=str(tokenizer)).decode(
        tg.load_data_shard(next(dataset.glob("*_val_*.bin"))).tolist())
    sentences = [s for s in re.split(r"(?<=\.) ", text) if s.strip()]
    folder, paths = tmp_path_factory.mktemp("tokenizers"), {}
    for name, spec in {"bpe512": {"vocab_size": 512}, "bpe1024": {}, "unigram1024": {"model_type": "unigram"}}.items():
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, minloglevel=2,
                                       **{**SP_TRAINER_SPEC, **spec})
        paths[name] = folder / f"{name}.model"
        paths[name].write_bytes(model.getvalue())
    return paths


@pytest.mark.parametrize("vocab_size", [None, "512"])
def test_a_tokenizer_with_another_vocab_is_refused_before_training(vocab_size, other_tokenizers, small, tmp_path):
    env = fast_env(small, tmp_path, TOKENIZER_PATH=other_tokenizers["bpe512"], RUN_ID="vocab")
    proc = cli({**env, **({"VOCAB_SIZE": vocab_size} if vocab_size else {})})
    line = one_error(proc, 2, rf"VOCAB_SIZE|TOKENIZER_PATH|{re.escape(str(small.data))}/\S+\.bin")
    assert "VOCAB_SIZE" in line or "TOKENIZER_PATH" in line
    assert not list(tmp_path.rglob("*.txt")), "the run started"


VIMDOC = ROOT / "data" / "tokenizers" / "vimdoc_1024_bpe.model"


@pytest.mark.parametrize("name", [
    "bpe1024", "unigram1024",
    pytest.param("vimdoc", marks=pytest.mark.skipif(not VIMDOC.is_file(), reason="no vimdoc corpus built")),
])
def test_a_tokenizer_with_other_pieces_is_refused_before_training(name, other_tokenizers, local_corpus, tmp_path):
    """Same vocab size, other pieces, on the bundled shards as they are."""
    tokenizer = VIMDOC if name == "vimdoc" else other_tokenizers[name]
    hp = tg.Hyperparameters.from_env(tiny_env(local_corpus, tmp_path, TOKENIZER_PATH=tokenizer))
    message = refusal(lambda: tg.preflight(hp, tg.DistInfo(), torch.device("cpu")))
    if message and not message.startswith("TOKENIZER_PATH: "):
        pytest.fail(f"refused for another reason: {message}")
    assert message, f"{tokenizer} was accepted for shards it did not make"


# ---------------------------------------------------------------- 7. EVAL_ONLY


def eval_settings(log: Path) -> tuple[str, str]:
    found = re.findall(r"^eval_settings:(\S+) from_artifact:(\S+)$", log.read_text(), flags=re.M)
    assert len(found) == 1, log.read_text()[-2000:]
    return found[0]


def test_eval_only_takes_eval_settings_from_the_artifact_and_needs_only_val(base, small, tmp_path):
    env = {k: v for k, v in fast_env(small, tmp_path).items() if k not in ("EVAL_SEQ_LEN", "EVAL_STRIDE")}
    env.update(DATA_PATH=str(small.val_only), EVAL_ONLY=str(Path(base.out["records"]) / "final_model.ptz"))
    again = tg.main({**env, "RUN_ID": "rescored"})                     # the records folder, submission.json beside it
    assert eval_settings(tmp_path / "logs" / "rescored.txt") == ("eval_seq_len=128,eval_stride=128",
                                                                  "eval_seq_len,eval_stride")
    assert again["val_bpb"] == pytest.approx(base.out["val_bpb"], abs=1e-9)
    strided = tg.main({**env, "RUN_ID": "strided", "EVAL_STRIDE": "64"})   # the environment wins where it speaks
    assert eval_settings(tmp_path / "logs" / "strided.txt") == ("eval_seq_len=128,eval_stride=64", "eval_seq_len")
    assert strided["val_bpb"] != again["val_bpb"]


def test_eval_only_fits_a_short_val_set_to_the_artifacts_window(base, small, tmp_path):
    short = tg.load_data_shard(small.val_only / "local_val_000000.bin")[:1500].numpy()   # > the artifact's 128
    write_shard(tmp_path / "val" / "local_val_000000.bin", short)
    env = {k: v for k, v in fast_env(small, tmp_path).items() if k not in ("EVAL_SEQ_LEN", "EVAL_STRIDE")}
    env.update(DATA_PATH=str(tmp_path / "val"), EVAL_ONLY=base.out["artifact"], RUN_ID="short_val")
    message = refusal(lambda: tg.main(env))
    assert not message, message


# ---------------------------------------------------------------- 8. export


def test_identical_weights_give_identical_artifact_bytes(base, small, tmp_path):
    twin = tg.main(fast_env(small, tmp_path, RUN_ID="twin", SUBMIT_BLURB="another blurb",
                            SUBMIT_NAME="Twin", SUBMIT_AUTHOR="someone else"))
    blob = Path(base.out["artifact"]).read_bytes()
    assert Path(twin["artifact"]).read_bytes() == blob, "run id, paths or blurb reached the counted bytes"
    meta = tg.unpack_artifact(blob)[1]
    hp = tg.Hyperparameters.from_env(base.env)
    assert meta == {"format": "crawler-golf", "model": hp.model_knobs(), "eval": {"eval_seq_len": 128, "eval_stride": 128},
                    "tokenizer_sha256": hashlib.sha256(small.tokenizer.read_bytes()).hexdigest()}


def test_pruning_shows_in_the_final_line_readme_and_submission(base, small, tmp_path, monkeypatch):
    """The fit's last resort: one pass at the base run's k, 300 bytes over the cap, pruned to fit."""
    cap = base.out["bytes_total"] - 300                                 # the same weights, 300 B over
    monkeypatch.setattr(tg, "FIT_PASSES", 1)
    k = base.out["quant_k"]   # the estimated curve puts the target at the base run's k, 300 bytes over the cap
    monkeypatch.setattr(tg, "rtn_curve", lambda model, hp, rel, meta, target: [(k, target), (2 * k, target / 2)])
    out = tg.main(fast_env(small, tmp_path, SIZE_TARGET="fit", SIZE_LIMIT=cap, RUN_ID="pruned"))
    n = out["pruned"]
    assert n > 0 and out["bytes_total"] <= cap
    last = (tmp_path / "logs" / "pruned.txt").read_text().strip().splitlines()[-1]
    assert last.startswith("final val_bpb:") and f" pruned_values:{n}" in last, last
    folder = records.write_records(tmp_path / "logs" / "pruned.json")
    assert json.loads((folder / "submission.json").read_text())["pruned_values"] == n
    assert re.search(rf"pruned[ _]values:? {n}\b", (folder / "README.md").read_text())


# ---------------------------------------------------------------- 9. minor


def test_an_absolute_data_path_with_brackets_finds_its_shards(small, tmp_path):
    folder = tmp_path / "runs[v1]" / "data"
    shutil.copytree(small.data, folder)
    hp = tg.Hyperparameters.from_env(tiny_env((str(folder), str(small.tokenizer)), tmp_path, **FAST))
    data = tg.preflight(hp, tg.DistInfo(), torch.device("cpu"))
    assert [p.name for p in data.train_files] == ["local_train_000000.bin"] and data.val_tokens.numel() == VAL_TOKENS


def test_a_missing_data_path_leaves_no_folders_in_the_working_directory(small, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**TINY, "TOKENIZER_PATH": str(small.tokenizer), "DATA_PATH": str(tmp_path / "no_such_data"), "RUN_ID": "stray"}
    proc = cli(env, cwd=cwd)
    assert not list(cwd.iterdir()), list(cwd.iterdir())
    assert "DATA_PATH" in one_error(proc, 2, "VAL_FILES|DATA_PATH")


def test_records_are_ignored_by_git():
    proc = subprocess.run(["git", "check-ignore", "--no-index", "-q", "records/2026-01-01_run/final_model.ptz"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, "records/<date>_<RUN_ID>/ (with its artifact) would show up as untracked"


# ---------------------------------------------------------------- issue 27: faults found on 2a24052


def enospc_on(monkeypatch, marker: str, after: int = 0):
    """Path.write_bytes raises ENOSPC (a full disk) for files whose name holds `marker`, after `after` writes."""
    real, seen = Path.write_bytes, {"n": 0}

    def write_bytes(self, data):
        if marker in self.name:
            seen["n"] += 1
            if seen["n"] > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_a_full_disk_at_the_export_is_one_error_naming_the_artifact_and_leaves_no_temporary(small, tmp_path,
                                                                                             monkeypatch):
    enospc_on(monkeypatch, "full.ptz")
    with pytest.raises(tg.DataError) as err:
        tg.main(fast_env(small, tmp_path, RUN_ID="full", CHECKPOINT_EVERY=2))
    message = str(err.value)
    assert message.startswith(str(tmp_path / "artifacts" / "full.ptz")) and "disk full" in message
    assert "RESUME=1" in message and "\n" not in message
    assert not [p for p in (tmp_path / "artifacts").iterdir() if ".tmp" in p.name]
    assert (tmp_path / "artifacts" / "full.r0.ckpt").is_file()   # the run can be exported again from here


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(small, tmp_path, monkeypatch):
    enospc_on(monkeypatch, ".ckpt", after=1)   # the first checkpoint (step 2) is written, the second fails
    with pytest.raises(tg.DataError, match=r"full\.r0\.ckpt: cannot write \(disk full\) — .*checkpoint is intact"):
        tg.main(fast_env(small, tmp_path, RUN_ID="full", CHECKPOINT_EVERY=2, ITERATIONS=6))
    kept = torch.load(tmp_path / "artifacts" / "full.r0.ckpt", map_location="cpu", weights_only=True)
    assert kept["step"] == 2 and not [p for p in (tmp_path / "artifacts").iterdir() if ".tmp" in p.name]


def test_a_full_disk_under_the_log_is_one_error_naming_it(small, tmp_path, monkeypatch):
    real = Path.open

    def open_(self, mode="r", *args, **kwargs):
        if self.name == "full.txt" and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, mode, *args, **kwargs)
    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(tg.DataError, match=r"full\.txt: cannot write \(disk full\)"):
        tg.main(fast_env(small, tmp_path, RUN_ID="full"))


def test_too_little_free_space_is_a_preflight_error_naming_the_folder(small, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=200 * 1024))
    with pytest.raises(tg.DataError) as err:
        tg.main(fast_env(small, tmp_path, RUN_ID="roomless"))
    assert re.match(r"ARTIFACT_DIR: \S+ has 204,800 bytes free; the run needs [\d,]+ on that disk", str(err.value))
    assert not (tmp_path / "logs" / "roomless.txt").exists()


def test_a_real_tmpfs_too_small_for_the_artifact_stops_the_cli_before_training(small, tmp_path):
    mnt = tmp_path / "tiny_disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here (the injected-ENOSPC tests cover the writes)")
    try:
        proc = cli({**fast_env(small, tmp_path, RUN_ID="tmpfs"), "ARTIFACT_DIR": str(mnt), "LOG_DIR": str(mnt)})
        assert "bytes free" in one_error(proc, 2, "ARTIFACT_DIR|LOG_DIR")
        assert sorted(p.name for p in mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_broken_manifest_names_the_file_and_the_rebuild(small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small.data, data)
    (data / "manifest.json").write_text("{not json")
    proc = cli(fast_env(small, tmp_path, DATA_PATH=data, RUN_ID="manifest"))
    line = one_error(proc, 2, re.escape(str(data / "manifest.json")))
    assert "prepare_local.py --force" in line and "JSONDecodeError" not in proc.stderr


def test_a_reused_run_id_is_refused_whatever_the_log_dir(base, small, tmp_path):
    """The artifact and the records folder of a finished run protect its RUN_ID too, not only its log."""
    env = {**base.env, "LOG_DIR": str(tmp_path / "other_logs")}
    with pytest.raises(tg.HyperparameterError, match=r"RUN_ID: base already has .*base\.ptz"):
        tg.main(env)
    (tmp_path / "recs" / "2026-01-01_lone").mkdir(parents=True)
    with pytest.raises(tg.HyperparameterError, match=r"RUN_ID: lone already has .*2026-01-01_lone"):
        tg.main(fast_env(small, tmp_path, RUN_ID="lone", RECORDS_DIR=tmp_path / "recs"))


@pytest.mark.parametrize("name", ["DEVICE", "MAX_ITERS", "BLOCK_SIZE", "DROPOUT", "GRADIENT_ACCUMULATION_STEPS",
                                  "EVAL_INTERVAL", "LR_DECAY_ITERS", "VOCAB", "HIDDEN_SIZE", "CONTEXT_LENGTH"])
def test_other_scripts_knobs_are_errors_that_say_what_to_use(name):
    with pytest.raises(tg.HyperparameterError, match=rf"^{name}: not a knob of train_gpt.py; \S"):
        tg.Hyperparameters.from_env({name: "1"})
    if name == "DEVICE":
        with pytest.raises(tg.HyperparameterError, match="CUDA_VISIBLE_DEVICES= \\(empty\\) forces the CPU"):
            tg.Hyperparameters.from_env({"DEVICE": "cuda"})


def test_platform_variables_are_accepted():
    for name in ("POD_NAME", "POD_IP", "POD_NAMESPACE", "POD_UID", "NUM_GPUS", "NUM_WORKERS", "NUM_NODES",
                 "NODE_RANK", "JOB_ID"):
        tg.Hyperparameters.from_env({name: "x"})


def test_a_bad_token_id_in_a_later_train_shard_is_caught_before_training(small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small.data, data)
    tokens = np.full(4096, 7)
    tokens[-1] = 1500   # VOCAB_SIZE is 1024
    write_shard(data / "local_train_000001.bin", tokens)
    proc = cli(fast_env(small, tmp_path, DATA_PATH=data, RUN_ID="late_shard"))
    one_error(proc, 2, re.escape(str(data / "local_train_000001.bin")))
    assert "preflight" not in proc.stdout and not (tmp_path / "logs" / "late_shard.txt").exists()


def test_a_shard_that_goes_bad_mid_run_leaves_a_checkpoint_to_resume_from(small, tmp_path, monkeypatch):
    """The preflight passed; then the second train shard changes on disk. At the first batch holding one of
    its windows (this seed: the first), the run stops with one error, a checkpoint of the last completed step
    (here step 0) written first."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(small.data / "local_val_000000.bin", data)
    train = tg.load_data_shard(small.data / "local_train_000000.bin").numpy()
    write_shard(data / "local_train_000000.bin", train[:2000])
    write_shard(data / "local_train_000001.bin", train[2000:6000])
    real = tg.preflight

    def then_corrupt(*args, **kwargs):
        out = real(*args, **kwargs)
        bad = train[2000:6000].astype(np.int64)
        bad[:] = 4000
        write_shard(data / "local_train_000001.bin", bad)
        return out
    monkeypatch.setattr(tg, "preflight", then_corrupt)
    with pytest.raises(tg.DataError, match=r"local_train_000001\.bin: token id 4000 >= VOCAB_SIZE=1024"):
        tg.main(fast_env(small, tmp_path, DATA_PATH=data, RUN_ID="midrun"))
    saved = torch.load(tmp_path / "artifacts" / "midrun.r0.ckpt", map_location="cpu", weights_only=True)
    assert saved["step"] == 0 and "checkpoint:" in (tmp_path / "logs" / "midrun.txt").read_text()
