"""The shortened demo end to end through the real entry point (`mmsmall demo --quick`):
synthesize -> curate -> DeepSpeed training via launch/train.sh (with in-training eval) -> export ->
eval (+ other images, grey images, chance) -> pointing predictions, with every artifact the summary
names on disk; and the full demo: every family is read from its image (the verdict), on any CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    exe = shutil.which("mmsmall", path=str(Path(sys.executable).parent)) or "mmsmall"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    out = tmp_path / "demo"
    proc = subprocess.run(
        [exe, "demo", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== results" in proc.stdout and "synth_scenes_count" in proc.stdout

    from mmsmall.demo import EVAL_TASKS, results_markdown

    result = json.loads((out / "demo_results.json").read_text())
    tasks = {row["task"] for row in result["table"]}
    assert tasks == set(EVAL_TASKS) == {
        "synth_scenes_count", "synth_scenes_point", "synth_charts", "synth_docs", "synth_clocks"
    }  # fmt: skip
    assert results_markdown(result["table"]) in proc.stdout  # the table README.md shows is this one
    evals = [json.loads(line) for line in (out / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4] and all(f"eval/{t}" in evals[-1] for t in EVAL_TASKS)
    for row in result["table"]:
        assert all(0.0 <= row[k] <= 100.0 for k in ("model", "chance", "other", "blind"))
        assert row["over_blind"] == round(row["model"] - max(row["other"], row["blind"]), 1)
    for name, path in result["artifacts"].items():
        assert Path(path).exists(), f"demo artifact {name} missing: {path}"
    assert (out / "release" / "config.json").exists() and (out / "release" / "README.md").exists()
    assert json.loads((out / "eval" / "blind" / "results.json").read_text())["blind"] is True
    assert json.loads((out / "eval" / "other_images" / "results.json").read_text())["other_images"] is True
    assert (out / "run" / "log.jsonl").read_text().count("\n") >= 1

    # a second run into the same folder (README: "a second make demo reuses ...") finishes and
    # prints the same table, reusing the shards, the curation and the finished training run
    again = subprocess.run([exe, "demo", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert results_markdown(json.loads((out / "demo_results.json").read_text())["table"]) == results_markdown(
        result["table"]
    )
    assert "resume: from" in again.stdout + again.stderr


@pytest.mark.slow
def test_full_demo_reads_every_image(tmp_path, monkeypatch):
    """The README's claim: from seed 0, on any CPU, the demo's model reads every family's image:
    on each held-out set (counting, pointing, charts, receipts, clocks) it beats both blind
    baselines (each question asked about another sample's image; grey images) by >= 20 points and
    the set's chance level by >= 15. Floats round differently on other instruction sets and 3,000
    steps amplify it, so the scores themselves are checked only against the spread measured over
    instruction sets (README.md, bench/demo.py --isa all): within that range widened by its own
    width on each side, at least 10 points (two sampling standard deviations of a score on 100
    held-out samples), not against one machine's table."""
    from mmsmall.demo import EVAL_TASKS, results_markdown, run_demo, verdict

    # The suite's other worker keeps a core busy: OpenMP threads that spin at their barriers lose
    # much of their time to it (0.183 s/step spinning against 0.125 passive, one core busy; alone,
    # spinning is faster: 0.086 against 0.149). How threads wait changes no float.
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    result = run_demo(tmp_path / "demo", quick=False)
    rows = {row["task"]: row for row in result["table"]}
    assert set(rows) == set(EVAL_TASKS)
    table = results_markdown(result["table"])
    failed = verdict(result["table"])
    assert not failed, f"families not read from the image: {failed}\n{table}"
    spread = _readme_spread()
    assert set(spread) == set(rows), f"README.md's demo spread names other tasks:\n{table}"
    outside = {}
    for task, row in rows.items():
        lo, hi = spread[task]
        width = max(hi - lo, 10.0)
        if not lo - width <= row["model"] <= hi + width:
            outside[task] = (row["model"], (lo, hi))
    assert not outside, f"scores outside README.md's measured spread {outside}:\n{table}"


def test_readme_table_passes_its_own_verdict():
    """The table README.md shows is one run of the demo and holds the claim it states."""
    from mmsmall.demo import EVAL_TASKS, verdict

    shown = _readme_table()
    assert set(shown) == set(EVAL_TASKS)
    assert not verdict(list(shown.values()))
    for task, (lo, hi) in _readme_spread().items():
        assert lo <= hi and lo - max(hi - lo, 10.0) <= shown[task]["model"] <= hi + max(hi - lo, 10.0)


KEYS = ("model", "chance", "other", "blind", "over_chance", "over_blind")


def _readme_table() -> dict[str, dict]:
    """task -> row of the results table in README.md's demo section."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("=== results") :].split("```", 1)[0]
    out = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 + len(KEYS) and cells[0].startswith("synth_"):
            out[cells[0]] = {"task": cells[0], "metric": cells[1], **dict(zip(KEYS, map(float, cells[2:])))}
    return out


def _readme_spread() -> dict[str, tuple[float, float]]:
    """task -> (lowest, highest) model score over the instruction sets measured, from the spread
    table in README.md's demo section (rows ``| synth_x | ... | lo–hi |``, the range last)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("=== spread") :].split("```", 1)[0]
    out = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith("synth_"):
            lo, hi = cells[-1].replace("–", "-").split("-")
            out[cells[0]] = (float(lo), float(hi))
    return out
