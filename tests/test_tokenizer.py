"""Tokenizer parity with the pure-Python BPE oracle, known ids, errors, decode."""
import pytest
import torch

from fastclip.tokenizer import EOT_ID, SOT_ID, SimpleTokenizer, clean_text, decode, get_tokenizer, tokenize

CORPUS = [
    "a diagram", "a dog", "a cat", "A Photo Of A DOG.", "", "   ", "hello world",
    "Tom &amp; Jerry &quot;quoted&quot; &amp;amp; double-escaped &lt;b&gt;",
    "it's, we're, they've, I'm, you'll, he'd, don't, IT'S",
    "numbers 0 1 23 456 7890 3.14159 1,000,000 ½ ² ٣",
    "emoji 😀🐶🐱 👍🏽 family 👨‍👩‍👧", "中文 日本語のテキスト 한국어 문장",
    "“curly quotes” ‘single’ — em dash – en dash … ellipsis",
    "whitespace\t\truns\n\nnew lines   and   spaces", "café naïve résumé Ångström ß ﬁ",
    "mojibake: cafÃ© â€œhelloâ€\x9d", "<|startoftext|>special<|endoftext|> inside",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaa", "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "http://example.com/path?q=1&x=2 #hashtag @user", "C++ and C# and F# -- x^2 + y^2 = z^2 !!!???",
    "Ελληνικά русский текст עברית العربية हिन्दी",
    "mixed123numbers456and789letters", "tabs\u00a0non-breaking\u2003em-space\u200bzero-width",
]


@pytest.fixture(scope="module")
def oracle():
    return SimpleTokenizer()


def _expected(oracle, text, ctx=77, truncate=False):
    ids = [SOT_ID] + oracle.encode(text) + [EOT_ID]
    if len(ids) > ctx:
        assert truncate
        ids = ids[:ctx]
        ids[-1] = EOT_ID
    return ids + [0] * (ctx - len(ids))


def test_known_ids():
    out = tokenize(["a diagram", "a dog", "a cat"])
    assert out.shape == (3, 77) and out.dtype == torch.long
    assert out[0, :5].tolist() == [49406, 320, 22697, 49407, 0]
    assert out[1, :4].tolist() == [49406, 320, 1929, 49407]
    assert out[2, :4].tolist() == [49406, 320, 2368, 49407]
    assert (out[:, 4:] == 0).all()
    assert get_tokenizer().get_vocab_size() == 49408


def test_parity_with_oracle(oracle):
    got = tokenize(CORPUS, truncate=True)
    for i, text in enumerate(CORPUS):
        assert got[i].tolist() == _expected(oracle, text, truncate=True), (i, text)


def test_parity_on_vocabulary_words(oracle):
    import random

    from fastclip.tokenizer import _vocab
    words = [t[:-4] for t in _vocab()[0][512:-2] if t.endswith("</w>")]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    got = tokenize(texts, truncate=True)
    for i, t in enumerate(texts):
        assert got[i].tolist() == _expected(oracle, t, truncate=True), t


def test_too_long_and_truncate(oracle):
    long = "word " * 100
    with pytest.raises(ValueError, match=r"texts\[1\] is too long: 102 tokens"):
        tokenize(["ok", long])
    out = tokenize(["ok", long], truncate=True)
    assert out[1, -1].item() == EOT_ID and out[1, 0].item() == SOT_ID and (out[1] != 0).all()
    assert out[1].tolist() == _expected(oracle, long, truncate=True)
    exact = "word " * 75  # 75 + sot + eot = 77 fits exactly
    assert tokenize(exact)[0, -1].item() == EOT_ID
    small = tokenize("a photo of a dog", context_length=5, truncate=True)
    assert small.tolist() == [[49406, 320, 1125, 539, 49407]]
    # Any truthy value cut the texts (truncate="no" truncated): a bool is asked for.
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="truncate must be a bool"):
            tokenize(["ok", long], truncate=bad)


def test_input_forms_and_errors():
    assert tokenize("a dog").shape == (1, 77)
    assert tokenize([]).shape == (0, 77)
    assert tokenize([], context_length=16).shape == (0, 16)
    assert tokenize(("a", "b"), context_length=8).shape == (2, 8)
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a", context_length=1)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        tokenize(["a", 3])


def test_non_text_inputs_raise_type_error():
    with pytest.raises(TypeError, match="texts must be a str or a sequence of str, got int"):
        tokenize(123)
    with pytest.raises(TypeError, match="got bytes.*decode"):
        tokenize(b"abc")
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str, got bytes"):
        tokenize([b"abc"])
    with pytest.raises(TypeError, match="got NoneType"):
        tokenize(None)


def test_cleaning():
    assert clean_text("  Tom &amp;amp;  Jerry\n ") == "tom & jerry"
    assert tokenize("A   DOG")[0].tolist() == tokenize("a dog")[0].tolist()


def test_decode_round_trip():
    texts = ["a photo of a dog.", "it's 2024, café & 日本語 😀", "hello world"]
    ids = tokenize(texts)
    assert decode(ids) == ["a photo of a dog .", "it 's 2 0 2 4 , café & 日本語 😀", "hello world"]
    for row in ids:
        assert tokenize(decode(row))[0].tolist() == row.tolist()
    assert decode([SOT_ID, 320, 1929, EOT_ID, 0, 0]) == "a dog"
    assert decode([320, 1929]) == "a dog"
    with pytest.raises(ValueError, match="out of range"):
        decode([320, 50000])


