"""The VLM on the tiny config: mask rule, packing, parity with the bare LLM, batch-invariant
greedy decoding, the placeholder check, training steps, and save/load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mmsmall.config import ModelConfig, load_config
from mmsmall.model.vlm import VLM, build_attention_mask, build_vlm
from mmsmall.processing.tokenizer import build_tokenizer, special_ids

ROOT = Path(__file__).resolve().parent.parent
GRID, POOL = 8, 2  # tiny config: 112 px crops of 14 px patches, 2x2 pooling
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
    return build_vlm(cfg, tok).eval()


# ----------------------------------------------------------------------------- hand-made batches
# (the Processor's layout in miniature: BOS + per crop <im_start> rows of <im_patch> + <im_col>
#  <im_end>, then the conversation; pooling indices per example, offset again when collated)


def _example(tok, question: str, n_crops: int, seed: int, answer: str | None = None) -> dict:
    ids = special_ids(tok)
    g = torch.Generator().manual_seed(seed)
    prefix = [ids["bos"]]
    pooling = []
    n_win = GRID // POOL
    for c in range(n_crops):
        prefix.append(ids["<im_start>"])
        for _ in range(n_win):
            prefix += [ids["<im_patch>"]] * n_win + [ids["<im_col>"]]
        prefix.append(ids["<im_end>"])
        grid = torch.arange(GRID * GRID).reshape(n_win, POOL, n_win, POOL).permute(0, 2, 1, 3)
        pooling.append(grid.reshape(-1, POOL * POOL) + c * GRID * GRID)
    text = tok.encode(f" User: {question} Assistant:", add_special_tokens=False)
    target = [] if answer is None else tok.encode(f" {answer}", add_special_tokens=False) + [ids["eos"]]
    input_ids = torch.tensor(prefix + text + target)
    n_prefix = len(prefix)
    labels = torch.full_like(input_ids, -100)
    if target:
        labels[-len(target) :] = torch.tensor(target)
    example = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": torch.arange(len(input_ids)),
        "conv_ids": (torch.arange(len(input_ids)) >= n_prefix).long(),
    }
    if n_crops:
        example["pixel_values"] = torch.randn(n_crops, GRID * GRID, 14 * 14 * 3, generator=g)
        example["image_token_pooling"] = torch.cat(pooling)
    return example


def _collate(examples: list[dict], pad_id: int, left_pad: bool = True) -> dict:
    t = max(len(e["input_ids"]) for e in examples)
    out = {k: [] for k in ("input_ids", "labels", "attention_mask", "position_ids", "doc_ids", "conv_ids")}
    pixels, pooling, offset = [], [], 0
    for e in examples:
        n = len(e["input_ids"])
        pad = t - n

        def put(x: torch.Tensor, fill: int, pad: int = pad) -> torch.Tensor:
            filler = torch.full((pad,), fill, dtype=x.dtype)
            return torch.cat([filler, x] if left_pad else [x, filler])

        out["input_ids"].append(put(e["input_ids"], pad_id))
        out["labels"].append(put(e["labels"], -100))
        out["attention_mask"].append(put(torch.ones(n, dtype=torch.long), 0))
        out["position_ids"].append(put(e["position_ids"], 0))
        out["doc_ids"].append(put(torch.zeros(n, dtype=torch.long), -1))
        out["conv_ids"].append(put(e["conv_ids"], 0))
        if "pixel_values" in e:
            pixels.append(e["pixel_values"])
            pooling.append(e["image_token_pooling"] + offset)
            offset += e["pixel_values"].shape[0] * e["pixel_values"].shape[1]
    batch = {k: torch.stack(v) for k, v in out.items()}
    batch["pixel_values"] = torch.cat(pixels) if pixels else None
    batch["image_token_pooling"] = torch.cat(pooling) if pooling else None
    batch["sample_ids"] = [str(i) for i in range(len(examples))]
    return batch


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


def test_text_only_logits_equal_the_bare_llm(model, tok):
    rows = [tok.encode(" User: What is the chart? Assistant:"), tok.encode(" User: yes")]
    examples = [{"input_ids": torch.tensor(r)} for r in rows]
    for e in examples:
        n = len(e["input_ids"])
        e.update(
            labels=torch.full((n,), -100),
            position_ids=torch.arange(n),
            conv_ids=torch.zeros(n, dtype=torch.long),
        )
    batch = _collate(examples, tok.pad_token_id, left_pad=True)
    with torch.no_grad():
        logits = model(**batch).logits
        for i, r in enumerate(rows):
            ref = model.llm(input_ids=torch.tensor([r])).logits[0]
            torch.testing.assert_close(logits[i, -len(r) :], ref, rtol=1e-5, atol=1e-5)


def _check_packed_equals_separate(model, tok) -> None:
    a = _example(tok, QUESTIONS[0], 1, seed=1, answer="The bar is 3.")
    b = _example(tok, QUESTIONS[1], 2, seed=2, answer="3")
    packed = _collate([a], tok.pad_token_id)
    for key in ("input_ids", "labels", "position_ids", "conv_ids"):
        packed[key] = torch.cat([a[key], b[key]])[None]
    n_a, n_b = len(a["input_ids"]), len(b["input_ids"])
    packed["attention_mask"] = torch.ones(1, n_a + n_b, dtype=torch.long)
    packed["doc_ids"] = torch.cat([torch.zeros(n_a), torch.ones(n_b)]).long()[None]
    packed["pixel_values"] = torch.cat([a["pixel_values"], b["pixel_values"]])
    packed["image_token_pooling"] = torch.cat([a["image_token_pooling"], b["image_token_pooling"] + 64])
    with torch.no_grad():
        out = model(**packed, loss_reduction="sum")
        sep_a = model(**_collate([a], tok.pad_token_id), loss_reduction="sum")
        sep_b = model(**_collate([b], tok.pad_token_id), loss_reduction="sum")
    torch.testing.assert_close(out.logits[0, :n_a], sep_a.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[0, n_a:], sep_b.logits[0], rtol=1e-5, atol=1e-5)
    assert int(out.n_targets) == int(sep_a.n_targets) + int(sep_b.n_targets) > 0
    torch.testing.assert_close(out.loss, sep_a.loss + sep_b.loss, rtol=1e-5, atol=1e-5)


def test_packed_documents_equal_separate_runs(model, tok):
    _check_packed_equals_separate(model, tok)


@pytest.mark.parametrize(
    "model_type,attn",
    [("olmo2", "sdpa"), ("llama", "sdpa"), ("qwen2", "eager")],
)
def test_the_4d_mask_reaches_other_llms_and_attention_kernels(cfg, tok, model, model_type, attn):
    """transformers takes the 4D mask as given for these LLMs (packing would leak otherwise)."""
    other = copy.deepcopy(cfg)
    other.llm.custom = {**cfg.llm.custom, "model_type": model_type}
    other.llm.attn_implementation = attn
    torch.manual_seed(0)
    m = build_vlm(other, tok).eval()
    _check_packed_equals_separate(m, tok)
    if model_type == "qwen2":  # eager and SDPA agree on a padded batch with images
        m.load_state_dict(model.state_dict())
        batch = _collate(
            [_example(tok, q, 1 + i % 2, seed=40 + i) for i, q in enumerate(QUESTIONS[:3])], tok.pad_token_id
        )
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            torch.testing.assert_close(
                m(**batch).logits[real], model(**batch).logits[real], rtol=1e-5, atol=1e-5
            )


def test_bidirectional_image_attention_switch(cfg, tok, model):
    ids = special_ids(tok)
    e1 = _example(tok, QUESTIONS[0], 1, seed=3)
    e2 = copy.deepcopy(e1)
    last_col = int((e1["input_ids"] == ids["<im_col>"]).nonzero()[-1])
    e2["input_ids"][last_col] = ids["<im_low>"]  # a later image token changes (the ViT sees the same pixels)
    first_patch = int((e1["input_ids"] == ids["<im_patch>"]).nonzero()[0])
    causal_cfg = copy.deepcopy(cfg)
    causal_cfg.bidirectional_image = False
    causal = build_vlm(causal_cfg, tok).eval()
    causal.load_state_dict(model.state_dict())
    with torch.no_grad():
        bi = [model(**_collate([e], tok.pad_token_id)).logits[0, first_patch] for e in (e1, e2)]
        ca = [causal(**_collate([e], tok.pad_token_id)).logits[0, first_patch] for e in (e1, e2)]
    assert not torch.allclose(bi[0], bi[1])  # the first image token sees a later one
    torch.testing.assert_close(ca[0], ca[1], rtol=0, atol=0)  # causal: it cannot


def test_greedy_generation_is_batch_invariant(model, tok):
    examples = [_example(tok, q, n_crops=i % 3, seed=10 + i) for i, q in enumerate(QUESTIONS)]
    batched = model.generate(_collate(examples, tok.pad_token_id), max_new_tokens=6)
    alone = [model.generate(_collate([e], tok.pad_token_id), max_new_tokens=6)[0] for e in examples]
    assert batched == alone
    assert any(len(r) == 6 for r in batched)
    assert len({tuple(r) for r in batched}) > 1  # different inputs, different answers


def test_generation_stops_per_row(model, cfg, tok):
    examples = [_example(tok, q, n_crops=1, seed=20 + i) for i, q in enumerate(QUESTIONS[:3])]
    batch = _collate(examples, tok.pad_token_id)
    free = model.generate(batch, max_new_tokens=5)
    stop = tok.decode(free[0][:2])  # row 0 stops once this text is produced, the others go on
    stopped = model.generate(batch, max_new_tokens=5, stop_strings=[stop])
    assert stopped[0] == free[0][:2]
    for got, want in zip(stopped[1:], free[1:]):
        assert got == want[: len(got)] and (stop in tok.decode(got) or got == want)
    # EOS: make row 1's first greedy token the EOS of a copy of the model
    eos_tok = build_tokenizer(cfg.tokenizer)
    eos_tok.eos_token = eos_tok.convert_ids_to_tokens(free[1][0])
    model.tokenizer, saved = eos_tok, model.tokenizer
    try:
        ended = model.generate(batch, max_new_tokens=5)
    finally:
        model.tokenizer = saved
    assert ended[1] == [free[1][0]]
    sampled = model.generate(batch, max_new_tokens=4, do_sample=True, temperature=0.8, top_p=0.9)
    assert [len(r) for r in sampled] == [4, 4, 4]


def test_placeholder_count_mismatch_raises(model, tok):
    e = _example(tok, QUESTIONS[0], 1, seed=4)
    patch = special_ids(tok)["<im_patch>"]
    first = int((e["input_ids"] == patch).nonzero()[0])
    e["input_ids"][first] = special_ids(tok)["<im_col>"]
    with pytest.raises(ValueError, match="placeholder count 15"):
        model(**_collate([e], tok.pad_token_id))
    e = _example(tok, QUESTIONS[0], 1, seed=4)
    batch = _collate([e], tok.pad_token_id)
    batch["pixel_values"] = None
    with pytest.raises(ValueError, match="no pixel_values"):
        model(**batch)


def test_a_few_adamw_steps_lower_the_loss(cfg, tok):
    torch.manual_seed(0)
    m = build_vlm(cfg, tok).train()
    examples = [
        _example(tok, q, n_crops=1 + i % 2, seed=30 + i, answer="The red circle.")
        for i, q in enumerate(QUESTIONS[:4])
    ]
    batch = _collate(examples, tok.pad_token_id, left_pad=False)
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


def test_activation_checkpointing_gives_the_same_gradients(cfg, tok, model):
    batch = _collate([_example(tok, QUESTIONS[1], 2, seed=6, answer="3")], tok.pad_token_id)
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        m = build_vlm(cfg, tok).train()
        m.load_state_dict(model.state_dict())
        m.set_activation_checkpointing(enable)
        assert m.llm.is_gradient_checkpointing == enable
        assert m.vision.backbone.visual.transformer.grad_checkpointing == enable
        m(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_save_then_load_gives_identical_logits(model, tok, tmp_path):
    batch = _collate([_example(tok, QUESTIONS[0], 2, seed=5, answer="3")], tok.pad_token_id)
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {
        "model_config.yaml",
        "model.safetensors",
        "tokenizer.json",
    }
    loaded = VLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.tokenizer.get_vocab() == tok.get_vocab()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
