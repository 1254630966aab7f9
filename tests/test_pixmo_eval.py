"""PixMo eval sets as Molmo scores them: pixmo-points-eval (points in masks) and pixmo-count's
validation / test (human-verified counts, no points).

Fixtures are hub-layout copies built from each card's ``dataset_info`` (tests/test_pixmo.py:
``POINTS_EVAL_CARD`` as https://huggingface.co/datasets/allenai/pixmo-points-eval/blob/e237f0491ca49bf8dec04e06fc0c3807a37ef157/README.md
declares it, ``COUNT_CARD`` as allenai/pixmo-count's); their image URLs are served by a 127.0.0.1
server, fetched by the download stage, and attached with ``python -m eval.attach_images``. Expected
scores are hand-computed from Molmo's ``PointingEval`` / ``PointCountEval`` (allenai/molmo
``olmo/eval/evaluators.py``) and ``PixMoPointsEval.get`` (percent points, ``point_scale=100``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_eval_runner import LookupPredictor
from test_pixmo import COUNT_CARD, POINTS_EVAL_CARD, _hub_copy

from data_tools.download import DownloadConfig, download
from data_tools.fetch import url_key
from data_tools.fixtures import encode, natural_image
from data_tools.httpfixture import LocalServer, Route
from eval.attach_images import attach_images, main
from eval.metrics import molmo_count_scores, molmo_pointing_scores
from eval.runner import evaluate
from eval.tasks import EvalDataError, get_task

ROOT = Path(__file__).resolve().parent.parent
W, H = 120, 90
JPGS = {f"/e{i}.jpg": encode(natural_image(70 + i, (W, H)), "JPEG") for i in range(4)}
PROMPT = "Point to {}"


def _mask(x0: int, y0: int, x1: int, y1: int) -> list:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m.tolist()


@pytest.fixture(scope="module")
def server():
    with LocalServer({p: Route(b) for p, b in JPGS.items()}) as srv:
        yield srv


def _points_eval_copy(root: Path, srv) -> tuple[Path, list[str]]:
    u = [srv.url(p) for p in JPGS]
    rows = {  # a mug (one object), no cat (a negative), two dots, a 404, a wrong sha256
        "image_url": [u[0], u[1], u[2], srv.url("/gone.jpg"), u[3]],
        "image_sha256": [hashlib.sha256(JPGS["/e0.jpg"]).hexdigest(), None, None, None, "0" * 64],
        "label": ["Mug", "cats", "dots", "lost", "bad"],
        "points": [[{"x": 25.0, "y": 50.0}], [], [{"x": 10.0, "y": 10.0}, {"x": 80.0, "y": 80.0}],
                   [{"x": 5.0, "y": 5.0}], [{"x": 5.0, "y": 5.0}]],
        "masks": [[_mask(25, 40, 36, 50)], [_mask(0, 0, 0, 0)], [_mask(8, 5, 16, 13), _mask(90, 66, 102, 78)],
                  [_mask(0, 0, 5, 5)], [_mask(0, 0, 5, 5)]],
    }  # fmt: skip
    return _hub_copy(root, POINTS_EVAL_CARD, {"test": rows}), u


def _attach(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-m", "eval.attach_images", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_pixmo_points_eval_downloaded_attached_and_scored_as_molmo(tmp_path, server, capsys):
    rows, u = _points_eval_copy(tmp_path / "pixmo-points-eval", server)
    task = get_task("pixmo_points_eval")
    with pytest.raises(EvalDataError, match="holds image URLs, not images: attach"):
        task.load(str(rows), None)  # rows with URLs only: the error says what to run

    dl = tmp_path / "dl"
    download(rows, dl, DownloadConfig(url_field="image_url", sha256_field="image_sha256", retries=0))
    out = tmp_path / "attached"
    proc = _attach(str(rows), "--downloads", str(dl), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout)
    assert counts["rows"] == 5 and counts["attached"] == 3
    assert counts["dropped"] == {"fetch_http_404": 1, "fetch_sha256_mismatch": 1}
    assert json.loads((out / "attach.json").read_text())["test"] == counts

    records = task.load(str(out), None)
    assert [r.question for r in records] == [
        "Point to mug\nPlease say 'This isn't in the image.' if it is not in the image.",
        "Point to cats\nPlease say 'This isn't in the image.' if it is not in the image.",
        "Point to dots\nPlease say 'This isn't in the image.' if it is not in the image.",
    ]
    assert records[0].load_image().size == (W, H)

    # gold in pixels: mug (30, 45) in its mask; dots (12, 9) and (96, 72)
    answers = {
        "Point to mug": '<point x="25.0" y="50.0" alt="mug">mug</point>',  # in the mask: 1
        "Point to cats": "There are none.",  # a negative answered with no point: 1
        # Molmo2's text: one dot in its mask (125, 100 per mille -> 15, 9), one far from both: P 0.5, R 0.5
        "Point to dots": '<points coords="1 1 125 100 2 500 500">dots</points>',
    }
    res = evaluate(LookupPredictor(answers), ["pixmo_points_eval"], tmp_path / "ev",
                   data={"pixmo_points_eval": str(out)}, num_workers=0)  # fmt: skip
    m = res["tasks"]["pixmo_points_eval"]["metrics"]
    assert m["precision"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["f1"] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-9)
    assert m["read_molmo2"] == pytest.approx(1 / 3) and m["read_molmo"] == pytest.approx(1 / 3)

    # an images folder keyed as the download stage keys them (sha256 of the URL) attaches the same rows
    keyed = tmp_path / "keyed"
    for url, body in zip(u, JPGS.values()):
        (keyed / url_key(url)[:2]).mkdir(parents=True, exist_ok=True)
        (keyed / url_key(url)[:2] / f"{url_key(url)}.jpg").write_bytes(body)
    again = attach_images(str(rows), tmp_path / "attached2", images=str(keyed))
    assert again["attached"] == 3 and again["dropped"] == {"not_downloaded": 1, "fetch_sha256_mismatch": 1}
    assert [r.question for r in task.load(str(tmp_path / "attached2"), None)] == [r.question for r in records]
    assert main([str(rows), "--downloads", str(keyed), "--out", str(tmp_path / "x")]) == 2
    assert "neither fetch_log.jsonl nor shards" in capsys.readouterr().err  # a folder of images is --images

    # the download stage's webdataset output (shards with each row's json) attaches the same rows
    wds = tmp_path / "dl_wds"
    cfg = DownloadConfig(url_field="image_url", sha256_field="image_sha256", retries=0, output="webdataset")
    download(rows, wds, cfg)
    third = attach_images(str(rows), tmp_path / "attached3", downloads=str(wds))
    assert third["attached"] == 3 and third["dropped"] == {"fetch_http_404": 1, "fetch_sha256_mismatch": 1}
    assert [r.load_image().size for r in task.load(str(tmp_path / "attached3"), None)] == [(W, H)] * 3


def test_molmo_pointing_scores_by_hand():
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 0:3, 0:3] = True
    masks[1, 6:9, 6:9] = True
    gold = [[1.0, 1.0], [7.0, 7.0]]
    ok = molmo_pointing_scores([[1.0, 1.0], [7.4, 7.4]], gold, masks, True)
    assert ok == {"precision": 1.0, "recall": 1.0, "f1": pytest.approx(1.0)}
    # three predictions, two objects: Hungarian pairs two of them by distance; the third is unpaired
    extra = molmo_pointing_scores([[1.0, 1.0], [7.0, 7.0], [4.0, 4.0]], gold, masks, True)
    assert extra["precision"] == pytest.approx(2 / 3) and extra["recall"] == 1.0
    # paired by distance but outside the mask: no hit; 2.6 rounds to 3, just outside the 0..2 mask
    assert molmo_pointing_scores([[2.6, 2.6]], gold[:1], masks[:1], True)["f1"] == 0.0
    assert molmo_pointing_scores([[2.4, 2.4]], gold[:1], masks[:1], True)["f1"] == pytest.approx(1.0)
    assert molmo_pointing_scores([[1.0, 1.0]], gold, masks, False)["f1"] == 0.0  # not a whole pointing answer
    none = np.zeros((0, 10, 10), dtype=bool)
    assert molmo_pointing_scores([], [], none, False) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert molmo_pointing_scores([[1.0, 1.0]], [], none, True)["f1"] == 0.0


def test_valid_pointing_answer_forms():
    from eval.tasks.pixmo_points_eval import valid_point_answer

    assert valid_point_answer(' <point x="10.5" y="20.0" alt="a">a</point> ')
    assert valid_point_answer('<points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="b">b</points>')
    assert valid_point_answer("(10.0, 20.5)\n(3.0, 4.0)")
    assert valid_point_answer('<points coords="1 1 523 412 2 100 200">mug</points>')
    assert not valid_point_answer('There is one: <point x="10.5" y="20.0" alt="a">a</point>')
    assert not valid_point_answer("There are none.")


def test_pixmo_count_val_and_test_are_counts_scored_as_molmo(tmp_path, server):
    u = [server.url(p) for p in JPGS]
    no_points = {"x": [], "y": []}
    splits = {
        "train": {"image_url": [u[0]], "image_sha256": [None], "count": [3], "label": ["car"],
                  "points": [{"x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 3.0]}]},
        "validation": {"image_url": u[:3], "image_sha256": [None] * 3, "count": [5, 2, 10],
                       "label": ["Birds", "cups", "trees"], "points": [None, no_points, None]},
        "test": {"image_url": [u[3]], "image_sha256": [None], "count": [7], "label": ["cups"], "points": [no_points]},
    }  # fmt: skip
    rows = _hub_copy(tmp_path / "pixmo-count", COUNT_CARD, splits)
    dl = tmp_path / "dl"
    download(rows, dl, DownloadConfig(url_field="image_url", sha256_field="image_sha256", retries=0))
    out = tmp_path / "attached"
    proc = _attach(str(rows), "--downloads", str(dl), "--out", str(out), "--split", "validation")
    assert proc.returncode == 0, proc.stderr
    assert attach_images(str(rows), out, downloads=str(dl), split="test")["attached"] == 1  # a second split
    assert set(json.loads((out / "attach.json").read_text())) == {"validation", "test"}

    val = get_task("pixmo_count_val").load(str(out), None)
    assert [(r.question, r.answers) for r in val] == [
        ("How many birds are there?", ["5"]), ("How many cups are there?", ["2"]), ("How many trees are there?", ["10"])]  # fmt: skip
    assert [r.question for r in get_task("pixmo_count_test").load(str(out), None)] == [
        "How many cups are there?"
    ]

    answers = {  # Molmo's answer form, a number word, and a wrong count one away
        "How many birds are there?": 'Counting the <points coords="1 1 100 100 2 200 200">birds</points> shows a total of 5.',
        "How many cups are there?": "two",
        "How many trees are there?": "I count 9.",
    }
    res = evaluate(LookupPredictor(answers), ["pixmo_count_val"], tmp_path / "ev",
                   data={"pixmo_count_val": str(out)}, num_workers=0)  # fmt: skip
    m = res["tasks"]["pixmo_count_val"]["metrics"]
    assert m == {"correct": pytest.approx(2 / 3), "close": 1.0, "valid": 1.0}
    assert res["tasks"]["pixmo_count_val"]["primary"] == "correct"


def test_molmo_count_scores_by_hand():
    assert molmo_count_scores("Counting the <points ...> shows a total of 4.", 4)["correct"] == 1.0
    assert molmo_count_scores("a total of 3 cars here", 3) == {"correct": 1.0, "close": 1.0, "valid": 1.0}
    assert molmo_count_scores("Twenty.", 20)["correct"] == 1.0
    assert molmo_count_scores("There are 9 trees.", 9)["valid"] == 0.0  # Molmo reads the last word only
    assert molmo_count_scores("I cannot tell", 2) == {"correct": 0.0, "close": 0.0, "valid": 0.0}
    assert molmo_count_scores("There are none.", 0)["valid"] == 0.0  # as Molmo: its "none" rule never matches


def test_pixmo_eval_tasks_are_listed():
    from typer.testing import CliRunner

    from mmsmall.cli import app

    out = CliRunner().invoke(app, ["eval", "--list-tasks"])
    assert out.exit_code == 0, out.output
    names = {line.split()[0] for line in out.output.splitlines() if line.strip()}
    assert {"pixmo_points_eval", "pixmo_count_val", "pixmo_count_test"} <= names


def test_pointing_eval_images_are_decontaminated_from_training(tmp_path, server):
    """The attached pixmo-points-eval copy as a decontamination benchmark (``format: auto`` reads its
    image column): a training image equal to an eval image is dropped, as Molmo keeps its pointing
    eval images out of training (``PixMoPoints.download``, ``hold_out_pointing_eval``)."""
    from data_tools.decontam import load_benchmark

    rows, _ = _points_eval_copy(tmp_path / "pixmo-points-eval", server)
    dl = tmp_path / "dl"
    download(rows, dl, DownloadConfig(url_field="image_url", sha256_field="image_sha256", retries=0))
    out = tmp_path / "attached"
    attach_images(str(rows), out, downloads=str(dl))
    items = load_benchmark(out)
    assert len(items) == 3 and all(it["image_bytes"] for it in items)

    from data_tools.curate import run_curation

    train = tmp_path / "train"
    train.mkdir()
    (train / "eval_img.jpg").write_bytes(JPGS["/e0.jpg"])  # an eval image in the training data
    (train / "other.jpg").write_bytes(encode(natural_image(999, (W, H)), "JPEG"))
    (train / "captions.jsonl").write_text(
        "".join(
            json.dumps({"image": n, "caption": "a photo of something"}) + "\n"
            for n in ("eval_img.jpg", "other.jpg")
        )
    )
    summary = run_curation(
        {"inputs": [{"kind": "folder", "path": str(train), "captions": str(train / "captions.jsonl")}], "out_dir": str(tmp_path / "cur"),
         "report": {"enabled": False}, "dedup": {"near": False}, "clip": {"enabled": False},
         "decontam": {"benchmarks": [{"path": str(out), "name": "pixmo_points_eval"}]}},
        workers=1,
    )  # fmt: skip
    assert summary["n_kept"] == 1, summary
    assert sum(v for k, v in summary["dropped"].items() if k.startswith("decontam")) == 1, summary["dropped"]
