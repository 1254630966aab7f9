"""`mmsmall demo`: the whole pipeline on an embedded default, on CPU, in minutes.

synthesize (scenes for counting/pointing + charts) -> curate into shards with the HTML report ->
train a tiny VLM with DeepSpeed ZeRO-2 through launch/train.sh -> evaluate on held-out synthetic
sets, and again with every image blanked (the blind baseline) -> export a release folder ->
draw pointing predictions -> print one results table with where every artifact lies.

Every step reuses what a previous run finished (same seeds give the same shards; curation and
training resume; eval predictions are cached), so a second run is fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo; `quick` is the shortened version the test suite runs."""

    n_scenes_train: int
    n_scenes_eval: int
    n_charts_train: int
    n_charts_eval: int
    train_steps: int
    eval_limit: int


FULL = DemoPlan(
    n_scenes_train=2000,
    n_scenes_eval=200,
    n_charts_train=200,
    n_charts_eval=40,
    train_steps=1500,
    eval_limit=200,
)
QUICK = DemoPlan(
    n_scenes_train=48, n_scenes_eval=16, n_charts_train=8, n_charts_eval=8, train_steps=4, eval_limit=16
)

# The tasks the demo trains for: "How many shapes are there?" and "Point to all the shapes." over
# 1-4 large red circles (data_tools.synth.scenes.EASY_COUNT), learnable by a tiny random-init
# model in minutes on CPU. Charts ride along in the mixture and are evaluated too, honestly.
SCENES = {"question_types": ["count", "point"]}
EVAL_TASKS = {"synth_scenes_count": "scenes", "synth_scenes_point": "scenes", "synth_charts": "charts"}


def _step(name: str):
    print(f"\n=== {name}", flush=True)
    return time.time()


def _synthesize(out: Path, plan: DemoPlan) -> dict[str, Path]:
    from data_tools.synth import generate
    from data_tools.synth.scenes import EASY_COUNT

    jobs = {
        "scenes_train": ("scenes", plan.n_scenes_train, "train", {**EASY_COUNT, **SCENES}),
        "scenes_eval": ("scenes", plan.n_scenes_eval, "eval", {**EASY_COUNT, **SCENES}),
        "charts_train": ("charts", plan.n_charts_train, "train", {}),
        "charts_eval": ("charts", plan.n_charts_eval, "eval", {}),
    }
    paths = {}
    for name, (kind, n, split, opts) in jobs.items():
        path = out / "synth" / name
        manifest = path / "manifest.json"
        if not _same_synth(manifest, kind, n, split, opts):  # same seed and settings: identical shards
            generate(kind, n=n, seed=0, out=path, split=split, shard_size=1000, **opts)
        paths[name] = path
        print(f"  {name}: {n} samples in {path}")
    return paths


def _same_synth(manifest: Path, kind: str, n: int, split: str, opts: dict) -> bool:
    """Whether ``manifest`` records exactly this generation (seed 0), so its shards can be reused."""
    if not manifest.exists():
        return False
    data = json.loads(manifest.read_text())
    done = data.get("synth", {})
    return (
        data.get("total") == n
        and (done.get("kind"), done.get("split"), done.get("seed")) == (kind, split, 0)
        and all(done.get("options", {}).get(k) == v for k, v in opts.items())
    )


def _curate(out: Path, synth: dict[str, Path]) -> tuple[Path, dict]:
    from data_tools.curate import run_curation

    curated = out / "curated"
    train_inputs = ", ".join(
        f"{{kind: webdataset, path: {synth[k]}}}" for k in ("scenes_train", "charts_train")
    )
    benchmarks = ", ".join(f"{{path: {synth[k]}}}" for k in ("scenes_eval", "charts_eval"))
    return curated, run_curation(
        REPO_ROOT / "configs/curate/demo.yaml",
        overrides=(f"inputs=[{train_inputs}]", f"out_dir={curated}", f"decontam.benchmarks=[{benchmarks}]"),
        workers=1,
    )


