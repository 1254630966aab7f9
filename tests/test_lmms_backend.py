"""The lmms-eval backend, run by the real lmms-eval 0.7.3 (in its own venv: tests/lmms_venv.py).

Parity gate: a local copy of ChartQA in the hub layout, run by lmms-eval's own ``chartqa`` task
(``lmms_eval/tasks/chartqa/chartqa.yaml``: prompt, generation settings, ``relaxed_correctness``
scoring) through a task YAML that includes it and points ``dataset_path`` at the copy, gives the
per-sample answers and the scores ``mmsmall eval`` gives. The columns (question, answer, type,
image) are those lmms-eval's ``lmms_eval/tasks/chartqa/utils.py`` reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hub_layout import save_hub_layout
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = "\nAnswer the question with a single word."  # lmms-eval chartqa.yaml's default post_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lmms_python() -> Path:
    from lmms_venv import lmms_venv

    return lmms_venv()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from mmsmall.config import ModelConfig, load_config
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)
    return VLM(cfg, build_tokenizer(cfg.tokenizer)).save_pretrained(tmp_path_factory.mktemp("m") / "model")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (50 + 9 * i, 90 - 4 * i, 3), dtype=np.uint8)) for i in range(n)
    ]


def test_entry_point_registers_the_backend(lmms_python):
    out = subprocess.run(
        [str(lmms_python), "-c", "from lmms_eval.models import get_model; print(get_model('mmsmall'))"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mmsmall.lmms.backend.MmsmallLMM" in out.stdout


@pytest.fixture(scope="module")
def chartqa(lmms_python, model_dir, tmp_path_factory) -> dict:
    """A hub-layout ChartQA copy, an lmms-eval task YAML for it, and what ``mmsmall eval`` says on it."""
    from mmsmall.inference.predictor import Predictor

    tmp = tmp_path_factory.mktemp("chartqa")
    n = 6
    imgs = images(n)
    questions = [f"What is the value of bar {i}?" for i in range(n)]
    said = Predictor(str(model_dir)).predict(imgs, [q + SUFFIX for q in questions], max_new_tokens=16)
    # gold answers: what the model says for two samples, so that the score is not trivially 0
    answers = [said[i] if i in (0, 3) else str(10 * i + 5) for i in range(n)]
    features = datasets.Features(
        {k: datasets.Value("string") for k in ("question", "answer", "type")} | {"image": datasets.Image()}
    )
    rows = {"question": questions, "answer": answers, "image": imgs,
            "type": ["human_test" if i % 2 == 0 else "augmented_test" for i in range(n)]}  # fmt: skip
    data = save_hub_layout(
        datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}), tmp / "chartqa"
    )
    lmms_dir = subprocess.check_output(
        [str(lmms_python), "-c", "import lmms_eval, os; print(os.path.dirname(lmms_eval.__file__))"],
        env=_env(),
        text=True,
    ).strip()
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "chartqa_local.yaml").write_text(
        textwrap.dedent(f"""\
        include: {lmms_dir}/tasks/chartqa/chartqa.yaml
        task: chartqa_local
        dataset_path: {data}
        dataset_kwargs: {{}}
        """)
    )
    ours = tmp / "ours"
    _run(
        [sys.executable, "-m", "mmsmall.cli", "eval", "--model", str(model_dir), "--tasks", "chartqa",
         "--data", f"chartqa={data}", "--out", str(ours)],
        cwd=ROOT,
    )  # fmt: skip
    mine = [json.loads(x) for x in (ours / "predictions" / "chartqa.jsonl").read_text().splitlines()]
    return {
        "tasks": tasks,
        "said": said,
        "answers": {int(m["id"]): m["response"] for m in mine},
        "scores": json.loads((ours / "results.json").read_text())["tasks"]["chartqa"]["metrics"],
    }


def _lmms_eval(
    lmms_python: Path, chartqa: dict, out: Path, *model: str, env: dict | None = None
) -> tuple[dict, dict]:
    """Run ``lmms_eval`` on the local ChartQA task; its per-doc answers and its scores."""
    cmd = [str(lmms_python), "-m", "lmms_eval", *model, "--tasks", "chartqa_local",
           "--include_path", str(chartqa["tasks"]), "--output_path", str(out), "--log_samples"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=out.parent, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples = [
        json.loads(x) for x in next(out.glob("*/*_samples_chartqa_local.jsonl")).read_text().splitlines()
    ]
    answers = {s["doc_id"]: s["filtered_resps"] for s in samples}
    answers = {i: r[0] if isinstance(r, list) else r for i, r in answers.items()}
    scores = json.loads(next(out.glob("*/*_results.json")).read_text())["results"]["chartqa_local"]
    return answers, scores


def _same_as_mmsmall_eval(chartqa: dict, answers: dict, scores: dict) -> None:
    assert answers == chartqa["answers"] and len(answers) == 6
    assert [answers[i] for i in range(6)] == chartqa["said"]
    assert scores["relaxed_overall,none"] == pytest.approx(2 / 6)
    for metric in ("relaxed_overall", "relaxed_human_split", "relaxed_augmented_split"):
        assert chartqa["scores"][metric] == pytest.approx(scores[f"{metric},none"]), metric


def test_lmms_eval_chartqa_gives_the_answers_and_score_of_mmsmall_eval(
    lmms_python, model_dir, chartqa, tmp_path
):
    """``lmms_eval --model mmsmall`` (our backend, batched through the engine)."""
    model = ["--model", "mmsmall", "--model_args", f"pretrained={model_dir},device=cpu", "--batch_size", "4"]
    _same_as_mmsmall_eval(chartqa, *_lmms_eval(lmms_python, chartqa, tmp_path / "out", *model))


def test_lmms_eval_openai_backend_scores_mmsmall_serve_as_mmsmall_eval(
    lmms_python, model_dir, chartqa, tmp_path
):
    """Stock ``lmms_eval --model openai`` pointed at ``mmsmall serve``: same answers and scores."""
    from test_serve import Served

    server = Served(model_dir, "--served-model-name", "tiny")
    try:
        model = ["--model", "openai", "--model_args", f"model=tiny,base_url={server.url},num_concurrent=4"]
        answers, scores = _lmms_eval(
            lmms_python, chartqa, tmp_path / "out", *model, env={"OPENAI_API_KEY": "unused"}
        )
    finally:
        assert server.stop() == 0
    _same_as_mmsmall_eval(chartqa, answers, scores)


BACKEND_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model

model_dir = sys.argv[1]
lm = get_model("mmsmall").create_from_arg_string(
    f"pretrained={model_dir},device=cpu,dtype=bf16,max_crops=1", {"batch_size": "3", "device": None}
)
rng = np.random.default_rng(0)
docs = [{"image": Image.fromarray(rng.integers(0, 255, (60 + 7 * i, 80, 3), dtype=np.uint8))} for i in range(4)]
docs.append({"image": None})
lm.task_dict = {"t": {"test": docs}}
one = lambda doc: [doc["image"]] if doc["image"] is not None else []
two = lambda doc: [doc["image"], doc["image"]]
def inst(i, q, kwargs, visual=one):
    return Instance(request_type="generate_until", arguments=(q, kwargs, visual, i, "t", "test"), idx=0,
                    metadata={"task": "t", "doc_id": i, "repeats": 1})
requests = [inst(i, f"Question {i}?", {"max_new_tokens": 6 + i, "until": ["dw"], "temperature": 0}) for i in range(5)]
answers = lm.generate_until(requests)
multi = lm.generate_until([inst(0, "Two?", {"max_new_tokens": 4}, visual=two)])[0]
try:
    lm.generate_until([inst(0, "A video?", {"max_new_tokens": 4}, visual=lambda doc: ["clip.mp4"])])
    video = "no error"
except NotImplementedError as e:
    video = str(e)
# loglikelihood, fp32: (context, continuation, doc_to_visual, doc_id, task, split)
lm32 = get_model("mmsmall").create_from_arg_string(f"pretrained={model_dir},device=cpu", {"batch_size": "1"})
lm32.task_dict = lm.task_dict
continuations = json.loads(sys.argv[2])
scored = lm32.loglikelihood([
    Instance(request_type="loglikelihood", arguments=(f"Question {i}?", c, one, i, "t", "test"), idx=0,
             metadata={"task": "t", "doc_id": i, "repeats": 1})
    for i, c in continuations
])
print(json.dumps({"answers": answers, "multi": multi, "video": video, "scored": scored}))
"""


