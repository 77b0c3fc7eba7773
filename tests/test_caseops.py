"""data/lossless_caps.py: the lossless case transform, its inverse and the per-token original byte counts."""
import random
import sys

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from data import lossless_caps as lc
from data.lossless_caps import ALLCAPS, CAPNEXT, ESC, TITLE

# Characters where case is not one-to-one or not simple: ß (upper SS), İ (lower i + dot), ı, ǅ ǈ ǋ ǲ (title
# case digraphs), Ǆ ǆ, Greek sigmas Σ σ ς, ΐ (3-char upper), Kelvin sign, long s, the ﬁ ligature, ẞ.
SPECIAL = "ßİıǅǈǋǲǄǆΣσςΐ\u212aſﬁẞ\u0345ͅᾈᾀ"
OPERATOR_CHARS = "\ue000\ue001\ue002\ue003\ue004\ue005"
ALPHABET = ("abcxyzABCXYZ09 .,'\n\t" + "éÉàÀÿŸøØ" + "αβγΑΒΓ" + "абвАБВЁё" + "\u0307\u0301"
            + "😀👍🏽\u200d" + SPECIAL + OPERATOR_CHARS)
mixed_text = st.text(st.one_of(st.sampled_from(ALPHABET), st.characters()), max_size=60)
FAST = settings(max_examples=400, derandomize=True, database=None, deadline=None)


def seeded_strings(n: int, seed: int = 0):
    """Seeded random strings over ALPHABET with runs of one script, so words of mixed case form."""
    rng = random.Random(seed)
    for _ in range(n):
        yield "".join(rng.choice(ALPHABET) * rng.choice((1, 1, 2, 3)) for _ in range(rng.randrange(40)))


def test_exact_encoding_of_words():
    assert lc.encode("Hello WORLD foo McDonald iPhone") == (
        f"{TITLE}hello {ALLCAPS}world foo {TITLE}mc{CAPNEXT}donald i{CAPNEXT}phone")
    assert lc.encode("The NASA Launch") == f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"
    assert lc.encode("iPhone OpenAI") == f"i{CAPNEXT}phone {TITLE}open{CAPNEXT}a{CAPNEXT}i"
    assert lc.encode("I A x") == f"{TITLE}i {TITLE}a x"              # one capital: TITLE, not ALLCAPS
    assert lc.encode("ABc") == f"{TITLE}a{CAPNEXT}bc"
    assert lc.encode("École ΟΔΟΣ Москва") == f"{TITLE}école {ALLCAPS}οδοσ {TITLE}москва"


def test_text_whose_case_does_not_map_one_to_one_is_left_unchanged():
    for s in ("ß", "straße", "İ", "ı", "ǅ", "ǈ", "ς", "\u212a", "ſ", "ﬁ", "123 ☃ 😀"):
        assert lc.encode(s) == s, s
    # They end a word; the letters around them are still folded.
    assert lc.encode("STRAßE") == f"{ALLCAPS}straß{TITLE}e"
    assert lc.encode("İSTANBUL") == f"İ{ALLCAPS}stanbul"
    assert lc.encode("ΟΔΌΣ οδός") == f"{ALLCAPS}οδόσ οδός"     # final sigma stays, not folded to σ


def test_operator_characters_in_the_input_are_escaped():
    assert lc.encode(f"a{TITLE}B{ESC}") == f"a{ESC}{TITLE}{TITLE}b{ESC}{ESC}"
    assert lc.encode("\ue000\ue005") == "\ue000\ue005"             # neighbours of the operators: not ours
    assert lc.decode(lc.encode(TITLE + ALLCAPS + CAPNEXT + ESC)) == TITLE + ALLCAPS + CAPNEXT + ESC


@pytest.mark.parametrize("bad", [TITLE, f"{TITLE} a", f"{ESC}a", f"a{TITLE}b", f"{CAPNEXT}{CAPNEXT}a",
                                 f"{ALLCAPS}1", ESC])
def test_decode_rejects_sequences_encode_never_writes(bad):
    with pytest.raises(ValueError):
        lc.decode(bad)


