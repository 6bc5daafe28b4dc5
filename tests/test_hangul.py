"""Tests for domainlm.korean.hangul: arithmetic jamo decomposition, normalization, shingles."""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from domainlm.korean.hangul import (
    code_points,
    decompose,
    decompose_syllable,
    jamo_code_points,
    jamo_ngrams,
    normalize_text,
    pack_jamo_ngrams,
    shingle_ids,
    shingle_strings,
    to_hash32,
    unique_sorted,
    word_ngram_ids,
    word_ngrams,
)

KOREAN = (
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. "
    "대한민국의 국민이 되는 요건은 법률로 정한다."
)
MIXED = "LibreOffice Calc에서 셀 서식을 지정하려면 서식 - 셀 메뉴를 선택하십시오. Press Ctrl+1 to open it."


def test_decompose_hangul_into_conjoining_jamo():
    assert decompose("한글") == "\u1112\u1161\u11ab\u1100\u1173\u11af"  # ᄒ ᅡ ᆫ ᄀ ᅳ ᆯ
    assert decompose_syllable("가") == "\u1100\u1161"  # no final consonant: two jamo
    assert decompose_syllable("힣") == "\u1112\u1175\u11c2"  # the last syllable, U+D7A3
    assert decompose_syllable("A") == "A"
    with pytest.raises(ValueError, match="one character"):
        decompose_syllable("가나")


def test_vectorised_decomposition_matches_unicode_nfd_on_every_syllable():
    syllables = "".join(chr(c) for c in range(0xAC00, 0xD7A4))
    assert len(syllables) == 11172
    assert decompose(syllables) == unicodedata.normalize("NFD", syllables)
    assert "".join(decompose_syllable(ch) for ch in syllables[::97]) == decompose(syllables[::97])


def test_other_characters_pass_through_unchanged():
    text = "Hello, мир! 日本語 ㄱㄴ \u1100 🙂 \x00 x"  # Latin, Cyrillic, CJK, compatibility jamo, emoji, NUL
    assert decompose(text) == text
    assert jamo_code_points(text).tolist() == [ord(c) for c in text]
    assert decompose("A한b") == "A\u1112\u1161\u11abb"


def test_non_korean_text_gives_character_trigrams():
    grams = jamo_ngrams("the cat sat")
    assert grams[:3] == ["the", "he ", "e c"]
    assert len(grams) == len("the cat sat") - 2
    assert len(shingle_ids("Быстрая коричневая лиса прыгает через ленивую собаку")) > 40


def test_normalize_text_is_nfc_with_collapsed_whitespace():
    nfd = unicodedata.normalize("NFD", "한글  \t 문서\n\n끝 ")
    assert normalize_text(nfd) == "한글 문서 끝"
    assert normalize_text("a\u00a0\u3000b") == "a b"  # no-break and ideographic spaces are whitespace
    with pytest.raises(TypeError, match="str"):
        normalize_text(None)  # type: ignore[arg-type]


def test_jamo_trigrams_of_hangul_are_over_jamo_not_syllables():
    assert jamo_ngrams("한글") == [
        "\u1112\u1161\u11ab",
        "\u1161\u11ab\u1100",
        "\u11ab\u1100\u1173",
        "\u1100\u1173\u11af",
    ]
    # one vowel apart: no syllable trigram in common, but 4 of 6 jamo trigrams shared
    shared = set(jamo_ngrams("학교에")) & set(jamo_ngrams("학교의"))
    assert shared == {"\u1112\u1161\u11a8", "\u1161\u11a8\u1100", "\u11a8\u1100\u116d", "\u1100\u116d\u110b"}


def test_fewer_than_five_words_give_one_word_shingle():
    assert word_ngrams("하나 둘 셋") == ["하나 둘 셋"]
    assert len(word_ngram_ids(code_points("하나 둘 셋"))) == 1
    assert word_ngrams("a b c d e f") == ["a b c d e", "b c d e f"]
    assert len(word_ngram_ids(code_points("a b c d e f"))) == 2
    assert word_ngrams("") == [] and len(word_ngram_ids(code_points(""))) == 0