def test_parity_on_the_character_the_engines_read_apart(oracle):
    # U+0345: OpenAI's pattern under Python's regex (IGNORECASE) matches nothing on it, so it
    # splits words and vanishes; the Rust engine read it as a letter until clean_text mapped it.
    for text in ("a\u0345b", "\u0345", "cat\u0345 dog", "\u1f00\u0345x"):
        ids = tokenize(text)[0]
        n = int((ids == EOT_ID).nonzero()[0])
        assert ids[1:n].tolist() == oracle.encode(text), text


def test_parity_on_code_points_newer_than_pythons_unicode(oracle):
    # Letters of a newer Unicode than the interpreter's tables (U+10940 is Unicode 17): the
    # regex module may read them as letters where the Rust engine reads punctuation. The
    # fast path hands every text holding a code point unicodedata does not know to the
    # pure-Python BPE, which is the oracle itself.
    import unicodedata
    newer = [c for c in ("\U00010940", "\u088f", "\ua7ce", "\U00011db0", "\u0378")
             if unicodedata.category(c) == "Cn"]
    if not newer:
        pytest.skip(f"this interpreter's Unicode ({unicodedata.unidata_version}) has them all")
    for c in newer:
        for text in (f"a{c}b", c, f"cat {c}s dog", f"'{c}e", f"1{c}"):
            row = tokenize(text)[0]
            assert row.tolist() == _expected(oracle, text), ascii(text)


def test_too_long_error_is_a_value_and_a_runtime_error():
    # OpenAI's clip.tokenize raises RuntimeError; code catching either works.
    from fastclip.tokenizer import TextTooLongError
    for exc in (TextTooLongError, ValueError, RuntimeError):
        with pytest.raises(exc, match=r"texts\[0\] is too long"):
            tokenize("word " * 80)


def test_numpy_integers_and_decode_input_forms():
    import numpy as np
    t = tokenize(["a cat", "two dogs"], context_length=np.int64(12))
    assert t.shape == (2, 12)
    want = ["a cat", "two dogs"]
    assert decode(t) == decode(t.numpy()) == decode(list(t)) == decode(t.tolist()) == want
    assert decode([np.int64(i) for i in t[0]]) == "a cat"
    for bad, exc, msg in ((torch.tensor(5), ValueError, "1-D .* or 2-D"),
                          (torch.zeros(2, 2, 2, dtype=torch.long), ValueError, r"shape \(2, 2, 2\)"),
                          (torch.zeros(3), TypeError, "integer token ids"),
                          ("abc", TypeError, "got str"),
                          ([SOT_ID, 1.7, EOT_ID], TypeError, r"ids\[1\] must be an int token id"),
                          ([True, False], TypeError, r"ids\[0\] .* got True")):
        with pytest.raises(exc, match=msg):
            decode(bad)


def test_special_token_strings_and_long_s_follow_openai():
    """Texts the Rust pre-tokenizer would split otherwise take the pure-Python BPE: the special
    tokens' strings after punctuation (OpenAI's regex takes ",<|" as one punctuation run) and
    U+017F, which IGNORECASE folds into the contraction "'s"."""
    oracle = SimpleTokenizer()
    for text in ["hello,<|endoftext|> world", "it'ſ", "<|startoftext|>a", "a <|endoftext|> b",
                 "x <|start", "ſtraße's ſ", "((<|endoftext|>))"]:
        row = tokenize(text)[0]
        ids = row[: int((row != 0).sum())].tolist()
        assert ids == [49406, *oracle.encode(text), 49407], text
    assert tokenize("hello,<|endoftext|> world")[0, 2].item() != 49407   # not cut at the ","


def test_decode_of_an_empty_batch_is_an_empty_list():
    import numpy as np
    assert decode(tokenize([])) == []
    assert decode(np.zeros((0, 77), dtype=np.int64)) == []


def test_unordered_collections_are_refused():
    """A set was tokenized in string-hash order (different in every process), a dict as its keys."""
    for bad in ({"a cat", "a dog"}, {"a cat": 1}, frozenset({"x"})):
        with pytest.raises(TypeError, match="its order is not the rows'; pass a list"):
            tokenize(bad)


def test_the_python_path_stops_where_truncation_would_cut(monkeypatch):
    """A caption with "<|" goes through the pure-Python BPE: with truncate=True it encodes only
    what the row keeps (a 5000-word caption was encoded whole first)."""
    from fastclip import tokenizer as T
    text = "<| " + " ".join(f"word{k}" for k in range(5000))
    full = SimpleTokenizer().encode(text)
    calls = []
    real = T.SimpleTokenizer.bpe
    monkeypatch.setattr(T.SimpleTokenizer, "bpe", lambda self, tok: calls.append(tok) or real(self, tok))
    ids = tokenize([text], context_length=16, truncate=True)[0]
    assert len(calls) <= 16
    assert ids[1:15].tolist() == full[:14] and ids[15].item() == EOT_ID


def test_heap_bpe_makes_the_loops_merges():
    """Words longer than 64 symbols take the heap (the loop is quadratic: a 20000-character
    word that reached the Python tokenizer took 11.7 s); both must give the same symbols, on
    words full of repeated and overlapping pairs."""
    import random
    t = SimpleTokenizer()
    rng = random.Random(int(torch.randint(0, 2**31, (1,))))
    alphabets = ["ab", "aeiou", "abcdefghijklmnopqrstuvwxyz", "thesaid", "01", "ſab", "ééa"]
    for _ in range(400):
        al = rng.choice(alphabets)
        word = "".join(rng.choice(al) for _ in range(rng.randint(1, 300)))
        word = "".join(t.byte_encoder[b] for b in word.encode("utf-8"))
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        assert t._bpe_heap(list(parts)) == t._bpe_loop(list(parts)), word