def test_backend_class_on_lmms_eval_instances(lmms_python, model_dir):
    """lmms-eval's own ``Instance`` objects: one image or none, stop strings (``until``), dtype and
    crop settings from model_args, a batch of 3; a two-image request answers as Predictor does with
    both images, a video is refused with the reason;
    loglikelihood requests score as one uncached forward pass does."""
    from mmsmall.inference.predictor import Predictor

    predictor32 = Predictor(str(model_dir))
    tok = predictor32.tokenizer
    rng = np.random.default_rng(0)
    docs = [Image.fromarray(rng.integers(0, 255, (60 + 7 * i, 80, 3), dtype=np.uint8)) for i in range(4)] + [
        None
    ]
    # a continuation the model would say itself: the first doc whose greedy words survive decode + encode
    greedy_case = None
    for i, doc in enumerate(docs):
        ids = predictor32.model.generate(
            predictor32.collate([predictor32.encode(doc, f"Question {i}?")]), max_new_tokens=3
        )[0]
        ids = [t for t in ids if t != tok.eos_token_id]
        for n in range(len(ids), 0, -1):
            if tok.encode(tok.decode(ids[:n]), add_special_tokens=False) == ids[:n]:
                greedy_case = (i, tok.decode(ids[:n]))
                break
        if greedy_case:
            break
    assert greedy_case is not None, "no greedy continuation survives the tokenizer round trip"
    continuations = [greedy_case, (0, " 12 apples"), (1, " red"), (4, " Yes")]
    proc = subprocess.run([str(lmms_python), "-c", BACKEND_SCRIPT, str(model_dir), json.dumps(continuations)],
                          env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    predictor = Predictor(str(model_dir), dtype="bf16", max_crops=1)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (60 + 7 * i, 80, 3), dtype=np.uint8)) for i in range(4)] + [
        None
    ]
    want = [
        predictor.predict([im], [f"Question {i}?"], max_new_tokens=6 + i, stop_strings=["dw"])[0]
        for i, im in enumerate(imgs)
    ]
    assert got["answers"] == want
    img0 = imgs[0]
    assert got["multi"] == predictor.predict([[img0, img0]], ["Two?"], max_new_tokens=4)[0]  # both, in order
    assert "gives a str visual (video or audio)" in got["video"]

    # loglikelihood against one uncached forward pass over prompt + continuation (an independent path)
    rng = np.random.default_rng(0)
    docs = [Image.fromarray(rng.integers(0, 255, (60 + 7 * i, 80, 3), dtype=np.uint8)) for i in range(4)] + [
        None
    ]
    for (i, text), (logprob, is_greedy) in zip(continuations, got["scored"]):
        ref, ref_greedy = full_pass_logprob(
            predictor32,
            predictor32.encode(docs[i], f"Question {i}?"),
            tok.encode(text, add_special_tokens=False),
        )
        assert logprob == pytest.approx(ref, abs=1e-4) and is_greedy == ref_greedy
    assert got["scored"][0][1] is True and got["scored"][0][0] < 0  # the model's own greedy words
    assert got["scored"][1][1] is False


