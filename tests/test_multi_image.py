"""Several images per sample (issue 25): the processor lays them out as stock transformers'
``Molmo2Processor`` does (a prompt starting with one ``<|image|>`` per image: blocks in order, crops
concatenated, pooling indices offset per image, one grid row per image); the image token budget
lowers the crops per image so a long document fits; the model trains on a batch mixing text-only,
one-image and three-image samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.molmo2.processing_molmo2 import Molmo2Processor
from transformers.models.molmo2.video_processing_molmo2 import Molmo2VideoProcessor

from data_tools.fixtures import natural_image
from mmsmall.config import ImageConfig, TokenizerConfig
from mmsmall.export.molmo2 import molmo2_image_processor
from mmsmall.processing.processor import Processor, collate
from mmsmall.processing.tokenizer import build_tokenizer
from mmsmall.processing.tokens import user_text

ROOT = Path(__file__).resolve().parent.parent
CFG = dict(crop_size=112, patch_size=14, max_crops=4, max_crops_eval=4, overlap_margins=[1, 1])
# mixed sizes and aspect ratios: landscape, portrait, a wide strip, a tiny one, a page
SIZES = [(320, 240), (180, 300), (700, 90), (40, 30), (420, 600)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig())


def _pages(n: int, seed: int = 0):
    return [natural_image(seed + i, SIZES[i % len(SIZES)]) for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_several_images_equal_stock_molmo2_processor(tok, n):
    stock = Molmo2Processor(
        image_processor=molmo2_image_processor(ImageConfig(**CFG)),
        video_processor=Molmo2VideoProcessor(),
        tokenizer=tok,
    )
    images = _pages(n)
    ref = stock(images=images, text="<|image|>" * n + user_text("What is the total?"), return_tensors="pt")
    ours = Processor(tok, ImageConfig(**CFG)).encode_prompt(images, "What is the total?")
    assert ours["input_ids"].tolist() == ref["input_ids"][0].tolist()
    assert torch.equal(ours["image_token_pooling"], ref["image_token_pooling"].long())
    assert torch.equal(ours["image_grids"], ref["image_grids"].long())
    assert ours["image_grids"].shape == (n, 4)
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-5


def test_one_image_is_the_list_of_one(tok):
    proc = Processor(tok, ImageConfig(**CFG))
    im = _pages(1)[0]
    a, b = proc.encode_prompt(im, "q"), proc.encode_prompt([im], "q")
    assert all(
        torch.equal(a[k], b[k]) for k in ("input_ids", "pixel_values", "image_token_pooling", "image_grids")
    )
    assert "pixel_values" not in proc.encode_prompt([], "q")  # no image: a text-only prompt
    with pytest.raises(ValueError, match="holds None"):
        proc.encode_prompt([im, None], "q")


def test_image_token_budget_lowers_crops_per_image_to_fit(tok):
    pages = _pages(20, seed=10)
    conv = [[{"role": "user", "content": "What is the total?"}, {"role": "assistant", "content": "42"}]]
    full = Processor(tok, ImageConfig(**CFG))
    n_full = len(full.encode(pages, conv)["input_ids"])
    budget = 1200  # 20 pages at 4 crops take ~2,000 tokens; at 1 crop ~800
    capped = Processor(tok, ImageConfig(**CFG), max_image_tokens=budget, max_length=budget + 50)
    ex = capped.encode(pages, conv, sample_id="doc")
    image_tokens = int((ex["conv_ids"] == 0).sum()) - 1  # the shared prefix: BOS + the image blocks
    assert n_full > budget + 50 >= len(ex["input_ids"])
    assert image_tokens <= budget
    assert capped.counters == {"lowered_image_crops": 1}
    # the crops actually used are the most that fit: one more would pass the budget
    crops = capped.fit_crops([(p.height, p.width) for p in pages], train=True)
    assert crops < CFG["max_crops"]
    assert sum(capped.block_tokens((p.height, p.width), crops + 1) for p in pages) > budget
    # the count is by geometry alone and agrees with the encoded blocks
    assert ex["image_grids"].shape == (20, 4)
    assert image_tokens == sum(capped.block_tokens((p.height, p.width), crops) for p in pages)
    tiny = Processor(tok, ImageConfig(**CFG), max_image_tokens=100)
    with pytest.raises(ValueError, match=r"sample 'doc': its 20 image\(s\) take .* even at one crop each"):
        tiny.encode(pages, conv, sample_id="doc")


def test_a_batch_mixing_zero_one_and_three_images_trains(tok):
    from mmsmall.config import ModelConfig, load_config
    from mmsmall.model.vlm import VLM

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny-molmo2.yaml", cls=ModelConfig)
    tok2 = build_tokenizer(cfg.tokenizer)
    vlm = VLM(cfg, tok2)
    proc = Processor(tok2, cfg.image)

    def conv(q, a):
        return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]]

    examples = [
        proc.encode(None, conv("Say two.", "two"), sample_id="text"),
        proc.encode(_pages(1, 3)[0], conv("How many pages?", "1"), sample_id="one"),
        proc.encode(_pages(3, 5), conv("How many pages?", "3"), sample_id="three"),
    ]
    batch = collate(examples, pad_id=tok2.pad_token_id)
    assert batch["image_grids"].shape == (4, 4)
    # each example alone gives the same loss terms as in the batch: the images meet their own tokens
    vlm.eval()
    with torch.no_grad():
        whole = vlm(**batch).logits
        for row, ex in enumerate(examples):
            alone = vlm(**collate([ex], pad_id=tok2.pad_token_id)).logits[0]
            L = alone.shape[0]
            assert (whole[row, :L] - alone).abs().max() < 1e-4
    vlm.train()
    opt = torch.optim.AdamW(vlm.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = vlm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_chat_template_training_takes_several_images_within_the_budget(tok):
    """An imported release fine-tunes in its own chat template (TemplateTrainingProcessor): several
    images go into the first user turn in order, the same budget lowers their crops (passed to the
    stock processor as ``max_crops``), and only the answer is a target."""
    from mmsmall.export.card import CHAT_TEMPLATE
    from mmsmall.inference.template_training import TemplateTrainingProcessor

    tok = build_tokenizer(TokenizerConfig())
    tok.chat_template = CHAT_TEMPLATE
    pages = _pages(6, seed=30)
    conv = [[{"role": "user", "content": "What is the total?"}, {"role": "assistant", "content": "42"}]]
    full = TemplateTrainingProcessor(tok, ImageConfig(**CFG)).encode(pages, conv)
    ours = Processor(tok, ImageConfig(**CFG)).encode(pages, conv)
    assert full["input_ids"].tolist() == ours["input_ids"][: len(full["input_ids"])].tolist()
    assert full["image_grids"].shape == (6, 4)
    budget = 300
    capped = TemplateTrainingProcessor(tok, ImageConfig(**CFG), max_image_tokens=budget)
    ex = capped.encode(pages, conv)
    same = Processor(tok, ImageConfig(**CFG), max_image_tokens=budget).encode(pages, conv)
    assert capped.counters == {"lowered_image_crops": 1}
    assert len(ex["input_ids"]) < len(full["input_ids"])
    assert torch.equal(ex["image_token_pooling"], same["image_token_pooling"])
    assert tok.decode(ex["input_ids"][ex["labels"] != -100]).strip() == "42" + tok.eos_token


def test_max_image_tokens_is_a_data_key_checked_before_launch():
    from mmsmall.config import ConfigError, load_config

    run = ROOT / "configs/train/tiny-finetune.yaml"
    with pytest.raises(ConfigError, match="data.max_image_tokens: 0 is below the smallest allowed value, 1"):
        load_config(run, ["data.max_image_tokens=0"])
    with pytest.raises(ConfigError, match="max_image_tokens"):  # a typo names the valid keys
        load_config(run, ["data.max_image_token=800"])
    assert load_config(run, ["data.max_image_tokens=800"]).data.max_image_tokens == 800
    assert load_config(run).data.max_image_tokens is None


def test_one_processor_interface_chosen_in_one_place(tok):
    """Ours and the chat-template processor offer the same Encoder interface and are picked by the
    model's prompt format in one function; both take several images for training and prompting."""
    from mmsmall.export.card import CHAT_TEMPLATE
    from mmsmall.inference.chat_template import ChatTemplateProcessor, make_processor
    from mmsmall.processing.processor import Encoder

    templ = build_tokenizer(TokenizerConfig())
    templ.chat_template = CHAT_TEMPLATE
    cfg = ImageConfig(**{**CFG, "max_crops_eval": 2})  # training and eval crop counts differ
    ours = make_processor("mmsmall", tok, cfg)
    theirs = make_processor("chat_template", templ, cfg, max_length=4096)
    assert type(ours) is Processor and type(theirs) is ChatTemplateProcessor
    conv = [[{"role": "user", "content": "What is the total?"}, {"role": "assistant", "content": "42"}]]
    pages = _pages(3)
    for proc in (ours, theirs):
        assert isinstance(proc, Encoder)
        prompt = proc.encode_prompt(pages, "What is the total?")
        example = proc.encode(pages, conv, train=False)  # eval crops: the prompt is the example's prefix
        n = len(prompt["input_ids"])
        assert example["input_ids"][:n].tolist() == prompt["input_ids"].tolist()
        assert prompt["image_grids"].shape == (3, 4)
        assert len(proc.encode(pages, conv)["pixel_values"]) > len(prompt["pixel_values"])  # training crops