def _train(out: Path, curated: Path, plan: DemoPlan) -> Path:
    run_dir = out / "run"
    env = dict(os.environ, NPROC="1", DS_ACCELERATOR="cpu")
    cmd = [
        "bash",
        str(REPO_ROOT / "launch/train.sh"),
        str(REPO_ROOT / "configs/train/demo.yaml"),
        f"out_dir={run_dir}",
        f"train.steps={plan.train_steps}",
        f"data.train=[{{path: {curated}, rate: 1.0}}]",
    ]
    print("  " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO_ROOT)
    return run_dir


def run_demo(out: str | Path, quick: bool = False) -> dict:
    """Run the demo into ``out`` and return the results table as a dict."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = QUICK if quick else FULL
    t_start = time.time()

    t = _step("1/6 synthesize scenes and charts (train and held-out eval splits)")
    synth = _synthesize(out, plan)
    print(f"  {time.time() - t:.0f} s")

    t = _step("2/6 curate into webdataset shards + HTML report")
    curated, summary = _curate(out, synth)
    print(
        f"  kept {summary['n_kept']} of {summary['n_in']} samples -> {curated}; report: {summary['report']}"
    )
    print(f"  {time.time() - t:.0f} s")

    t = _step("3/6 train the tiny VLM with DeepSpeed ZeRO-2 on CPU (launch/train.sh)")
    run_dir = _train(out, curated, plan)
    print(f"  {time.time() - t:.0f} s")

    t = _step("4/6 export a release folder")
    from mmsmall.export import run_export

    release = run_export(run_dir, out / "release", fmt="mmsmall")
    print(f"  {release}  ({time.time() - t:.0f} s)")

    t = _step("5/6 evaluate on held-out synthetic sets, with images and blind")
    from eval.report import compare
    from eval.runner import evaluate

    data = {task: str(synth[f"{kind}_eval"]) for task, kind in EVAL_TASKS.items()}
    seen = evaluate(
        str(release), list(EVAL_TASKS), str(out / "eval" / "model"), data=data, limit=plan.eval_limit
    )
    blind = evaluate(
        str(release),
        list(EVAL_TASKS),
        str(out / "eval" / "blind"),
        data=data,
        limit=plan.eval_limit,
        blind=True,
    )
    chart_png = out / "eval" / "model_vs_blind.png"
    compare([out / "eval" / "model" / "results.json", out / "eval" / "blind" / "results.json"], chart_png)
    print(f"  {time.time() - t:.0f} s")

    t = _step("6/6 draw pointing predictions on held-out scenes")
    from mmsmall.export.chat import predict

    points_dir = out / "pointing_predictions"
    predict(str(release), str(synth["scenes_eval"]), str(points_dir), limit=16)
    print(f"  {time.time() - t:.0f} s")

    table = _results_table(seen, blind)
    artifacts = {
        "curation report": Path(summary["report"]),
        "loss curve": run_dir / "loss.png",
        "eval chart": chart_png,
        "pointing predictions": points_dir,
        "release": release,
        "eval results": out / "eval" / "model" / "results.json",
    }
    _print_summary(table, artifacts, time.time() - t_start)
    result = {"table": table, "artifacts": {k: str(v) for k, v in artifacts.items()}}
    (out / "demo_results.json").write_text(json.dumps(result, indent=2))
    return result


def _score(results: dict, task: str) -> float:
    return float(results["tasks"][task]["score"])


def _results_table(seen: dict, blind: dict) -> list[dict]:
    rows = []
    for task in EVAL_TASKS:
        s, b = _score(seen, task), _score(blind, task)  # results.json scores are percentages
        rows.append({"task": task, "model": round(s, 1), "blind": round(b, 1), "gain": round(s - b, 1)})
    return rows


def _print_summary(table: list[dict], artifacts: dict, seconds: float) -> None:
    print("\n=== results (held-out synthetic sets, accuracy %)")
    print(f"| {'task':<20} | {'model':>6} | {'blind':>6} | {'gain':>6} |")
    print(f"|{'-' * 22}|{'-' * 8}|{'-' * 8}|{'-' * 8}|")
    for r in table:
        print(f"| {r['task']:<20} | {r['model']:>6.1f} | {r['blind']:>6.1f} | {r['gain']:>+6.1f} |")
    print("\n=== artifacts")
    for name, path in artifacts.items():
        print(f"  {name:<22} {path}")
    print(f"\ndemo finished in {seconds / 60:.1f} min")
    sys.stdout.flush()
