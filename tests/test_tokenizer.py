"""The tiny tokenizer: deterministic, special tokens registered, digits and pointing text round-trip."""

import pytest

from mmsmall.config import TokenizerConfig
from mmsmall.processing.tokenizer import IMAGE_SPECIAL_TOKENS, build_tokenizer, special_ids


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig())


def test_deterministic_and_sized(tok):
    again = build_tokenizer(TokenizerConfig())
    assert again.get_vocab() == tok.get_vocab()
    assert len(tok) == TokenizerConfig().tiny_vocab_size


def test_special_tokens(tok):
    ids = special_ids(tok)
    assert tok.bos_token and tok.eos_token and tok.pad_token
    assert len({ids["bos"], ids["eos"], ids["pad"]}) == 3
    for t in IMAGE_SPECIAL_TOKENS:
        assert t in tok.all_special_tokens
        assert tok.convert_ids_to_tokens(ids[t]) == t
        # one token when it comes from our own layout code ...
        assert tok(t, add_special_tokens=False)["input_ids"] == [ids[t]]
        # ... and never a special token when it comes from user text
        split = tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert not set(split) & set(ids.values())
        assert tok.decode(split) == t


@pytest.mark.parametrize(
    "text",
    [
        " User: What is 1234567890 + 3.14? Assistant: 1234570000.14",
        ' User: Point to the mug. Assistant: <point x="12.3" y="45.6" alt="mug">mug</point>',
        ' <points x1="1.0" y1="99.9" x2="50.5" y2="0.0" alt="a &quot;b&quot;">a "b"</points>',
        " There are none.",
        " Unicode: café ☕ 日本語 emoji 🙂 tab\tnewline\n",
    ],
)
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok):
    toks = tok.tokenize("x=2024 y=99.5")
    digit_tokens = [t for t in toks if any(c.isdigit() for c in t)]
    assert digit_tokens and all(len(t.lstrip("Ġ")) == 1 for t in digit_tokens)


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = build_tokenizer(TokenizerConfig(name=str(tmp_path)))
    assert loaded.get_vocab() == tok.get_vocab()
    assert special_ids(loaded) == special_ids(tok)
    assert loaded.bos_token == tok.bos_token


def test_too_small_vocab_says_what_to_do():
    with pytest.raises(ValueError, match="tiny_vocab_size"):
        build_tokenizer(TokenizerConfig(tiny_vocab_size=100))


def test_loaded_tokenizer_gets_image_tokens_and_defaults(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(["hello world"] * 3, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(tmp_path)

    tok = build_tokenizer(TokenizerConfig(name=None), llm_name=str(tmp_path))
    ids = special_ids(tok)
    assert tok.pad_token == tok.eos_token == tok.bos_token == "<|endoftext|>"
    for t in IMAGE_SPECIAL_TOKENS:
        assert tok(t, add_special_tokens=False)["input_ids"] == [ids[t]]
        assert ids[t] not in tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_missing_tokenizer_says_what_to_do(tmp_path):
    with pytest.raises(OSError, match="tiny test tokenizer"):
        build_tokenizer(TokenizerConfig(name=str(tmp_path / "nope")))
