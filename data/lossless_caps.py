"""Lossless case operators ("CaseOps"): text -> lowercase text + case operators, and back, exactly.

Four private-use characters are operators (the code points the published CaseOps records reserve):
    TITLE   U+E001  the next word's first letter is upper case
    ALLCAPS U+E002  every letter of the next word is upper case
    CAPNEXT U+E003  the next letter is upper case
    ESC     U+E004  the next character is a literal operator character from the input

A *cased letter* is a character whose case maps one-to-one: an upper-case letter U with U.lower() one
character L != U and L.upper() == U, or such an L (all of A-Z/a-z, most Latin, Greek, Cyrillic, ...).
Everything else is left as it is and never changed: 'ß' (upper 'SS'), 'İ' (lower 'i̇'), 'ǅ' (title
case), final sigma 'ς' (upper 'Σ', whose lower is 'σ'), the Kelvin sign, digits, emoji, ...
A *word* is a maximal run of cased letters. `encode` rewrites each word (letters lowered one by one):
    all lower case                   -> unchanged               foo      -> foo
    two or more letters, all upper   -> ALLCAPS + lowered       WORLD    -> ALLCAPS world
    first upper, the rest lower      -> TITLE + lowered         Hello, I -> TITLE hello, TITLE i
    otherwise                        -> TITLE if the first letter is upper, then each letter lowered,
                                        CAPNEXT before each later upper-case one
                                                                McDonald -> TITLE mc CAPNEXT donald
                                                                iPhone   -> i CAPNEXT phone
and writes ESC before every operator character of the input. On ASCII text this is the published
`lossless_caps_caseops_v1` (the same output on all 1,133 ASCII documents of the bundled corpus and the
125 of vimdoc, run against the 2026-04-27 record's lossless_caps.py on 2026-12-03); beyond ASCII it also
folds the case of the other cased letters (3 of the bundled corpus's 77 other documents differ from it).
decode(encode(s)) == s for every string s.

`original_byte_counts` gives, for pieces of an encoded text, the UTF-8 bytes of the original text each
stands for (operators 0), and `token_byte_counts` the same per token of a SentencePiece tokenization:
what a validation byte sidecar holds.
"""

from __future__ import annotations

from typing import Iterable, Iterator

NAME = "lossless_caps_caseops"
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
UPPER, LOWER, OTHER = 1, -1, 0
_KIND: dict[str, int] = {}


def char_kind(c: str) -> int:
    """UPPER / LOWER for a cased letter (its case maps one-to-one), OTHER for every other character."""
    lo, up = c.lower(), c.upper()
    if len(lo) == 1 and lo != c and lo.upper() == c:
        return UPPER
    if len(up) == 1 and up != c and up.lower() == c:
        return LOWER
    return OTHER


def _kind(c: str) -> int:
    k = _KIND.get(c)
    if k is None:
        k = _KIND[c] = char_kind(c)
    return k


def encode(text: str) -> str:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if not _kind(c):
            out.append(ESC + c if c in OPERATORS else c)
            i += 1
            continue
        j = i + 1
        while j < n and _kind(text[j]):
            j += 1
        word = text[i:j]
        kinds = [_kind(ch) for ch in word]
        low = "".join(ch.lower() if k == UPPER else ch for ch, k in zip(word, kinds))
        if UPPER not in kinds:
            out.append(word)
        elif len(word) > 1 and LOWER not in kinds:
            out += [ALLCAPS, low]
        elif kinds[0] == UPPER and UPPER not in kinds[1:]:
            out += [TITLE, low]
        else:
            out.append(TITLE + low[0] if kinds[0] == UPPER else low[0])
            out += [CAPNEXT + ch if k == UPPER else ch for ch, k in zip(low[1:], kinds[1:])]
        i = j
    return "".join(out)


def _original_chars(encoded: str) -> Iterator[str]:
    """For each character of `encoded`, the original text it stands for ('' for an operator).
    Raises ValueError on a sequence `encode` never writes."""
    pending = None            # TITLE / ALLCAPS / CAPNEXT waiting for its letter
    in_word = allcaps = escaped = False
    for pos, c in enumerate(encoded):
        if escaped:
            if c not in OPERATORS:
                raise ValueError(f"ESC before {c!r} (not an operator) at position {pos}")
            escaped = in_word = allcaps = False
            yield c
        elif c == ESC or c == TITLE or c == ALLCAPS or c == CAPNEXT:
            if pending or (in_word and c in (TITLE, ALLCAPS)):
                raise ValueError(f"misplaced case operator U+{ord(c):04X} at position {pos}")
            escaped, pending = c == ESC, None if c == ESC else c
            yield ""
        elif _kind(c) == LOWER:
            if not in_word:
                in_word, allcaps = True, pending == ALLCAPS
            yield c.upper() if allcaps or pending else c
            pending = None
        else:
            if pending:
                raise ValueError(f"case operator not followed by a letter at position {pos}")
            in_word = allcaps = False
            yield c
    if pending or escaped:
        raise ValueError("the text ends in an unfinished case operator")


def decode(encoded: str) -> str:
    return "".join(_original_chars(encoded))


def original_byte_counts(pieces: Iterable[str]) -> list[int]:
    """UTF-8 bytes of original text per piece, where the pieces concatenate to an encoded text
    (e.g. a tokenizer's surfaces of it): operators count 0, and the sum is len(decode(...).encode())."""
    pieces = list(pieces)
    chars = _original_chars("".join(pieces))
    counts = [sum(len(next(chars).encode("utf-8")) for _ in piece) for piece in pieces]
    next(chars, None)          # runs the end-of-text check
    return counts


def token_byte_counts(sp, encoded: str) -> tuple[list[int], list[int]]:
    """Token ids of `encoded` under SentencePiece model `sp`, and per token the UTF-8 bytes of the original
    text it stands for: the bytes of the characters its offsets cover (a case operator 0, a literal operator
    after ESC its own 3). Characters no token covers (whitespace the normalizer strips at the ends) count
    for the nearest token that covers original bytes, so the counts sum to the original's UTF-8 length."""
    got = sp.encode_as_offset_mapping(encoded)
    per_char = [len(o.encode("utf-8")) for o in _original_chars(encoded)]
    counts, pending, done = [], 0, 0
    for begin, end in got["offsets"]:
        pending += sum(per_char[done:begin])
        counts.append(sum(per_char[max(begin, done):end]))
        done = max(done, end)
        if counts[-1] and pending:
            counts[-1], pending = counts[-1] + pending, 0
    pending += sum(per_char[done:])
    if counts:
        counts[max((k for k, n in enumerate(counts) if n), default=len(counts) - 1)] += pending
    return list(got["ids"]), counts