def test_the_cased_letters_pair_up_one_to_one():
    """Every code point: an UPPER letter lowers to a LOWER one that uppers back to it, and vice versa,
    so folding a word and restoring it is exact."""
    for cp in range(sys.maxunicode + 1):
        c = chr(cp)
        kind = lc.char_kind(c)
        if kind == lc.UPPER:
            assert lc.char_kind(c.lower()) == lc.LOWER and c.lower().upper() == c, hex(cp)
        elif kind == lc.LOWER:
            assert lc.char_kind(c.upper()) == lc.UPPER and c.upper().lower() == c, hex(cp)
    assert lc.char_kind("A") == lc.UPPER and lc.char_kind("a") == lc.LOWER
    paired = "ǄǆΣσ"                                                  # in SPECIAL for their neighbours
    assert {lc.char_kind(c) for c in SPECIAL + OPERATOR_CHARS if c not in paired} == {lc.OTHER}
    assert [lc.char_kind(c) for c in paired] == [lc.UPPER, lc.LOWER] * 2


@FAST
@given(mixed_text)
def test_decode_inverts_encode_on_any_string(s):
    enc = lc.encode(s)
    assert lc.decode(enc) == s
    assert not any(lc.char_kind(c) == lc.UPPER for c in enc)          # every foldable letter was folded
    assert lc.encode(lc.decode(enc)) == enc


def test_decode_inverts_encode_on_seeded_random_strings():
    for s in seeded_strings(3000):
        assert lc.decode(lc.encode(s)) == s, repr(s)


@FAST
@given(st.text(st.one_of(st.sampled_from(ALPHABET), st.characters(blacklist_categories=("Cs",))),
               max_size=60),
       st.randoms(use_true_random=False))
def test_byte_counts_of_any_split_sum_to_the_original_utf8_length(s, rnd):
    enc = lc.encode(s)
    cuts = sorted(rnd.sample(range(len(enc) + 1), min(len(enc) + 1, rnd.randrange(6))))
    pieces = [enc[a:b] for a, b in zip([0] + cuts, cuts + [len(enc)])]
    counts = lc.original_byte_counts(pieces)
    assert len(counts) == len(pieces) and sum(counts) == len(s.encode("utf-8"))
    if not set(s) & set(lc.OPERATORS):                              # no escaped literal operators
        ops = lc.original_byte_counts(list(enc))                    # one character per piece
        assert all((n == 0) == (c in lc.OPERATORS) for c, n in zip(enc, ops))


def test_byte_counts_charge_a_folded_letter_its_original_bytes():
    # U+023A (2 bytes) folds to U+2C65 (3 bytes): the original's 2 are counted.
    assert lc.encode("\u023a") == TITLE + "\u2c65"
    assert lc.original_byte_counts([TITLE, "\u2c65", " ", ESC + TITLE]) == [0, 2, 1, 3]
    with pytest.raises(ValueError):
        lc.original_byte_counts([TITLE])


def test_token_byte_counts_through_a_real_tokenizer_sum_to_the_original_bytes(local_corpus):
    """Through a real SentencePiece model (its normalizer strips and merges whitespace and maps newlines,
    its byte fallback splits unknown characters, here the operators too): the ids are sp's, the counts sum
    to the original's UTF-8 bytes, and no whitespace is charged to an operator."""
    sp = spm.SentencePieceProcessor(model_file=str(local_corpus[1]))
    texts = ["  Hello   WORLD\n\n\tfoo McDonald iPhone  ", "\n Hi", "ＡＢ ﬁ ΟΔΟΣ \ue001 ß 😀 ", "x", " ",
             *seeded_strings(200, 1)]
    for text in texts:
        enc = lc.encode(text)
        ids, counts = lc.token_byte_counts(sp, enc)
        assert ids == sp.encode(enc) and len(counts) == len(ids)
        assert sum(counts) == (len(text.encode("utf-8")) if ids else 0), repr(text)
    ids, counts = lc.token_byte_counts(sp, lc.encode("  Hi"))            # TITLE comes as 3 byte tokens here
    assert sp.id_to_piece(ids[-1]) == "i" and counts == [0, 0, 0, 3, 1]


