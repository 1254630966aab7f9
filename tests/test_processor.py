"""Processor: layout equal to stock Molmo2Processor, labels, special tokens, conversations, collate."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.molmo2.processing_molmo2 import Molmo2Processor
from transformers.models.molmo2.video_processing_molmo2 import Molmo2VideoProcessor

from mmsmall.config import ImageConfig, TokenizerConfig
from mmsmall.export.molmo2 import molmo2_image_processor
from mmsmall.processing.batch import IGNORE_INDEX as IGNORE
from mmsmall.processing.processor import Processor, collate
from mmsmall.processing.tokenizer import IMAGE_SPECIAL_TOKENS, build_tokenizer, special_ids
from mmsmall.processing.tokens import image_token_ids, image_token_string, user_text

TINY = dict(crop_size=112, patch_size=14, max_crops=4, max_crops_eval=4, overlap_margins=[1, 1])


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig())


@pytest.fixture(scope="module")
def proc(tok):
    return Processor(tok, ImageConfig(**TINY))


def _image(h=60, w=90, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _conv(q, a=None):
    msgs = [{"role": "user", "content": q}]
    if a is not None:
        msgs.append({"role": "assistant", "content": a})
    return msgs


@pytest.mark.parametrize("size", [(60, 90), (5, 7), (20, 700), (400, 300)])
def test_prompt_equals_stock_molmo2_processor(tok, proc, size):
    stock_ip = molmo2_image_processor(ImageConfig(crop_size=112, max_crops_eval=4, overlap_margins=[1, 1]))
    stock = Molmo2Processor(image_processor=stock_ip, video_processor=Molmo2VideoProcessor(), tokenizer=tok)
    im = _image(*size)
    ref = stock(images=[im], text="<|image|>" + user_text("What is it?"), return_tensors="pt")
    ours = proc.encode_prompt(im, "What is it?")
    assert ours["input_ids"].tolist() == ref["input_ids"][0].tolist()
    assert torch.equal(ours["image_token_pooling"], ref["image_token_pooling"].long())
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-5
    string = stock.replace_image_token({"image_grids": ref["image_grids"]}, 0)
    assert image_token_string(ours["image_grids"]) == string
    ids = special_ids(tok)
    assert (
        image_token_ids(ours["image_grids"], ids).tolist()
        == tok(string, add_special_tokens=False)["input_ids"]
    )


def test_labels_only_answers_and_eos(tok, proc):
    ex = proc.encode(
        _image(),
        [
            _conv("What colour is the mug?", "Red."),
        ],
    )
    ids, labels = ex["input_ids"], ex["labels"]
    target = labels != IGNORE
    assert tok.decode(ids[target]) == " Red." + tok.eos_token
    assert ids[-1].item() == tok.eos_token_id and labels[-1].item() == tok.eos_token_id
    assert torch.equal(labels[target], ids[target])
    assert ids[0].item() == tok.bos_token_id and labels[0].item() == IGNORE
    # nothing in the image block or the question is trained
    n_prefix = int((ex["conv_ids"] == 0).sum())
    assert (labels[:n_prefix] == IGNORE).all()


def test_multi_turn_trains_every_answer(tok, proc):
    conv = [*_conv("Q1?", "A1"), *_conv("Q2?", "A2")]
    ex = proc.encode(None, [conv])
    targets = ex["input_ids"][ex["labels"] != IGNORE]
    assert tok.decode(targets) == f" A1{tok.eos_token} A2{tok.eos_token}"
    assert "pixel_values" not in ex and ex["input_ids"][0].item() == tok.bos_token_id


def test_special_token_strings_in_text_stay_text(tok, proc):
    ids = special_ids(tok)
    evil = "".join(IMAGE_SPECIAL_TOKENS) + tok.eos_token + tok.bos_token + tok.pad_token
    ex = proc.encode(_image(), [_conv(f"look {evil}", f"ok {evil}")])
    clean = proc.encode(_image(), [_conv("look", "ok")])
    special = torch.tensor(sorted(set(ids.values())))
    n_special = torch.isin(ex["input_ids"], special).sum()
    assert n_special == torch.isin(clean["input_ids"], special).sum()  # same image block, BOS, EOS
    assert (ex["input_ids"] == ids["<im_patch>"]).sum() == ex["image_token_pooling"].shape[0]
    assert evil in tok.decode(ex["input_ids"])  # the text survives as text


def test_several_conversations_share_the_image_prefix(tok, proc):
    ex = proc.encode(_image(), [_conv("Q one?", "A one"), _conv("Q2?", "A2"), _conv("Third?", "3")])
    conv, pos = ex["conv_ids"], ex["position_ids"]
    n_prefix = int((conv == 0).sum())
    assert n_prefix == 1 + image_token_ids(ex["image_grids"], special_ids(tok)).numel()
    assert torch.equal(pos[:n_prefix], torch.arange(n_prefix))
    assert conv.tolist() == sorted(conv.tolist())  # 0, then 1..., then 2..., then 3...
    for k in (1, 2, 3):
        sel = conv == k
        assert sel.any()
        assert torch.equal(pos[sel], n_prefix + torch.arange(int(sel.sum())))  # positions restart
        last = sel.nonzero()[-1].item()
        assert ex["input_ids"][last].item() == tok.eos_token_id
    targets = ex["input_ids"][ex["labels"] != IGNORE]
    assert tok.decode(targets).count(tok.eos_token) == 3


def test_style_prefix(tok):
    p = Processor(tok, ImageConfig(**TINY), style_prefix=True)
    ex = p.encode_prompt(None, "What is the total?", task="chart_qa")
    assert tok.decode(ex["input_ids"]).endswith(" User: chart_qa: What is the total? Assistant:")
    plain = Processor(tok, ImageConfig(**TINY)).encode_prompt(None, "What is the total?", task="chart_qa")
    assert "chart_qa" not in tok.decode(plain["input_ids"])


def test_truncation_drops_whole_conversations_never_image_tokens(tok):
    base = Processor(tok, ImageConfig(**TINY))
    convs = [_conv("Q one?", "A one"), _conv("Q two?", "A two"), _conv("Q three?", "A three")]
    full = base.encode(_image(), convs)
    first_two = int((full["conv_ids"] <= 2).sum())
    p = Processor(tok, ImageConfig(**TINY), max_length=first_two + 1)
    ex = p.encode(_image(), convs)
    assert ex["input_ids"].shape[0] == first_two and ex["conv_ids"].max() == 2
    assert p.counters["dropped_conversations"] == 1
    n_prefix = int((full["conv_ids"] == 0).sum())
    with pytest.raises(ValueError, match="image block is never cut"):
        Processor(tok, ImageConfig(**TINY), max_length=n_prefix + 2).encode(_image(), convs)


def test_bad_conversations_raise(proc):
    with pytest.raises(ValueError, match="role 'assistant' where 'user'"):
        proc.encode(None, [[{"role": "assistant", "content": "hi"}]], sample_id="s7")
    with pytest.raises(ValueError, match="s7.*no conversations"):
        proc.encode(None, [], sample_id="s7")
    with pytest.raises(ValueError, match="content must be a string"):
        proc.encode(None, [[{"role": "user", "content": None}]])


def test_collate_offsets_pooling_and_pads_right(tok, proc):
    a = proc.encode(_image(seed=1), [_conv("Q?", "A")], sample_id="a")
    b = proc.encode(None, [_conv("Longer question here?", "Longer answer")], sample_id="b")
    c = proc.encode(_image(300, 200, seed=2), [_conv("Q?", "A")], sample_id="c")
    batch = collate([a, b, c], tok.pad_token_id)
    B, T = batch["input_ids"].shape
    assert B == 3 and T == max(e["input_ids"].shape[0] for e in (a, b, c))
    for row, ex in enumerate((a, b, c)):
        L = ex["input_ids"].shape[0]
        assert torch.equal(batch["input_ids"][row, :L], ex["input_ids"])
        assert (batch["input_ids"][row, L:] == tok.pad_token_id).all()
        assert (batch["labels"][row, L:] == IGNORE).all()
        assert batch["attention_mask"][row].sum() == L and (batch["doc_ids"][row, L:] == -1).all()
        assert (batch["doc_ids"][row, :L] == 0).all()
    n_a = a["pixel_values"].shape[0] * a["pixel_values"].shape[1]
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"], c["pixel_values"]]))
    pool_c = batch["image_token_pooling"][a["image_token_pooling"].shape[0] :]
    assert torch.equal(pool_c, torch.where(c["image_token_pooling"] >= 0, c["image_token_pooling"] + n_a, -1))
    # every pooled index points at the right patch of the concatenated crops
    flat = batch["pixel_values"].reshape(-1, batch["pixel_values"].shape[-1])
    own = c["pixel_values"].reshape(-1, c["pixel_values"].shape[-1])
    valid = c["image_token_pooling"] >= 0
    assert torch.equal(flat[pool_c[valid]], own[c["image_token_pooling"][valid]])
    assert batch["image_grids"].shape == (2, 4) and batch["sample_ids"] == ["a", "b", "c"]


def test_collate_left_pad_for_generation(tok, proc):
    short = proc.encode_prompt(None, "Hi?")
    long = proc.encode_prompt(_image(), "A much longer question?")
    batch = collate([short, long], tok.pad_token_id, left_pad=True)
    L = short["input_ids"].shape[0]
    assert torch.equal(batch["input_ids"][0, -L:], short["input_ids"])
    assert (batch["input_ids"][0, :-L] == tok.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [0] * (batch["input_ids"].shape[1] - L) + [1] * L
    assert torch.equal(batch["position_ids"][0, -L:], short["position_ids"])
    assert batch["doc_ids"][0, 0].item() == -1
    text_only = collate([short], tok.pad_token_id, left_pad=True)
    assert text_only["pixel_values"] is None and text_only["image_token_pooling"] is None


def test_text_tokenization_matches_split_special_tokens_and_leaves_tokenizer_alone(tok, proc):
    import pickle

    texts = [
        " User: <im_patch> hi Assistant:",
        " 12.5<|endoftext|>",
        ' <point x="1.0" y="2.0" alt="a">a</point>',
    ]
    want = [tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] for t in texts]
    assert proc.tokenize_text(texts) == want
    assert tok("<im_patch>", add_special_tokens=False)["input_ids"] == [special_ids(tok)["<im_patch>"]]
    clone = pickle.loads(pickle.dumps(proc))  # dataloader workers get a pickled copy
    assert clone.tokenize_text(texts) == want


def test_answer_that_tokenizes_to_nothing_raises(tok, monkeypatch):
    p = Processor(tok, ImageConfig(**TINY))
    real = p.tokenize_text
    monkeypatch.setattr(
        p, "tokenize_text", lambda texts: [[] if t == " Red." else ids for t, ids in zip(texts, real(texts))]
    )
    with pytest.raises(ValueError, match="s9.*tokenized to nothing"):
        p.encode(None, [_conv("Colour?", "Red.")], sample_id="s9")


def test_one_batch_builder_packs_rows_and_pads_left(tok, proc):
    """collate (eval, chat) and the packer's rows go through one builder: a packed row of two
    documents with images is the same batch as its examples side by side, offsets carried on."""
    from mmsmall.processing.batch import collate_rows

    a = proc.encode(_image(seed=1), [_conv("Q?", "A")], sample_id="a")
    b = proc.encode(None, [_conv("Longer question here?", "Longer answer")], sample_id="b")
    c = proc.encode(_image(300, 200, seed=2), [_conv("Q?", "A")], sample_id="c")
    flat = collate([a, b, c], tok.pad_token_id)
    packed = collate_rows([[a, b], [c]], tok.pad_token_id, seq_len=400)
    La, Lb = a["input_ids"].shape[0], b["input_ids"].shape[0]
    assert packed["input_ids"].shape == (2, 400)
    assert torch.equal(packed["input_ids"][0, La : La + Lb], b["input_ids"])
    assert packed["doc_ids"][0, :La].eq(0).all() and packed["doc_ids"][0, La : La + Lb].eq(1).all()
    for key in ("pixel_values", "image_token_pooling", "image_grids"):
        assert torch.equal(packed[key], flat[key]), key  # same images in the same order: same offsets
    assert packed["sample_ids"] == flat["sample_ids"] == ["a", "b", "c"]
    left = collate([a, b, c], tok.pad_token_id, left_pad=True)
    T = left["input_ids"].shape[1]
    for row, ex in enumerate((a, b, c)):
        L = ex["input_ids"].shape[0]
        assert torch.equal(left["input_ids"][row, T - L :], ex["input_ids"])
        assert left["attention_mask"][row, : T - L].eq(0).all() and left["doc_ids"][row, : T - L].eq(-1).all()
        for key in ("labels", "position_ids", "conv_ids"):
            assert torch.equal(left[key][row, T - L :], flat[key][row, :L])
    with pytest.raises(ValueError, match="more than seq_len=10"):
        collate_rows([[a]], tok.pad_token_id, seq_len=10)


def test_a_training_example_without_any_answer_is_refused(tok, proc):
    """Never a silent loss of 0: a sample whose kept conversations hold no answer is an error
    (the loader skips and counts it), and so is one whose answers were all dropped by max_length."""
    with pytest.raises(ValueError, match="s3.*no assistant answer to train on"):
        proc.encode(_image(), [_conv("What is this?")], sample_id="s3")
    prompt = proc.encode(_image(), [_conv("What is this?")], train=False)  # a prompt needs no answer
    assert (prompt["labels"] == IGNORE).all()
    convs = [_conv("Unanswered question here?"), _conv("Q two?", "A two")]
    first = int((proc.encode(_image(), convs, train=False)["conv_ids"] <= 1).sum())  # prefix + unanswered
    short = Processor(tok, ImageConfig(**TINY), max_length=first)
    with pytest.raises(ValueError, match="1 later conversation.*dropped to fit max_length"):
        short.encode(_image(), convs)
