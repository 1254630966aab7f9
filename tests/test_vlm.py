"""The VLM on the tiny config: mask rule, packing, parity with the bare LLM, batch-invariant
greedy decoding, the placeholder check, training steps, and save/load."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsmall.config import ModelConfig, load_config
from mmsmall.export.load import Source, load_model
from mmsmall.inference.predictor import Predictor
from mmsmall.model.attention import MIN_FILL, doc_groups
from mmsmall.model.vlm import VLM, build_attention_mask
from mmsmall.processing.batch import count_targets
from mmsmall.processing.processor import Processor, collate
from mmsmall.processing.tokenizer import build_tokenizer, special_ids

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is the chart?",
    "How many red circles are there in the picture?",
    "Point to the mug.",
    "Describe this image.",
    "What is the highest value in the table, and which year has it?",
    "yes",
    "Count the blue squares.",
    "What color is the star at the top left?",
]


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)


@pytest.fixture(scope="module")
def tok(cfg):
    return build_tokenizer(cfg.tokenizer)


@pytest.fixture(scope="module")
def model(cfg, tok) -> VLM:
    torch.manual_seed(0)
    return VLM(cfg, tok).eval()


# ----------------------------------------------------------------------------- batches from the Processor


@pytest.fixture(scope="module")
def proc(cfg, tok) -> Processor:
    return Processor(tok, cfg.image)


def _image(seed: int) -> Image.Image:
    """A random RGB image of a seed-dependent size (so crop counts differ between examples)."""
    g = np.random.default_rng(seed)
    w, h = int(g.integers(40, 300)), int(g.integers(40, 300))
    return Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _example(proc: Processor, question: str, with_image: bool, seed: int, answer: str | None = None) -> dict:
    image = _image(seed) if with_image else None
    if answer is None:
        return proc.encode_prompt(image, question, sample_id=str(seed))
    conv = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return proc.encode(image, [conv], sample_id=str(seed))


def _collate(examples: list[dict], tok, left_pad: bool = True) -> dict:
    return collate(examples, tok.pad_token_id, left_pad=left_pad)


# ----------------------------------------------------------------------------- tests


def test_mask_rule_matches_the_contract_elementwise():
    g = torch.Generator().manual_seed(0)
    b, t = 3, 14
    doc = torch.randint(-1, 3, (b, t), generator=g).sort(-1).values
    conv = torch.randint(0, 3, (b, t), generator=g)
    img = torch.rand(b, t, generator=g) < 0.3
    mask = build_attention_mask((doc >= 0).long(), doc, conv, img, (b, t), torch.device("cpu"))[:, 0]
    for r in range(b):
        for i in range(t):
            for j in range(t):
                same = doc[r, i] == doc[r, j] and doc[r, j] >= 0
                conv_ok = conv[r, j] == 0 or conv[r, j] == conv[r, i]
                order_ok = j <= i or (img[r, i] and img[r, j])
                want = bool(same and conv_ok and order_ok) or (doc[r, i] < 0 and i == j)
                assert bool(mask[r, i, j]) == want, (r, i, j)


def test_text_only_logits_equal_the_bare_llm(model, proc, tok):
    examples = [_example(proc, q, False, seed=i) for i, q in enumerate(QUESTIONS[:3])]
    batch = _collate(examples, tok)  # left-padded, no pixel_values
    assert batch["pixel_values"] is None
    with torch.no_grad():
        logits = model(**batch).logits
        for i, e in enumerate(examples):
            ref = model.llm(input_ids=e["input_ids"][None]).logits[0]
            torch.testing.assert_close(logits[i, -len(e["input_ids"]) :], ref, rtol=1e-5, atol=1e-5)


def _check_packed_equals_separate(model, proc, tok) -> None:
    """Two samples (one with two conversations) in one row == each in its own row."""
    conv = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "The bar is 3."}]
    conv2 = [{"role": "user", "content": QUESTIONS[2]}, {"role": "assistant", "content": "No."}]
    a = proc.encode(_image(1), [conv, conv2], sample_id="a")
    b = _example(proc, QUESTIONS[1], True, seed=2, answer="3")
    assert int(a["conv_ids"].max()) == 2
    packed = _collate([a], tok)
    for key in ("input_ids", "labels", "position_ids", "conv_ids"):
        packed[key] = torch.cat([a[key], b[key]])[None]
    n_a, n_b = len(a["input_ids"]), len(b["input_ids"])
    packed["attention_mask"] = torch.ones(1, n_a + n_b, dtype=torch.long)
    packed["doc_ids"] = torch.cat([torch.zeros(n_a), torch.ones(n_b)]).long()[None]
    joint = _collate([a, b], tok)  # crops of both, pooling offset into them
    packed["pixel_values"], packed["image_token_pooling"] = (
        joint["pixel_values"],
        joint["image_token_pooling"],
    )
    # conversation 2 of `a` alone: the prefix and its own tokens, nothing of conversation 1
    keep = a["conv_ids"] != 1
    a2 = {k: a[k][keep] for k in ("input_ids", "labels", "position_ids", "conv_ids")}
    a2 |= {k: a[k] for k in ("pixel_values", "image_token_pooling", "image_grids")}
    with torch.no_grad():
        out = model(**packed, loss_reduction="sum")
        sep_a = model(**_collate([a], tok), loss_reduction="sum")
        sep_a2 = model(**_collate([a2], tok), loss_reduction="sum")
        sep_b = model(**_collate([b], tok), loss_reduction="sum")
    torch.testing.assert_close(out.logits[0, :n_a], sep_a.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[0, n_a:], sep_b.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[0, :n_a][keep], sep_a2.logits[0], rtol=1e-5, atol=1e-5)
    n_sep = sum(int(count_targets(_collate([x], tok)["labels"])) for x in (a, b))
    assert int(count_targets(packed["labels"])) == n_sep > 0
    torch.testing.assert_close(out.loss, sep_a.loss + sep_b.loss, rtol=1e-5, atol=1e-5)


def test_packed_documents_and_conversations_equal_separate_runs(model, proc, tok):
    _check_packed_equals_separate(model, proc, tok)


@pytest.mark.parametrize(
    "model_type,attn", [("olmo2", "sdpa"), ("llama", "sdpa"), ("olmo2", "sdpa_docwise"), ("qwen2", "eager")]
)
def test_the_4d_mask_reaches_other_llms_and_attention_kernels(cfg, proc, tok, model, model_type, attn):
    """transformers takes the 4D mask as given for these LLMs (packing would leak otherwise)."""
    other = copy.deepcopy(cfg)
    other.llm.custom = {**cfg.llm.custom, "model_type": model_type}
    other.llm.attn_implementation = attn
    torch.manual_seed(0)
    m = VLM(other, tok).eval()
    _check_packed_equals_separate(m, proc, tok)
    if model_type == "qwen2":  # eager and SDPA agree on a padded batch with images
        m.load_state_dict(model.state_dict())
        batch = _collate([_example(proc, q, i != 1, seed=40 + i) for i, q in enumerate(QUESTIONS[:3])], tok)
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            torch.testing.assert_close(
                m(**batch).logits[real], model(**batch).logits[real], rtol=1e-5, atol=1e-5
            )


def _packed_rows(proc, tok) -> dict:
    """Two packed rows with images, several conversations and padding at the end of row 1."""
    examples = []
    for i in range(5):
        convs = [
            [{"role": "user", "content": QUESTIONS[i]}, {"role": "assistant", "content": "It is " * (i + 1)}]
        ]
        if i % 2:
            convs.append(
                [{"role": "user", "content": QUESTIONS[i + 1]}, {"role": "assistant", "content": "No."}]
            )
        examples.append(proc.encode(_image(50 + i), convs, sample_id=f"p{i}"))
    rows = [examples[:3], examples[3:]]
    t = max(sum(len(e["input_ids"]) for e in r) for r in rows)
    batch = collate(examples, tok.pad_token_id)  # pixel_values / pooling of all five, in this order
    for key, fill in (
        ("input_ids", tok.pad_token_id),
        ("labels", -100),
        ("position_ids", 0),
        ("conv_ids", 0),
    ):
        batch[key] = torch.stack([_pad(torch.cat([e[key] for e in r]), t, fill) for r in rows])
    batch["doc_ids"] = torch.stack(
        [
            _pad(torch.cat([torch.full((len(e["input_ids"]),), d) for d, e in enumerate(r)]), t, -1)
            for r in rows
        ]
    )
    batch["attention_mask"] = (batch["doc_ids"] >= 0).long()
    return batch


def _pad(x: torch.Tensor, t: int, fill: int) -> torch.Tensor:
    return torch.cat([x, torch.full((t - len(x),), fill, dtype=x.dtype)])


def test_docwise_attention_equals_the_block_mask_in_logits_and_gradients(cfg, tok, proc, model):
    """sdpa_docwise (documents regrouped by length) == one SDPA call with the (B, 1, T, T) mask,
    forward and backward, with activation checkpointing (the groups ride through recomputation)."""
    batch = _packed_rows(proc, tok)
    shape = tuple(batch["input_ids"].shape)
    groups = doc_groups(
        batch["attention_mask"], batch["doc_ids"], batch["conv_ids"], None, shape, torch.device("cpu")
    )
    slots = torch.cat([s.flatten() for s in groups.slots])[groups.src]
    real = batch["attention_mask"].flatten().nonzero().squeeze(1)
    assert sorted(slots.tolist()) == real.tolist()  # every real token in exactly one group slot
    assert len(groups.slots) >= 2  # the five documents do not all fit one length bucket
    filled = torch.zeros(sum(s.numel() for s in groups.slots), dtype=torch.bool)
    filled[groups.src] = True
    for slot, used in zip(groups.slots, filled.split([s.numel() for s in groups.slots]), strict=True):
        assert used.view(slot.shape).sum(1).min() >= MIN_FILL * slot.shape[1]  # documents of similar length

    outs = {}
    for attn in ("sdpa", "sdpa_docwise"):
        c = copy.deepcopy(cfg)
        c.llm.attn_implementation = attn
        m = VLM(c, tok).train()
        m.load_state_dict(model.state_dict())
        m.set_activation_checkpointing(True)
        out = m(**batch, loss_reduction="sum")
        out.loss.backward()
        outs[attn] = (out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    (ref, ref_grads), (got, got_grads) = outs["sdpa"], outs["sdpa_docwise"]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-4)
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) > 10
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-4, msg=name)


def test_loss_without_logits_runs_the_lm_head_only_where_targets_are(tok, proc, model):
    """keep_logits=False (what training uses): same loss and gradients, LM head on K < T positions."""
    batch = _packed_rows(proc, tok)
    has_target = (batch["labels"][:, 1:] != -100).any(0)
    shapes = []
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: shapes.append(i[0].shape))
    results = {}
    try:
        for keep in (True, False):
            model.zero_grad()
            out = model(**batch, loss_reduction="sum", keep_logits=keep)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[keep] = (out, grads)
    finally:
        hook.remove()
        model.zero_grad()
    b, t = batch["input_ids"].shape
    assert shapes[0][:2] == (b, t) and shapes[1][:2] == (b, int(has_target.sum()))
    assert int(has_target.sum()) < t // 2  # the answers are a small part of the rows
    (full, full_grads), (lean, lean_grads) = results[True], results[False]
    assert lean.logits is None and full.logits is not None
    torch.testing.assert_close(lean.loss, full.loss, rtol=1e-5, atol=1e-4)
    assert full_grads.keys() == lean_grads.keys()
    for name, g in full_grads.items():
        torch.testing.assert_close(lean_grads[name], g, rtol=1e-4, atol=1e-4, msg=name)


def test_docwise_falls_back_to_the_full_mask_for_split_documents(tok, proc, model):
    """A document id in two separate runs of a row (the packer never writes that) gives no groups,
    and the forward still follows the attention rule through the 4D mask."""
    batch = _packed_rows(proc, tok)
    split = batch["doc_ids"].clone()
    split[0, -1] = 0  # doc 0 of row 0 again at the end
    shape = tuple(split.shape)
    assert doc_groups(None, split, batch["conv_ids"], None, shape, torch.device("cpu")) is None
    assert model.cfg.llm.attn_implementation == "sdpa_docwise"
    sdpa_cfg = copy.deepcopy(model.cfg)
    sdpa_cfg.llm.attn_implementation = "sdpa"
    ref = VLM(sdpa_cfg, tok).eval()
    ref.load_state_dict(model.state_dict())
    batch["doc_ids"], batch["attention_mask"] = split, (split >= 0).long()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, rtol=1e-5, atol=1e-5)


def test_bidirectional_image_attention_switch(cfg, proc, tok, model):
    ids = special_ids(tok)
    e1 = _example(proc, QUESTIONS[0], True, seed=3)
    e2 = copy.deepcopy(e1)
    last_col = int((e1["input_ids"] == ids["<im_col>"]).nonzero()[-1])
    e2["input_ids"][last_col] = ids["<im_low>"]  # a later image token changes (the ViT sees the same pixels)
    first_patch = int((e1["input_ids"] == ids["<im_patch>"]).nonzero()[0])
    causal_cfg = copy.deepcopy(cfg)
    causal_cfg.bidirectional_image = False
    causal = VLM(causal_cfg, tok).eval()
    causal.load_state_dict(model.state_dict())
    with torch.no_grad():
        bi = [model(**_collate([e], tok)).logits[0, first_patch] for e in (e1, e2)]
        ca = [causal(**_collate([e], tok)).logits[0, first_patch] for e in (e1, e2)]
    assert not torch.allclose(bi[0], bi[1])  # the first image token sees a later one
    torch.testing.assert_close(ca[0], ca[1], rtol=0, atol=0)  # causal: it cannot


def test_greedy_generation_is_batch_invariant(model, proc, tok):
    examples = [_example(proc, q, i % 3 != 2, seed=10 + i) for i, q in enumerate(QUESTIONS)]
    assert len({len(e["input_ids"]) for e in examples}) > 3  # prompts of different lengths
    batched = model.generate(_collate(examples, tok), max_new_tokens=6)
    alone = [model.generate(_collate([e], tok), max_new_tokens=6)[0] for e in examples]
    assert batched == alone
    assert any(len(r) == 6 for r in batched)
    assert len({tuple(r) for r in batched}) > 1  # different inputs, different answers


def test_predictor_answers_do_not_depend_on_batch_size(model, tok):
    predictor = Predictor(model, max_crops=2)
    images = [_image(50 + i) if i % 4 else None for i in range(8)]  # None: the blind / text-only case
    one = predictor.predict(images, QUESTIONS, max_new_tokens=5, batch_size=1)
    eight = predictor.predict(images, QUESTIONS, max_new_tokens=5, batch_size=8)
    three = predictor.predict(images, QUESTIONS, max_new_tokens=5, batch_size=3)
    assert one == eight == three and len(one) == 8
    assert all(isinstance(a, str) and tok.eos_token not in a for a in one)
    with pytest.raises(ValueError, match="one image per question"):
        predictor.predict(images[:2], QUESTIONS[:3])


def test_generation_stops_per_row(model, cfg, proc, tok):
    examples = [_example(proc, q, True, seed=20 + i) for i, q in enumerate(QUESTIONS[:3])]
    batch = _collate(examples, tok)
    free = model.generate(batch, max_new_tokens=5)
    stop = tok.decode(free[0][:2])  # row 0 stops once this text is produced, the others go on
    stopped = model.generate(batch, max_new_tokens=5, stop_strings=[stop])
    k = next(k for k in range(1, 6) if stop in tok.decode(free[0][:k]))  # first step that completes it
    assert stopped[0] == free[0][:k]
    for got, want in zip(stopped[1:], free[1:]):
        assert got == want[: len(got)] and (stop in tok.decode(got) or got == want)
    # EOS: make row 1's first greedy token the EOS (a second tokenizer, same vocabulary)
    eos_tok = build_tokenizer(cfg.tokenizer)
    eos_tok.eos_token = eos_tok.convert_ids_to_tokens(free[1][0])
    model.tokenizer, saved = eos_tok, model.tokenizer
    try:
        ended = model.generate(batch, max_new_tokens=5)
    finally:
        model.tokenizer = saved
    assert ended[1] == [free[1][0]]
    sampled = model.generate(batch, max_new_tokens=4, do_sample=True, temperature=0.8, top_p=0.9)
    assert all(1 <= len(r) <= 4 for r in sampled)


def test_placeholder_count_mismatch_raises(model, proc, tok):
    ids = special_ids(tok)
    e = _example(proc, QUESTIONS[0], True, seed=4)
    n = int((e["input_ids"] == ids["<im_patch>"]).sum())
    first = int((e["input_ids"] == ids["<im_patch>"]).nonzero()[0])
    e["input_ids"][first] = ids["<im_col>"]
    with pytest.raises(ValueError, match=f"image feature count {n} != <im_patch> placeholder count {n - 1}"):
        model(**_collate([e], tok))
    batch = _collate([_example(proc, QUESTIONS[0], True, seed=4)], tok)
    batch["pixel_values"] = None
    with pytest.raises(ValueError, match="no pixel_values"):
        model(**batch)
    with pytest.raises(TypeError, match="unexpected batch keys"):
        model(**_collate([_example(proc, QUESTIONS[0], False, seed=4)], tok), pixel_mask=None)


def test_a_few_adamw_steps_lower_the_loss(cfg, proc, tok):
    torch.manual_seed(0)
    m = VLM(cfg, tok).train()
    examples = [
        _example(proc, q, True, seed=30 + i, answer="The red circle.") for i, q in enumerate(QUESTIONS[:4])
    ]
    batch = _collate(examples, tok, left_pad=False)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = m(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for name in ("vision", "connector", "llm"):  # every part received gradient
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(m, name).parameters()), name


def test_activation_checkpointing_gives_the_same_gradients(cfg, proc, tok, model):
    batch = _collate([_example(proc, QUESTIONS[1], True, seed=6, answer="3")], tok)
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        m = VLM(cfg, tok).train()
        m.load_state_dict(model.state_dict())
        m.set_activation_checkpointing(enable)
        assert m.llm.is_activation_checkpointing == enable
        assert m.vision.backbone.visual.transformer.grad_checkpointing == enable
        m(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-molmo2.yaml"])
def test_save_then_load_gives_identical_logits(config, tok, tmp_path):
    cfg = load_config(ROOT / "configs/model" / config, cls=ModelConfig)
    torch.manual_seed(0)
    model = VLM(cfg, tok).eval()
    proc = Processor(tok, cfg.image)
    batch = _collate([_example(proc, QUESTIONS[0], True, seed=5, answer="3")], tok)
    model.save_pretrained(tmp_path / "ckpt")
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert names >= {"model_config.yaml", "model.safetensors", "tokenizer.json", "llm_config.json"}
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.tokenizer.get_vocab() == tok.get_vocab()
    assert loaded.cfg == cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    answers = Predictor(tmp_path / "ckpt").predict([_image(7)], [QUESTIONS[0]], max_new_tokens=3)
    assert answers == Predictor(model).predict([_image(7)], [QUESTIONS[0]], max_new_tokens=3)


def test_an_attention_kernel_that_cannot_take_the_mask_is_refused_with_the_valid_ones(cfg, tok):
    bad = copy.deepcopy(cfg)
    bad.llm.attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2'.*sdpa_docwise"):
        VLM(bad, tok)


def test_from_pretrained_names_the_missing_weights_file_even_without_loading(tmp_path):
    for load_weights in (True, False):
        with pytest.raises(FileNotFoundError, match=r"model\.safetensors not found.*save_pretrained"):
            load_model(Source("vlm", tmp_path), weights=load_weights)