def test_word_ngram_ids_depend_on_the_words_not_their_position():
    ids = word_ngram_ids(code_points("x a b c d e y a b c d e"))
    by_gram = dict(zip(word_ngrams("x a b c d e y a b c d e"), ids.tolist()))
    assert len(by_gram) == len(set(by_gram.values()))  # distinct n-grams, distinct ids
    assert ids[1] == ids[7]  # "a b c d e" at offsets 2 and 14
    assert word_ngram_ids(code_points("a b c d e"))[0] == ids[1]
    assert (ids >= np.uint64(1 << 63)).all()  # word ids carry the top bit, jamo ids never do


@pytest.mark.parametrize(
    "text", [KOREAN, MIXED, "짧은 글", "ab", "한", "one two three four five six seven", KOREAN + " " + KOREAN]
)
def test_integer_shingles_are_the_same_set_as_string_shingles(text):
    ids = shingle_ids(text)
    assert ids.dtype == np.uint64
    assert np.all(np.diff(ids.astype(np.float64)) >= 0) and len(np.unique(ids)) == len(ids)
    strings = shingle_strings(text)
    assert len(ids) == len(strings)
    assert (ids >= np.uint64(1 << 63)).sum() == sum(kind == "word" for kind, _ in strings)


def test_jaccard_from_ids_equals_jaccard_from_strings():
    a, b = KOREAN, KOREAN.replace("법률로", "헌법으로").replace("국민에게", "국민들에게")
    sa, sb = shingle_strings(a), shingle_strings(b)
    ia, ib = shingle_ids(a), shingle_ids(b)
    expected = len(sa & sb) / len(sa | sb)
    inter = len(np.intersect1d(ia, ib, assume_unique=True))
    assert inter / (len(ia) + len(ib) - inter) == pytest.approx(expected)
    assert 0.3 < expected < 1.0


def test_pack_jamo_ngrams_is_exact_and_bounded():
    cps = jamo_code_points("한글 abc")
    packed = pack_jamo_ngrams(cps, 3)
    assert len(packed) == len(cps) - 2
    assert packed[0] == (0x1112 << 42) | (0x1161 << 21) | 0x11AB
    assert (packed < np.uint64(1 << 63)).all()
    assert pack_jamo_ngrams(code_points("ab"), 3).tolist() == [(ord("a") << 21) | ord("b")]
    with pytest.raises(ValueError, match="1..3"):
        pack_jamo_ngrams(cps, 4)


def test_unique_sorted_and_hash32():
    values = np.array([5, 3, 5, 1, 3], dtype=np.uint64)
    assert unique_sorted(values).tolist() == [1, 3, 5]
    assert unique_sorted(values[:0]).tolist() == []
    h = to_hash32(shingle_ids(KOREAN))
    assert h.dtype == np.uint32 and len(np.unique(h)) == len(h)  # no 32-bit collision on one document


def test_shingles_are_identical_across_processes_and_hash_seeds():
    code = (
        "import sys; from domainlm.korean.hangul import shingle_ids; "
        "sys.stdout.write(shingle_ids(sys.argv[1]).tobytes().hex())"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, MIXED],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        outputs.add(out.stdout)
    assert outputs == {shingle_ids(MIXED).tobytes().hex()}


def test_many_texts_at_once_give_each_texts_own_shingles():
    from domainlm.korean.hangul import raw_shingle_ids, raw_shingle_ids_many, shingle_hashes_many

    texts = [
        normalize_text(t)
        for t in (KOREAN, MIXED, "가", "가 나", "a", "ab", "a b c d e f g", "힣힣", "x y", KOREAN + " " + MIXED, "")
    ]
    ids, bounds = raw_shingle_ids_many(texts)
    assert bounds.shape == (len(texts) + 1,) and ids.dtype == np.uint64
    for d, text in enumerate(texts):
        assert np.array_equal(ids[bounds[d] : bounds[d + 1]], raw_shingle_ids(text)), text
    hashes, hb = shingle_hashes_many(texts)
    for d, text in enumerate(texts):
        assert np.array_equal(hashes[hb[d] : hb[d + 1]], unique_sorted(to_hash32(raw_shingle_ids(text)))), text
    assert raw_shingle_ids_many([])[0].size == 0