def test_token_byte_counts_keep_operators_at_zero_with_a_caseops_tokenizer(tmp_path):
    """A tokenizer with the operators as user-defined symbols: an operator token counts 0 even at the start
    of a text with leading whitespace; a literal operator (after ESC) counts its 3 bytes."""
    import io
    words = " ".join(lc.encode(w) for w in ("Hello WORLD iPhone foo bar McDonald the a of " * 3).split())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([words] * 20), model_writer=model, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=False,
                                   user_defined_symbols=list(lc.OPERATORS), minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    text = f"  Hello WORLD {TITLE} x  "
    ids, counts = lc.token_byte_counts(sp, lc.encode(text))
    op_ids = {sp.piece_to_id(op): op for op in lc.OPERATORS}
    pieces = [op_ids.get(i, sp.id_to_piece(i)) for i in ids]
    assert pieces[0] == TITLE and counts[0] == 0 and pieces.count(ESC) == 1
    assert [c for p, c in zip(pieces, counts) if p in lc.OPERATORS] == [0, 0, 0, 3]
    assert sum(counts) == len(text.encode("utf-8"))


# ---------------------------------------------------------------------- scoring by a byte sidecar (train_gpt.py)

def test_scoring_by_a_sidecar_equals_the_luts_where_caseops_emits_no_operator(local_corpus):
    """On text the transform leaves alone (lower case, in the tokenizer's normal form), the sidecar's counts are
    the LUTs' counts: the same val_bpb to the last bit; and the counts sum to the text's UTF-8 bytes."""
    import torch
    import train_gpt as tg
    from test_model import small_hp
    sp = spm.SentencePieceProcessor(model_file=str(local_corpus[1]))
    docs = ["the quick brown fox jumps over the lazy dog", "return the value of x, then print it.",
            "for each item in the list: call f(item) and keep the result", "naïve café, déjà vu — 3.5 µs"]
    tokens, counts = [], []
    for doc in docs:
        assert lc.encode(doc) == doc
        ids, n = lc.token_byte_counts(sp, doc)
        tokens, counts = tokens + [tg.BOS_ID, *ids], counts + [0, *n]
    assert sum(counts) == sum(len(d.encode()) for d in docs)
    torch.manual_seed(0)
    model = tg.CrawlerGPT(small_hp(VOCAB_SIZE=1024))
    tokens = torch.tensor(tokens)
    args = (16, 8, 64, tg.DistInfo(), torch.device("cpu"))
    by_luts = tg.evaluate(model, tokens, tg.build_byte_luts(sp, 1024), *args)
    by_sidecar = tg.evaluate(model, tokens, torch.tensor(counts), *args)
    assert by_sidecar == by_luts
    doubled = tg.evaluate(model, tokens, 2 * torch.tensor(counts), *args)   # the sidecar is what counts
    assert doubled[0] == by_luts[0] and doubled[1] == pytest.approx(by_luts[1] / 2, rel=1e-12)


def test_val_sidecars_are_found_beside_their_shards_all_or_none(tmp_path):
    import torch
    import train_gpt as tg
    from data.shard_io import write_shard
    shards = [write_shard(tmp_path / f"d_val_00000{i}.bin", [1, 5, 6, 7]) for i in range(2)]
    tokens = torch.cat([tg.load_data_shard(p) for p in shards])
    assert tg.val_bytes(shards, tokens) is None                      # no sidecar: the LUTs score
    write_shard(tmp_path / "d_val_bytes_000000.bin", [0, 1, 2, 3])
    with pytest.raises(tg.DataError, match="d_val_bytes_000001.bin: is missing"):
        tg.val_bytes(shards, tokens)
    write_shard(tmp_path / "d_val_bytes_000001.bin", [0, 4, 0])
    with pytest.raises(tg.DataError, match="holds 7 byte counts for 8 val tokens"):
        tg.val_bytes(shards, tokens)
    write_shard(tmp_path / "d_val_bytes_000001.bin", [0, 4, 0, 2])
    assert tg.val_bytes(shards, tokens).tolist() == [0, 1, 2, 3, 0, 4, 0, 2]
