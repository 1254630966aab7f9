"""train.loss_weighting: how target tokens share the loss. "token" weighs every target alike (the
default, as before); "sqrt" weighs each of a conversation's n targets 1/sqrt(n); "conversation"
1/n, so every conversation counts once. The weights follow packing (row, document, conversation),
the model sums weighted token losses, and the loop divides by the weights' sum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_train import shards  # noqa: F401  (the module's fixture)

from mmsmall.config import ConfigError, load_config
from mmsmall.processing.batch import IGNORE_INDEX, label_weights, loss_normalizer


def _packed() -> dict:
    """Two rows: row 0 packs document 0 (conversations 1 and 2 sharing an image: 3 and 1
    targets) and document 1 (one conversation, 2 targets); row 1 is one document whose
    conversation 1 has 4 targets, then padding."""
    labels = torch.full((2, 14), IGNORE_INDEX)
    doc_ids = torch.full((2, 14), -1)
    conv_ids = torch.zeros((2, 14), dtype=torch.long)
    doc_ids[0, :9], doc_ids[0, 9:] = 0, 1
    conv_ids[0, 2:6], conv_ids[0, 6:9], conv_ids[0, 9:] = 1, 2, 1
    labels[0, 3:6] = 11  # doc 0, conversation 1
    labels[0, 8] = 12  # doc 0, conversation 2
    labels[0, 12:14] = 13  # doc 1
    doc_ids[1, :10] = 0
    conv_ids[1, 3:10] = 1
    labels[1, 0] = 14  # position 0 predicts nothing: never a target
    labels[1, 5:9] = 15
    return {"labels": labels, "doc_ids": doc_ids, "conv_ids": conv_ids}


@pytest.mark.parametrize(("name", "power"), [("token", 0.0), ("sqrt", 0.5), ("conversation", 1.0)])
def test_each_conversation_weighs_n_to_the_minus_power(name, power):
    batch = _packed()
    w = label_weights(batch, power)
    groups = {  # the positions of each conversation's targets, and their count
        "row0 doc0 conv1": ((0, [3, 4, 5]), 3),
        "row0 doc0 conv2": ((0, [8]), 1),
        "row0 doc1": ((0, [12, 13]), 2),
        "row1 doc0": ((1, [5, 6, 7, 8]), 4),
    }
    for (row, cols), n in groups.values():
        assert torch.allclose(w[row, cols], torch.full((len(cols),), n**-power))
    assert float(w[1, 0]) == 0.0  # the unshifted first label is not trained
    assert int((w > 0).sum()) == 10
    expected = sum(n ** (1 - power) for _, n in groups.values())
    assert loss_normalizer({**batch, "label_weights": w}) == pytest.approx(expected)
    assert loss_normalizer(batch) == 10  # without weights: the target count


def test_weighted_loss_is_each_conversation_by_its_weight():
    from test_hf_classes import _vlm

    torch.manual_seed(0)
    batch = _packed()
    vlm = _vlm("tiny")
    ids = torch.randint(10, 100, batch["labels"].shape)
    mask = (batch["doc_ids"] >= 0).long()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=batch["labels"], doc_ids=batch["doc_ids"],
                  conv_ids=batch["conv_ids"])  # fmt: skip
    with torch.no_grad():
        full = vlm(**inputs)  # token-mean loss, full logits
        per_token = F.cross_entropy(
            full.logits[:, :-1].transpose(1, 2).float(), batch["labels"][:, 1:], reduction="none"
        )  # (B, T-1), 0 where ignored
        # conversation weighting by hand: the mean of each conversation's mean token loss
        spans = [(0, [3, 4, 5]), (0, [8]), (0, [12, 13]), (1, [5, 6, 7, 8])]
        by_hand = sum(per_token[r, [c - 1 for c in cols]].mean() for r, cols in spans) / len(spans)
        w = label_weights(batch, 1.0)
        for keep in (True, False):  # the training path keeps logits only where targets are
            mean = vlm(**inputs, label_weights=w, keep_logits=keep)
            summed = vlm(**inputs, label_weights=w, keep_logits=keep, loss_reduction="sum")
            assert float(mean.loss) == pytest.approx(float(by_hand), rel=1e-5)
            assert float(summed.loss) == pytest.approx(
                float(by_hand) * loss_normalizer({**batch, "label_weights": w}), rel=1e-5
            )
        ones = vlm(**inputs, label_weights=label_weights(batch, 0.0))
        assert float(ones.loss) == pytest.approx(float(full.loss), rel=1e-6)
        assert not math.isclose(float(by_hand), float(full.loss), rel_tol=1e-3)  # the weighting matters here


def test_train_data_carries_the_weights_and_the_loop_divides_by_their_sum(shards):  # noqa: F811
    from mmsmall.data.loader import TrainData
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.processor import Processor
    from mmsmall.processing.tokenizer import build_tokenizer

    base = ["configs/train/tiny-pretrain.yaml", [f"data.train=[{{path: {shards}}}]"]]
    cfg = load_config(base[0], [*base[1], "train.loss_weighting=sqrt"])
    tok = build_tokenizer(cfg.model.tokenizer)
    model = VLM(cfg.model, tok).eval()
    sqrt = TrainData(cfg, Processor(tok, cfg.model.image), tok.pad_token_id).next_batch()
    plain = TrainData(load_config(*base), Processor(tok, cfg.model.image), tok.pad_token_id).next_batch()
    assert "label_weights" not in plain  # "token" (the default) adds nothing
    assert sqrt["sample_ids"] == plain["sample_ids"]  # same data, only weighed differently
    assert torch.equal(sqrt["label_weights"], label_weights(sqrt, 0.5))
    batch = {k: v for k, v in sqrt.items() if k != "sample_ids"}
    with torch.no_grad():
        summed = model(**batch, loss_reduction="sum", keep_logits=False)
        mean = model(**batch, keep_logits=False)
    assert float(summed.loss) / loss_normalizer(sqrt) == pytest.approx(float(mean.loss), rel=1e-5)


def test_an_unknown_weighting_names_the_valid_ones():
    with pytest.raises(ConfigError, match="train.loss_weighting: 'square'; valid: token, sqrt, conversation"):
        load_config("configs/train/tiny-pretrain.yaml", ["train.loss_weighting=square"])
