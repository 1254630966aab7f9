"""Tokenizers: a real one by name, or a tiny byte-level BPE trained in milliseconds for tests.

Either way the image special tokens are registered as *special* tokens, so that they only ever
come from :mod:`mmsmall.processing.tokens` (never from user text, which is encoded with special
token splitting on), and ``bos_token``, ``eos_token`` and ``pad_token`` are set.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmsmall.config import TokenizerConfig

# Molmo2's image/video tokens, in the order transformers' Molmo2Processor looks them up.
IMAGE_SPECIAL_TOKENS: tuple[str, ...] = (
    "<im_patch>",
    "<im_col>",
    "<im_start>",
    "<low_res_im_start>",
    "<im_end>",
    "<frame_start>",
    "<frame_end>",
    "<im_low>",
    "<|image|>",
    "<|video|>",
)

# Special tokens of the tiny tokenizer (a loaded tokenizer keeps its own where it has them).
TINY_BOS = "<|bos|>"
TINY_EOS = "<|endoftext|>"
TINY_PAD = "<|pad|>"

_COLOURS = "red green blue yellow orange purple black white gray brown pink cyan magenta"
_SHAPES = "circle square triangle star rectangle diamond hexagon ellipse line dot cross"
_CHART = (
    "chart bar line pie axis title legend value values label labels year month total sum "
    "average mean median maximum minimum highest lowest percent percentage increase decrease "
    "difference ratio sales revenue price count number table row column document page date "
    "clock time hour minute o'clock caption image picture photo shows scene object objects"
)
_WORDS = (
    "What is the How many are there in of a an and or to on at by for with which Where Point "
    "point Count count Describe describe this that these those it its color colour shape "
    "left right top bottom middle center above below next yes no Yes No None none answer "
    "Answer question short long one two three four five six seven eight nine ten"
)
_STYLES = "chart_qa doc_qa pointing counting caption vqa clock long_caption short_answer"


def _tiny_corpus() -> list[str]:
    """A small deterministic corpus covering the chat format, numbers and pointing tags."""
    lines: list[str] = []
    words = f"{_COLOURS} {_SHAPES} {_CHART} {_WORDS}".split()
    for i, w in enumerate(words):
        q = f" User: What is the {w}? Assistant: The {w} is {i * 7 % 100}."
        lines += [q, q.lower(), f" {w} {w.capitalize()} {w.upper()}"]
    for style in _STYLES.split():
        lines.append(f" User: {style}: How many {words[len(style) % len(words)]} are there? Assistant: 3")
    for i in range(60):
        x, y = (i * 37) % 1000 / 10, (i * 53) % 1000 / 10
        noun = words[i % len(words)]
        lines.append(
            f' User: Point to the {noun}. Assistant: <point x="{x:.1f}" y="{y:.1f}" alt="{noun}">{noun}</point>'
        )
        lines.append(
            f' <points x1="{x:.1f}" y1="{y:.1f}" x2="{y:.1f}" y2="{x:.1f}" alt="{noun}">{noun}</points>'
        )
    lines += [" There are none.", " Assistant: There are none."] * 10
    lines.append(" 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -2.5 50% $12.99 1/2 2024-01-31 12:30")
    lines.append(" . , ; : ! ? ' \" ( ) [ ] { } < > / \\ - _ + = * & % $ # @ ~ ` ^ |")
    return lines


def _train_tiny(vocab_size: int) -> PreTrainedTokenizerFast:
    specials = [TINY_BOS, TINY_EOS, TINY_PAD, *IMAGE_SPECIAL_TOKENS]
    n_base = 256 + len(specials)
    if vocab_size < n_base:
        raise ValueError(
            f"model.tokenizer.tiny_vocab_size={vocab_size} is too small: the byte-level alphabet and "
            f"special tokens alone need {n_base}; use at least {n_base} (384 is the default)"
        )
    tok = Tokenizer(models.BPE())
    # Digits are split one by one before the byte-level step, so numbers never merge.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=TINY_BOS,
        eos_token=TINY_EOS,
        pad_token=TINY_PAD,
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
        model_max_length=1_000_000,
    )
    # Register every image token as special (skipped by decode(skip_special_tokens=True)).
    fast.add_special_tokens(
        {"extra_special_tokens": list(IMAGE_SPECIAL_TOKENS)}, replace_extra_special_tokens=False
    )
    return fast


def build_tokenizer(cfg: TokenizerConfig, llm_name: str | None = None) -> PreTrainedTokenizerFast:
    """Load ``cfg.name`` (else ``llm_name``), or train the tiny BPE when neither is given.

    The image special tokens are added as special tokens; a missing ``pad_token`` becomes
    ``eos_token``, and a missing ``bos_token`` becomes ``eos_token`` too (what Molmo2's
    processor prepends when a tokenizer has no BOS).
    """
    name = cfg.name or llm_name
    if name is None:
        return _train_tiny(cfg.tiny_vocab_size)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise OSError(
            f"could not load tokenizer {name!r} (model.tokenizer.name / model.llm.name): {e}. "
            "Give a local path, or set HF_HUB_OFFLINE=0 with network access; "
            "set model.tokenizer.name=null and model.llm.name=null for the tiny test tokenizer."
        ) from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TypeError(f"tokenizer {name!r} has no fast (Rust) version; mmsmall needs one")
    missing = [t for t in IMAGE_SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {name!r} has no eos_token; set one in its tokenizer_config.json")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    return tok


def special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids of the image special tokens and of bos/eos/pad, keyed by token string.

    Also keyed ``"bos"``, ``"eos"`` and ``"pad"`` for convenience.
    """
    vocab = tokenizer.get_vocab()
    out: dict[str, int] = {}
    for t in IMAGE_SPECIAL_TOKENS:
        if t not in vocab:
            raise KeyError(f"tokenizer lacks the image token {t!r}; build it with build_tokenizer()")
        out[t] = vocab[t]
    for role in ("bos", "eos", "pad"):
        token = getattr(tokenizer, f"{role}_token")
        if token is None:
            raise KeyError(f"tokenizer has no {role}_token; build it with build_tokenizer()")
        out[token] = tokenizer.convert_tokens_to_ids(token)
        out[role] = out[token]
    return out
