"""The runner with the real tiny model: answers do not depend on batch size, and equal Predictor's."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from test_eval_tasks import img_cell, make_chartqa_parquet, write_parquet

from eval.runner import evaluate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def predictor():
    from mmsmall.config import ModelConfig, load_config
    from mmsmall.inference.predictor import Predictor
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)
    return Predictor(VLM(cfg, build_tokenizer(cfg.tokenizer)))


def _responses(out: Path) -> dict[str, str]:
    lines = (out / "predictions" / "chartqa.jsonl").read_text().splitlines()
    return {json.loads(x)["id"]: json.loads(x)["response"] for x in lines}


def test_same_answers_at_batch_1_and_8(tmp_path, predictor):
    data = {"chartqa": str(make_chartqa_parquet(tmp_path / "c", n=9))}
    kw = dict(data=data, max_new_tokens=8, show_progress=False)
    evaluate(predictor, ["chartqa"], tmp_path / "b1", batch_size=1, num_workers=0, **kw)
    res8 = evaluate(predictor, ["chartqa"], tmp_path / "b8", batch_size=8, num_workers=1, **kw)
    b1, b8 = _responses(tmp_path / "b1"), _responses(tmp_path / "b8")
    assert len(b1) == 9 and b1 == b8
    assert any(b1.values())  # the random model does say something
    assert 0.0 <= res8["tasks"]["chartqa"]["score"] <= 100.0

    # the runner's worker-side encoding path answers exactly as Predictor.predict does
    from eval.tasks import get_task

    task = get_task("chartqa")
    recs = task.load(data["chartqa"], None)
    direct = predictor.predict(
        [r.load_image() for r in recs], [task.prompt(r, False) for r in recs], max_new_tokens=8, batch_size=1
    )
    assert direct == [b1[r.id] for r in recs]


def test_blind_feeds_grey_images_of_the_same_size(tmp_path, predictor):
    data = {"chartqa": str(make_chartqa_parquet(tmp_path / "c", n=4))}
    kw = dict(data=data, max_new_tokens=6, show_progress=False, num_workers=0, batch_size=4)
    evaluate(predictor, ["chartqa"], tmp_path / "seen", **kw)
    evaluate(predictor, ["chartqa"], tmp_path / "blind", blind=True, **kw)
    blind = _responses(tmp_path / "blind")
    # every image is the same grey square size, so the blind answers only depend on the question text
    from PIL import Image

    from eval.runner import BLIND_GREY
    from eval.tasks import get_task

    task = get_task("chartqa")
    recs = task.load(data["chartqa"], None)
    grey = [Image.new("RGB", r.load_image().size, BLIND_GREY) for r in recs]
    expected = predictor.predict(grey, [task.prompt(r, False) for r in recs], max_new_tokens=6, batch_size=4)
    assert [blind[r.id] for r in recs] == expected


def _run_cli(args: list[str]):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "eval", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
def test_cli_killed_mid_run_resumes_with_identical_scores(tmp_path, predictor):
    """The real entry point, SIGKILLed while generating, then rerun: same final results."""
    import time

    model_dir = tmp_path / "model"
    predictor.model.save_pretrained(model_dir)
    data = str(make_chartqa_parquet(tmp_path / "c", n=40))
    args = ["--model", str(model_dir), "--tasks", "chartqa", "--data", f"chartqa={data}", "--batch-size", "1",
            "--num-workers", "0", "--max-new-tokens", "24"]  # fmt: skip

    cache = tmp_path / "killed" / "predictions" / "chartqa.jsonl"
    proc = _run_cli([*args, "--out", str(tmp_path / "killed")])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if cache.exists() and len(cache.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0].decode()[-2000:]
    proc.kill()
    proc.wait()
    done_at_kill = len(cache.read_text().splitlines())
    assert 3 <= done_at_kill < 40

    resumed = _run_cli([*args, "--out", str(tmp_path / "killed")])
    full = _run_cli([*args, "--out", str(tmp_path / "full")])
    for p in (resumed, full):
        out = p.communicate(timeout=300)[0].decode()
        assert p.returncode == 0, out[-2000:]
    r_res = json.loads((tmp_path / "killed" / "results.json").read_text())["tasks"]["chartqa"]
    r_full = json.loads((tmp_path / "full" / "results.json").read_text())["tasks"]["chartqa"]
    assert r_res["n_generated"] <= 40 - done_at_kill + 1  # only what was missing (plus a torn line)
    assert r_res["metrics"] == r_full["metrics"] and r_res["n"] == 40
    assert _responses(tmp_path / "killed") == _responses(tmp_path / "full")


def test_cache_refuses_new_weights_or_data_in_the_same_places(tmp_path, predictor):
    """Re-exported weights in the same folder, or new task data at the same path, never reuse old answers."""
    from eval.tasks import EvalDataError

    model_dir, out = tmp_path / "model", tmp_path / "out"
    predictor.model.save_pretrained(model_dir)
    data_dir = make_chartqa_parquet(tmp_path / "c", n=4)
    kw = dict(data={"chartqa": str(data_dir)}, num_workers=0, max_new_tokens=4, show_progress=False)
    assert evaluate(str(model_dir), ["chartqa"], out, **kw)["tasks"]["chartqa"]["n_generated"] == 4
    assert evaluate(str(model_dir), ["chartqa"], out, **kw)["tasks"]["chartqa"]["n_generated"] == 0

    weight = next(p for p in predictor.model.parameters() if p.ndim == 2)
    with torch.no_grad():
        weight.add_(1.0)
    try:
        predictor.model.save_pretrained(model_dir)  # new weights, same folder
    finally:
        with torch.no_grad():
            weight.sub_(1.0)
    with pytest.raises(EvalDataError, match="weights"):
        evaluate(str(model_dir), ["chartqa"], out, **kw)

    fresh = tmp_path / "out2"
    assert evaluate(str(model_dir), ["chartqa"], fresh, **kw)["tasks"]["chartqa"]["n_generated"] == 4
    table = pq.read_table(data_dir / "data" / "test-00000-of-00001.parquet").to_pydict()
    table["image"] = [img_cell(i + 7) for i in range(4)]  # other charts, same file, same ids and questions
    write_parquet(data_dir / "data" / "test-00000-of-00001.parquet", table)
    with pytest.raises(EvalDataError, match="data"):
        evaluate(str(model_dir), ["chartqa"], fresh, **kw)


def test_runner_generates_through_the_engine(tmp_path, predictor, monkeypatch):
    """A Predictor's answers come from the serving engine (its static ``answer`` is never called),
    at most ``batch_size`` prompts in flight, each answer the one ``predict`` gives at batch 1."""
    from eval.tasks import get_task
    from mmsmall.inference.predictor import Predictor
    from mmsmall.serve.engine import Engine

    data = {"chartqa": str(make_chartqa_parquet(tmp_path / "c", n=5))}
    task = get_task("chartqa")
    recs = task.load(data["chartqa"], None)
    direct = predictor.predict(
        [r.load_image() for r in recs], [task.prompt(r, False) for r in recs], max_new_tokens=5, batch_size=1
    )
    running = []
    step = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: (step(self), running.append(self.max_running)))

    def static(*a, **k):
        raise AssertionError("the runner answered a static batch")

    monkeypatch.setattr(Predictor, "answer", static)
    evaluate(predictor, ["chartqa"], tmp_path / "out", data=data, max_new_tokens=5, batch_size=3,
             num_workers=1, show_progress=False)  # fmt: skip
    assert [_responses(tmp_path / "out")[r.id] for r in recs] == direct
    assert max(running) == 3  # three in flight, then the last two joined
