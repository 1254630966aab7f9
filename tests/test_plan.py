"""``mmsmall plan``: model states against DeepSpeed's own estimates, the whole figure against a
peak measured on CPU (torch's MemTracker over a real training step), and the not-fit message."""

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
from test_train import _env, _image  # subprocess env: CPU DeepSpeed, offline, one thread

from mmsmall.config import load_config
from mmsmall.train.monitor import read_log
from mmsmall.train.plan import PlanError, advice, model_shape, plan

ROOT = Path(__file__).resolve().parent.parent
EXE = shutil.which("mmsmall", path=str(Path(sys.executable).parent)) or "mmsmall"
TINY = ROOT / "configs/train/tiny-pretrain.yaml"
WIDE = (  # bench/packing.py's 512-wide LLM: model states weigh as much as activations
    "model.llm.custom={model_type: qwen2, hidden_size: 512, intermediate_size: 1536, num_hidden_layers: 2, "
    "num_attention_heads: 8, num_key_value_heads: 4, max_position_embeddings: 1024, tie_word_embeddings: false}"
)


@pytest.fixture(scope="module")
def tiny_shape():
    return model_shape(load_config(TINY, []))


def test_shape_from_the_meta_build_counts_the_real_model(tiny_shape, tmp_path):
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.tokenizer import build_tokenizer

    cfg = load_config(TINY, [])
    model = VLM(cfg.model, build_tokenizer(cfg.model.tokenizer, cfg.model.llm.name))
    real = {n: sum(p.numel() for p in getattr(model, n).parameters()) for n in ("vision", "connector", "llm")}
    assert tiny_shape.params == real and tiny_shape.trainable == sum(real.values())
    # a later stage (train.init_from) is planned from the folder's model, not the config's
    model.save_pretrained(tmp_path / "stage1")
    wide = load_config(TINY, [WIDE, f"train.init_from={tmp_path / 'stage1'}", "train.freeze=[vision]"])
    later = model_shape(wide)
    assert later.params == real and later.trainable == real["connector"] + real["llm"]


@pytest.mark.parametrize("gpus,nodes", [(8, 1), (4, 2)])
def test_model_states_equal_deepspeeds_estimates(tiny_shape, gpus, nodes, tmp_path):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n, layer = tiny_shape.total, tiny_shape.largest_layer
    cases = {
        "zero2.json": estimate_zero2_model_states_mem_needs(n, gpus, nodes, cpu_offload=False)[1],
        "zero2_offload.json": estimate_zero2_model_states_mem_needs(n, gpus, nodes, cpu_offload=True)[1],
        "zero3.json": estimate_zero3_model_states_mem_needs(n, layer, gpus, nodes, cpu_offload=False)[1],
        "zero3_offload.json": estimate_zero3_model_states_mem_needs(n, layer, gpus, nodes, True, True)[1],
    }
    for config, expected in cases.items():
        cfg = load_config(TINY, ["train.precision=bf16", f"train.deepspeed=configs/deepspeed/{config}"])
        got = sum(plan(cfg, gpus, 80, nodes, shape=tiny_shape).states.values())
        assert abs(got - expected) <= 2, (config, got, expected)  # DeepSpeed rounds to whole bytes
    # ZeRO-3 with only the optimizer offloaded (DeepSpeed's cpu_offload_params=False)
    ds = json.loads((ROOT / "configs/deepspeed/zero3_offload.json").read_text())
    del ds["zero_optimization"]["offload_param"]
    path = tmp_path / "zero3_offload_optimizer.json"
    path.write_text(json.dumps(ds))
    cfg = load_config(TINY, ["train.precision=bf16", f"train.deepspeed={path}"])
    expected = estimate_zero3_model_states_mem_needs(n, layer, gpus, nodes, True, False)[1]
    p = plan(cfg, gpus, 80, nodes, shape=tiny_shape)
    assert abs(sum(p.states.values()) - expected) <= 2 and p.cpu_per_node > 0


