"""Released models: a tiny *stock* Molmo2 (built from a transformers ``Molmo2Config``, saved with
``save_pretrained``, with its own Molmo2-style chat template and two extra-vocabulary tokens) is
imported with ``mmsmall import``; its logits equal stock transformers' (the extra ids at -inf, never
emitted), and ``mmsmall eval --model <stock folder>`` answers exactly what stock ``generate`` says
on the same chat-template prompts, at batch 1 and batch 8."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsmall.config import TokenizerConfig
from mmsmall.processing.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
EXE = shutil.which("mmsmall", path=str(Path(sys.executable).parent)) or "mmsmall"
# Molmo2's prompt: the image first, then the Qwen-style turn markers.
MOLMO2_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}<|image|>{%- endfor -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
BUDGET = 12  # new tokens per answer in the eval comparison
N_EXTRA = 2  # extra-vocabulary ids: embedded, never scored by stock Molmo2's lm_head


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run([EXE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def stock_tokenizer():
    tok = build_tokenizer(TokenizerConfig())  # the tiny BPE with Molmo2's image tokens
    tok.add_special_tokens(
        {"extra_special_tokens": ["<|im_start|>", "<|im_end|>", *[f"<|extra_{i}|>" for i in range(N_EXTRA)]]},
        replace_extra_special_tokens=False,
    )
    tok.eos_token = "<|im_end|>"
    tok.chat_template = MOLMO2_TEMPLATE
    return tok


def build_stock_molmo2(out: Path, seed: int = 0) -> Path:
    """A random tiny Molmo2ForConditionalGeneration + Molmo2Processor folder, as transformers saves it."""
    from transformers import (
        GenerationConfig,
        Molmo2Config,
        Molmo2ForConditionalGeneration,
        Molmo2ImageProcessor,
        Molmo2Processor,
        Molmo2VideoProcessor,
    )

    tok = stock_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in tok.get_vocab()}
    common = {"size": {"height": 56, "width": 56}, "patch_size": 14, "pooling_size": [2, 2]}
    common.update(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    cfg = Molmo2Config(
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 4, "head_dim": 8, "image_size": [56, 56], "patch_size": 14,
            "hidden_act": "gelu_pytorch_tanh", "attention_bias": True,
        },
        adapter_config={
            "vision_feature_layer": [-1, -2], "hidden_size": 32, "num_attention_heads": 4,
            "num_key_value_heads": 4, "head_dim": 8, "attention_bias": True, "hidden_act": "silu",
            "intermediate_size": 64, "text_hidden_size": 64, "mlp_bias": False,
        },
        text_config={
            "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "vocab_size": len(tok) - N_EXTRA, "additional_vocab_size": N_EXTRA, "attention_bias": False,
            "qk_norm_type": "olmo", "norm_after": True, "num_hidden_layers": 2, "intermediate_size": 96,
            "max_position_embeddings": 1024, "tie_word_embeddings": False,
        },
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        image_start_token_id=ids["<im_start>"],
        low_res_image_start_token_id=ids["<low_res_im_start>"],
        image_end_token_id=ids["<im_end>"],
        image_patch_id=ids["<im_patch>"],
        frame_start_token_id=ids["<frame_start>"],
        frame_end_token_id=ids["<frame_end>"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Molmo2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # no weight left at an init constant (norms at 1, biases at 0)
            p.add_(0.1 * torch.randn_like(p))
        # make <|im_end|> likely after a few tokens, so generations end at different lengths
        model.lm_head.weight[tok.eos_token_id] *= 3.0
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        do_sample=False, max_new_tokens=16,
    )  # fmt: skip
    model.save_pretrained(out)
    Molmo2Processor(
        image_processor=Molmo2ImageProcessor(max_crops=3, overlap_margins=[1, 1], **common),
        video_processor=Molmo2VideoProcessor(**common),
        tokenizer=tok,
        chat_template=MOLMO2_TEMPLATE,
    ).save_pretrained(out)
    return out


def image(seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    h, w = int(rng.randint(40, 160)), int(rng.randint(40, 160))
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))


def stock_inputs(processor, img: Image.Image | None, question: str) -> dict:
    content = ([{"type": "image", "image": img}] if img is not None else []) + [
        {"type": "text", "text": question}
    ]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=True, add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> Path:
    return build_stock_molmo2(tmp_path_factory.mktemp("stock") / "molmo2-tiny")


@pytest.fixture(scope="module")
def imported(stock, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "model"
    proc = _run("import", str(stock), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_import_carries_everything_and_logits_match(stock, imported):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmsmall.export.load import load_model
    from mmsmall.inference.predictor import Predictor
    from mmsmall.processing.processor import collate

    vlm = load_model(imported)
    assert vlm.cfg.prompt == "chat_template" and vlm.tokenizer.chat_template == MOLMO2_TEMPLATE
    assert vlm.cfg.image.max_crops_eval == 3 and vlm.cfg.image.overlap_margins == [1, 1]
    n_text = len(vlm.tokenizer) - N_EXTRA
    assert vlm.cfg.emit_vocab == n_text
    gen = json.loads((imported / "generation_config.json").read_text())
    assert (
        gen["eos_token_id"] == vlm.tokenizer.convert_tokens_to_ids("<|im_end|>")
        and gen["max_new_tokens"] == 16
    )
    assert json.loads((imported / "import.json").read_text())["source"] == str(stock)

    model = AutoModelForImageTextToText.from_pretrained(stock).eval()
    processor = AutoProcessor.from_pretrained(stock)
    predictor = Predictor(vlm)
    for seed in (1, 2):
        img = image(seed)
        ref_in = stock_inputs(processor, img, "What is the color?")
        ours = collate(
            [predictor.processor.encode_prompt(img, "What is the color?")], vlm.tokenizer.pad_token_id, True
        )
        assert torch.equal(ours["input_ids"], ref_in["input_ids"])  # the checkpoint's own prompt
        with torch.no_grad():
            ref = model(**ref_in).logits  # (1, T, n_text)
            got = vlm(
                **{k: ours[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_token_pooling")}
            )
        assert ref.shape[-1] == n_text and got.logits.shape[-1] == n_text + N_EXTRA
        assert (got.logits[..., :n_text] - ref).abs().max().item() < 1e-4
        assert torch.isneginf(got.logits[..., n_text:]).all()  # input-only ids: never emitted


def test_unmappable_checkpoint_is_refused_with_reason(stock, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(stock, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["attention_bias"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = _run("import", str(bad), str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "q/k/v biases" in proc.stderr
    assert not (tmp_path / "out").exists()
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    from mmsmall.export import Molmo2Incompatible, import_molmo2

    with pytest.raises(Molmo2Incompatible, match="not a transformers Molmo2 checkpoint"):
        import_molmo2(bad, tmp_path / "out")


def _eval_data(tmp_path: Path, n: int) -> Path:
    """A docvqa-layout local set (RRC-style json + images) of ``n`` questions."""
    root = tmp_path / "docvqa"
    (root / "images").mkdir(parents=True)
    data = []
    for i in range(n):
        image(100 + i).save(root / "images" / f"d{i}.png")
        q = ["What is the title?", "How many rows?", "What is the total?"][i % 3]
        data.append({"questionId": i, "question": q, "image": f"images/d{i}.png", "answers": ["x"]})
    (root / "val_v1.0.json").write_text(json.dumps({"data": data}))
    return root


@pytest.mark.slow
def test_eval_stock_folder_equals_stock_generate_batch_1_and_8(stock, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from eval.tasks.base import get_task

    data = _eval_data(tmp_path, 9)
    task = get_task("docvqa")
    records = task.load(str(data), None)
    model = AutoModelForImageTextToText.from_pretrained(stock).eval()
    processor = AutoProcessor.from_pretrained(stock)
    want = {}
    for r in records:
        inputs = stock_inputs(processor, r.load_image(), task.prompt(r, False))
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=BUDGET, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        want[r.id] = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert len(set(want.values())) > 1  # the answers differ between samples: the check is sharp
    for bs in (1, 8):
        out = tmp_path / f"bs{bs}"
        proc = _run(
            "eval", "--model", str(stock), "--tasks", "docvqa", "--data", f"docvqa={data}", "--out", str(out),
            "--batch-size", str(bs), "--num-workers", str(bs // 4), "--dtype", "fp32", "--device", "cpu",
            "--max-new-tokens", str(BUDGET),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = {
            json.loads(line)["id"]: json.loads(line)["response"]
            for line in (out / "predictions" / "docvqa.jsonl").read_text().splitlines()
        }
        assert got == want, (bs, got, want)
        results = json.loads((out / "results.json").read_text())
        assert results["prompt_format"] == "chat_template" and results["dtype"] == "fp32"
        assert results["max_crops"] == 3 and results["transformers"]
        assert results["tasks"]["docvqa"]["max_new_tokens"] == BUDGET


def test_init_from_takes_a_stock_folder_and_zero3_names_the_fix(stock, imported):
    from mmsmall.config import ConfigError, RunConfig, load_config
    from mmsmall.export.load import load_model
    from mmsmall.train.zero_init import build_model, llm_hidden_size

    cfg = load_config(ROOT / "configs/train/tiny-finetune.yaml", [f"train.init_from={stock}"], cls=RunConfig)
    built = build_model(cfg, world_size=1)
    model = built.model
    # the run trains the folder's model: the returned config says so; the caller's is not changed
    assert built.run_cfg.model is model.cfg and cfg.model is not model.cfg
    assert model.cfg.emit_vocab == len(model.tokenizer) - N_EXTRA
    assert model.cfg.prompt == "chat_template"  # fine-tuned, and saved, in the checkpoint's own template
    ref = load_model(imported)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(ConfigError, match="mmsmall import"):
        llm_hidden_size(cfg)  # what ZeRO-3 asks first: it cannot read a stock folder partitioned


def test_max_crops_and_dtype(imported):
    from mmsmall.inference.predictor import Predictor

    img = image(5).resize((160, 120))
    few, many = Predictor(str(imported), max_crops=1), Predictor(str(imported))
    assert few.max_crops == 1 and many.max_crops == 3
    n_few = few.processor.encode_prompt(img, "q")["pixel_values"].shape[0]
    n_many = many.processor.encode_prompt(img, "q")["pixel_values"].shape[0]
    assert n_few < n_many  # crops (plus the low-res view) follow --max-crops
    half = Predictor(str(imported), dtype="bf16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert len(half.predict([img], ["What is the color?"], max_new_tokens=3)) == 1
    with pytest.raises(ValueError, match="valid: fp32, bf16, fp16"):
        Predictor(str(imported), dtype="int8")
    path = imported.parent / "chat.png"
    img.save(path)
    args = ["--model", str(imported), "--image", str(path), "--max-new-tokens", "3"]
    proc = _run("chat", "What is the color?", *args, "--dtype", "bf16", "--max-crops", "1", "--device", "cpu")
    expected = Predictor(str(imported), dtype="bf16", max_crops=1).predict([img], ["What is the color?"], 3)[
        0
    ]
    assert proc.returncode == 0 and proc.stdout.strip() == expected, proc.stderr[-2000:]


def test_fine_tuning_an_import_trains_in_its_own_chat_template(imported):
    """A sample's conversations become one chat in the checkpoint's template: the prompt is token for
    token the eval prompt (at the training crop count), the targets are each answer and the end of its
    turn, whole conversations drop from the end to fit, and a template that cannot be split is refused."""
    import dataclasses

    from mmsmall.export.load import load_model
    from mmsmall.inference.chat_template import ChatTemplateProcessor
    from mmsmall.inference.template_training import TemplateTrainingProcessor

    vlm = load_model(imported)
    tok, cfg = vlm.tokenizer, vlm.cfg.image
    assert vlm.cfg.prompt == "chat_template"
    img = image(3)
    convs = [
        [{"role": "user", "content": "What color?"}, {"role": "assistant", "content": "red"}],
        [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "3"},
         {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes"}],
    ]  # fmt: skip
    ex = TemplateTrainingProcessor(tok, cfg).encode(img, convs, sample_id="s0")
    prompt = ChatTemplateProcessor(tok, dataclasses.replace(cfg, max_crops_eval=cfg.max_crops)).encode_prompt(
        img, "What color?"
    )
    n = len(prompt["input_ids"])
    assert torch.equal(ex["input_ids"][:n], prompt["input_ids"])
    assert torch.equal(ex["pixel_values"], prompt["pixel_values"])
    targets = ex["input_ids"][ex["labels"] != -100]
    assert tok.decode(targets) == "red<|im_end|>\n3<|im_end|>\nyes<|im_end|>\n"
    assert tok.decode(ex["input_ids"][n:]).startswith("red<|im_end|>\n<|im_start|>user\nHow many?")

    short = TemplateTrainingProcessor(tok, cfg, max_length=len(ex["input_ids"]) - 1)
    cut = short.encode(img, convs, sample_id="s1")
    assert tok.decode(cut["input_ids"][cut["labels"] != -100]) == "red<|im_end|>\n"
    assert short.counters == {"dropped_conversations": 1}
    with pytest.raises(ValueError, match="max_length"):
        TemplateTrainingProcessor(tok, cfg, max_length=n).encode(img, convs[:1])
    with pytest.raises(ValueError, match="s2.*no assistant answer to train on"):  # never a silent loss of 0
        TemplateTrainingProcessor(tok, cfg).encode(img, [convs[0][:1]], sample_id="s2")

    odd = tok.__class__.from_pretrained(imported)  # a template that renders the turns out of order
    odd.chat_template = "{% for m in messages | reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="model.prompt=mmsmall"):
        TemplateTrainingProcessor(odd, cfg).encode(None, convs[1:])

    from mmsmall.config import ConfigError
    from mmsmall.export.release import run_export

    out = imported.parent / "refused_release"
    with pytest.raises(ConfigError, match="--format molmo2"):  # our HF processor would prompt it wrongly
        run_export(imported, out, fmt="mmsmall")
    assert not out.exists()  # refused before anything is written


@pytest.mark.slow
def test_a_run_from_an_import_trains_and_is_evaluated_in_molmo2_pointing_text(imported, tmp_path):
    """Molmo2 points as ``<points coords=...>``: the import records it, a fine-tune started from it
    (data.point_format left unset) trains its pointing answers in that text and saves a model that
    says so, and ``mmsmall eval`` on that model records the format it scored."""
    import io

    import yaml
    from test_eval_tasks import make_pointing
    from test_train import _env

    from data_tools.shards import ShardWriter
    from mmsmall.export.load import load_model
    from mmsmall.inference.template_training import TemplateTrainingProcessor
    from mmsmall.processing.points import render_points
    from mmsmall.train.preflight import check_run

    assert yaml.safe_load((imported / "model_config.yaml").read_text())["point_format"] == "molmo2"
    shards = tmp_path / "shards"
    with ShardWriter(shards, prefix="pts", max_count=8) as w:
        for i in range(8):
            buf = io.BytesIO()
            image(40 + i).save(buf, "PNG")
            answer = render_points([(0.25, 0.5), (0.75, 0.125)][: 1 + i % 2], "dot")  # Molmo's text
            msgs = [
                {"role": "user", "content": "Point to the dots."},
                {"role": "assistant", "content": answer},
            ]
            w.write(
                f"pts_{i:03d}", buf.getvalue(), "png", {"id": f"p{i}", "task": "pointing", "messages": msgs}
            )
    out = tmp_path / "run"
    args = [f"out_dir={out}", f"data.train=[{{path: {shards}}}]", f"train.init_from={imported}",
            "train.steps=2", "train.save_every=0", "train.tensorboard=false", "train.micro_batch_size=2",
            "train.grad_accum=1", "train.precision=fp32", "data.seq_len=384"]  # fmt: skip
    cfg, _ = check_run("configs/train/tiny-finetune.yaml", args, probe_lock=False)
    assert cfg.data.point_format == "molmo2"  # followed the model
    vlm = load_model(imported)
    proc = TemplateTrainingProcessor(vlm.tokenizer, vlm.cfg.image, point_format=cfg.data.point_format)
    convs = [[{"role": "user", "content": "Point to the dots."},
              {"role": "assistant", "content": render_points([(0.25, 0.5), (0.75, 0.125)], "dot")}]]  # fmt: skip
    ex = proc.encode(image(40), convs, sample_id="p")
    targets = vlm.tokenizer.decode(ex["input_ids"][ex["labels"] != -100])
    assert targets == '<points coords="1 1 250 500 2 750 125">dot</points><|im_end|>\n'

    cmd = ["bash", str(ROOT / "launch" / "train.sh"), "configs/train/tiny-finetune.yaml", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["point_format"] == "molmo2"
    assert yaml.safe_load((out / "model" / "model_config.yaml").read_text())["point_format"] == "molmo2"

    data = make_pointing(tmp_path / "pointing")
    res = _run("eval", "--model", str(out / "model"), "--tasks", "pointing", "--data", f"pointing={data}",
               "--out", str(tmp_path / "eval"), "--device", "cpu", "--max-new-tokens", "4", "--num-workers", "0")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["point_format"] == "molmo2"
    metrics = results["tasks"]["pointing"]["metrics"]
    assert {"read_molmo2", "read_molmo", "points_outside"} <= set(metrics)


def test_imported_stock_answers_multi_image_prompts_as_stock_generate(stock, imported, tmp_path):
    """Several images in one prompt (issue 25): stock ``generate`` on the stock folder, with the
    images as consecutive image parts of one user turn (how transformers' Molmo2 chat templates
    take several images), against ``mmsmall chat --image A --image B ...`` on the import and the
    Predictor batching prompts of 3, 1 and 2 images together; token for token."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmsmall.inference.predictor import Predictor

    model = AutoModelForImageTextToText.from_pretrained(stock).eval()
    processor = AutoProcessor.from_pretrained(stock)
    question = "Which page shows the total?"
    prompts = [[image(40), image(41), image(42)], [image(43)], [image(44), image(45)]]
    want = []
    for imgs in prompts:
        content = [{"type": "image", "image": im} for im in imgs] + [{"type": "text", "text": question}]
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": content}],
            tokenize=True, add_generation_prompt=True, return_tensors="pt", return_dict=True,
        )  # fmt: skip
        assert inputs["image_grids"].shape[0] == len(imgs)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=BUDGET, do_sample=False)
        want.append(
            processor.tokenizer.decode(
                out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            ).strip()
        )
    assert len(set(want)) > 1  # the answers differ between prompts: the check is sharp
    predictor = Predictor(str(imported))
    assert predictor.predict([p if len(p) > 1 else p[0] for p in prompts], [question] * 3, BUDGET) == want
    paths = []
    for i, im in enumerate(prompts[0]):
        paths += ["--image", str(tmp_path / f"page{i}.png")]
        im.save(tmp_path / f"page{i}.png")
    proc = _run("chat", question, "--model", str(imported), *paths, "--max-new-tokens", str(BUDGET))
    assert proc.returncode == 0 and proc.stdout.strip() == want[0], proc.stderr[-2000:]