def full_pass_logprob(predictor, example: dict, tokens: list[int]) -> tuple[float, bool]:
    """Sum of log-probabilities of ``tokens`` after the prompt, from one forward pass without a cache."""
    n, t = len(tokens), len(example["input_ids"])
    cont = torch.tensor(tokens)
    ex = dict(example)
    ex["input_ids"] = torch.cat([ex["input_ids"], cont])
    ex["position_ids"] = torch.cat([ex["position_ids"], ex["position_ids"][-1] + 1 + torch.arange(n)])
    ex["conv_ids"] = torch.cat([ex["conv_ids"], ex["conv_ids"][-1].repeat(n)])
    ex["labels"] = torch.cat([ex["labels"], torch.full((n,), -100)])
    batch = predictor.collate([ex])
    keys = (
        "input_ids",
        "attention_mask",
        "position_ids",
        "doc_ids",
        "conv_ids",
        "pixel_values",
        "image_token_pooling",
    )
    with torch.no_grad():
        logits = predictor.model(**{k: batch[k] for k in keys if batch.get(k) is not None}).logits[0]
    logp = torch.log_softmax(predictor.model.emittable(logits[t - 1 : t - 1 + n].float()), -1)  # (n, V)
    return float(logp[torch.arange(n), cont].sum()), bool((logp.argmax(-1) == cont).all())