def _measured_peak(cfg) -> float:
    """Peak bytes of tensors during a second fp32 training step (the first creates Adam's states)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from mmsmall.model.vlm import VLM
    from mmsmall.processing.processor import Processor, collate
    from mmsmall.processing.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.model.tokenizer, cfg.model.llm.name)
    torch.manual_seed(0)
    model = VLM(cfg.model, tok).train()
    proc = Processor(tok, cfg.model.image, cfg.model.style_prefix, max_length=cfg.data.seq_len)
    rng = np.random.default_rng(0)
    rows = []
    for r in range(cfg.train.micro_batch_size):  # a max-crops image and text up to about seq_len
        image = Image.fromarray(rng.integers(0, 255, (300, 420, 3), dtype=np.uint8))
        answer = " ".join(f"w{i}" for i in range(95))
        conv = [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": answer}]
        rows.append(proc.encode(image, [conv], sample_id=str(r)))
    batch = collate(rows, tok.pad_token_id)
    assert batch["input_ids"].shape[1] > 0.9 * cfg.data.seq_len
    assert batch["pixel_values"].shape[0] == cfg.train.micro_batch_size * (cfg.model.image.max_crops + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)

    def step():
        model(**batch, loss_reduction="sum", keep_logits=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    return float(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


@pytest.mark.parametrize("overrides", [[], [WIDE]], ids=["tiny", "wide"])
def test_plan_is_within_15_percent_of_the_measured_cpu_peak(overrides):
    cfg = load_config(TINY, overrides)
    measured = _measured_peak(cfg)
    planned = plan(cfg, 1, 80, scores_saved=True).total  # a CPU's attention keeps its probabilities
    assert abs(planned - measured) <= 0.15 * measured, (planned / 2**20, measured / 2**20)


def test_a_run_that_does_not_fit_names_what_to_change(tiny_shape):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    args = [EXE, "plan", str(TINY), "train.micro_batch_size=64", "--gpus", "2", "--gpu-mem", "0.1"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("does not fit:") and "train.activation_checkpointing=true" in last
    fit = int(next(x for x in proc.stdout.splitlines() if x.startswith("largest micro-batch")).split()[-1])
    assert 1 <= fit < 64 and f"train.micro_batch_size={fit}" in last
    cfg = load_config(TINY, [f"train.micro_batch_size={fit}"])
    assert plan(cfg, 2, 0.1, shape=tiny_shape).fits  # the advised micro-batch fits
    # model states alone too big: the message points at ZeRO-3 and more GPUs
    message = advice(plan(load_config(TINY, []), 1, 0.001, shape=tiny_shape))
    assert "train.deepspeed=configs/deepspeed/zero3.json" in message and "more GPUs" in message


def test_bad_numbers_are_refused_in_one_line(tiny_shape):
    with pytest.raises(ValueError, match="--gpus 0 --nodes 1 --gpu-mem 80: give positive numbers"):
        plan(load_config(TINY, []), 0, 80, shape=tiny_shape)


# ----------------------------------------------------------------- every shipped config, LoRA, QLoRA

LORA = ROOT / "configs/train/lora-finetune.yaml"


def _cli_plan(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """``mmsmall plan`` offline, with an empty hub cache: nothing can come from the hub."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(cache))
    return subprocess.run([EXE, "plan", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs/train").glob("*.yaml")))
def test_every_shipped_config_plans_offline(config, tmp_path):
    # run from an empty folder: multitask-finetune's stage-1 model (train.init_from) is not there yet
    proc = _cli_plan(str(ROOT / "configs/train" / config), "--gpus", "8", cwd=tmp_path, cache=tmp_path / "hf")
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    verdict = proc.stdout.strip().splitlines()[-1]
    assert verdict == "fits" if proc.returncode == 0 else verdict.startswith("does not fit:"), proc.stdout
    if config == "multitask-finetune.yaml":  # stage 2 before stage 1: the config's own architecture
        assert "train.init_from runs/caption-pretrain/model is not there yet" in proc.stdout


@pytest.fixture(scope="module")
def lora_plans():
    """The shipped LoRA config at its 7B widths on one 80 GiB GPU: full fine-tuning, LoRA, QLoRA."""
    runs = {"full": ["train.lora.enabled=false"], "lora": [], "qlora": ["train.lora.qlora=true"]}
    return {k: plan(load_config(LORA, o), 1, 80) for k, o in runs.items()}


def test_lora_trains_the_adapters_and_the_connector_and_keeps_the_base_frozen(lora_plans):
    full, lora, qlora = lora_plans["full"], lora_plans["lora"], lora_plans["qlora"]
    s = lora.shape
    # rank 32 on q/k/v/o/gate/up/down of every layer: r * (in + out) each, widths from the config
    h, kv, i, r = s.llm_hidden, s.llm_kv_dim, s.llm_intermediate, 32
    adapters = s.llm_layers * r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    assert s.trainable == adapters + s.params["connector"]
    assert full.shape.trainable == full.shape.total == s.total - adapters  # everything trains
    # bf16 under ZeRO-2: every weight in 2 bytes, 16 more per trained parameter (DeepSpeed's accounting)
    assert lora.states == {"params": 2 * s.total, "grads": 6 * s.trainable, "optimizer": 12 * s.trainable}
    # QLoRA: the adapters as LoRA's; every LLM Linear but the head in 4 bits with blockwise statistics
    q = qlora.shape
    assert q.trainable == s.trainable and qlora.states["grads"] == lora.states["grads"]
    head = s.llm_hidden * s.vocab
    assert q.quantized == s.params["llm"] - adapters - 2 * head - _norms(s)
    assert 0.5 < q.quantized_bytes / q.quantized < 0.52  # nf4: 0.5 byte + an 8-bit absmax per 64
    assert qlora.states["params"] == 2 * (s.total - q.quantized) + q.quantized_bytes
    # the order the issue expects, and configs/train/lora-finetune.yaml's claim: LoRA fits one 80 GB GPU
    assert qlora.total < lora.total < full.total
    assert lora.fits and qlora.fits and not full.fits
    assert full.total - lora.total > 14 * full.shape.trainable * 0.9  # the optimizer and grads are gone


def _norms(s) -> int:
    """OLMo-2's RMSNorm weights (four per layer: q, k, post-attention, post-MLP) and the final norm."""
    return s.llm_layers * (s.llm_hidden + s.llm_kv_dim + 2 * s.llm_hidden) + s.llm_hidden


def test_nf4_bytes_are_what_bitsandbytes_stores():
    from torch import nn

    from mmsmall.model.lora import nf4_bytes, quantize_base

    layers = nn.Sequential(nn.Linear(256, 320), nn.Linear(320, 16_448))  # 16_448 x 320: blocks % 256 != 0
    assert quantize_base(layers) == 2
    for layer in layers:
        w, qs = layer.weight, layer.weight.quant_state
        tensors = [w, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
        assert sum(t.numel() * t.element_size() for t in tensors) == nf4_bytes(
            layer.in_features * layer.out_features
        )


def test_bad_numbers_are_refused_by_the_cli_with_one_line(tmp_path):
    proc = _cli_plan(str(TINY), "--gpu-mem", "nan", cwd=ROOT, cache=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "mmsmall plan: could not plan: --gpus 8 --nodes 1 --gpu-mem nan: give positive numbers "
        "(whole GPUs and nodes, GiB of one GPU, e.g. --gpu-mem 80)"
    ]
    for gpu_mem in (float("inf"), 0.0, -80.0):
        with pytest.raises(ValueError, match="give positive numbers"):
            plan(load_config(TINY, []), 8, gpu_mem)


def test_a_model_unknown_offline_cannot_be_planned():
    cfg = load_config(TINY, ["model.llm.custom=null", "model.llm.name=nobody/no-such-llm"])
    with pytest.raises(PlanError, match="model.llm.name='nobody/no-such-llm': no architecture facts offline"):
        plan(cfg, 8, 80)


# 189 M-parameter LLM (4 layers at 2048 wide): its frozen fp32 base (0.76 GB) outweighs the process's
# runtime, and the plan of full fine-tuning (3 GB) is far from LoRA's; trains on CPU in seconds a step
CPU_LORA = [
    "model=configs/model/tiny.yaml",
    "model.llm.custom={model_type: qwen2, hidden_size: 2048, intermediate_size: 5632, num_hidden_layers: 4, "
    "num_attention_heads: 16, num_key_value_heads: 8, max_position_embeddings: 1024, tie_word_embeddings: false}",
    "train.precision=fp32",  # a CPU without AVX-512 BF16 runs bf16 matmuls ~150x slower (bench/real_width.py)
    "data.seq_len=128",
]


def _import_footprint() -> float:
    """Peak resident bytes of a process that imported what a training rank imports and built nothing,
    read as the training loop reads its own peak (``peak_memory_gib``: VmHWM, not ru_maxrss, which a
    child inherits from a test runner that has grown)."""
    code = (
        "import torch, deepspeed, open_clip, peft, transformers, mmsmall.train.loop as loop;"
        "print(loop.peak_memory_gib(torch.device('cpu')) * 2**30)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.slow
def test_lora_plan_against_the_peak_of_a_real_lora_run(tmp_path):
    from data_tools.shards import ShardWriter

    with ShardWriter(tmp_path / "shards", prefix="toy", max_count=8) as w:
        for i in range(8):
            png, caption = _image(i)
            messages = [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": caption}]
            w.write(f"toy_{i:03d}", png, "png", {"id": f"toy{i}", "task": "caption", "messages": messages})
    run = [f"out_dir={tmp_path / 'run'}", f"data.train=[{{path: {tmp_path / 'shards'}}}]", "train.steps=2",
           "train.grad_accum=1", "train.save_every=0", "train.tensorboard=false", "train.log_every=1"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "mmsmall.train", str(LORA), *CPU_LORA, *run], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = max(r["peak_mem_gib"] for r in read_log(tmp_path / "run" / "log.jsonl")) * 2**30
    measured = peak - _import_footprint()  # the plan counts tensors, not Python and its libraries

    lora = plan(load_config(LORA, CPU_LORA), 1, 80, scores_saved=True)  # a CPU keeps attention scores
    full = plan(load_config(LORA, [*CPU_LORA, "train.lora.enabled=false"]), 1, 80, scores_saved=True)
    figures = {
        k: round(v / 2**20) for k, v in (("measured", measured), ("lora", lora.total), ("full", full.total))
    }
    # the frozen base is really there; above the plan by what the resident set holds beyond live
    # tensors: freed activation blocks the allocator keeps (autograd held 14 MB while the first
    # forward raised the resident set by 0.3 GB in a 1024-wide probe), torch.distributed's gloo
    # group; 1.22-1.27x measured on the 2-core machine. Full fine-tuning's accounting fails both bounds
    assert sum(lora.states.values()) <= measured <= 1.5 * lora.total, figures
    assert measured < 0.5 * full.total, figures
