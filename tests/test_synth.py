"""data_tools.synth: determinism, independent answer re-derivation, masks, held-out splits, manifests."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import shutil
import tarfile
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.synth import KINDS, CheckFailed, SynthError, check_disjoint, core, generate, regenerate
from data_tools.synth.gallery import synth_gallery
from data_tools.synth.scenes import EASY_COLOR, EASY_COUNT
from mmsmall.processing.points import parse_points

N = {"charts": 6, "docs": 6, "tables": 6, "clocks": 6, "scenes": 8}
EASY = EASY_COUNT  # the demo's learnable configuration


def _members(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every tar in the folder, in manifest order."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in json.loads((shard_dir / "manifest.json").read_text())["shards"]:
        with tarfile.open(shard_dir / shard["name"]) as tar:
            for m in tar:
                key, _, ext = m.name.rpartition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for kind in N:  # one-image kinds (invoices: tests/test_synth_invoices.py)
        out[kind] = root / kind
        generate(kind, N[kind], seed=7, out=out[kind], shard_size=4)
    return out


def test_registry_has_the_six_kinds():
    assert set(KINDS) == {"charts", "docs", "invoices", "tables", "clocks", "scenes"}


def test_unknown_kind_lists_valid_kinds(tmp_path):
    with pytest.raises(SynthError) as e:
        generate("plots", 2, 0, tmp_path)
    for kind in KINDS:
        assert kind in str(e.value)
    assert "plots" in str(e.value)


def test_unknown_option_lists_valid_options(tmp_path):
    with pytest.raises(SynthError, match=r"unknown option\(s\) colour.*valid options:.*n_colors"):
        generate("scenes", 2, 0, tmp_path, colour="red")
    with pytest.raises(SynthError, match="question_types"):
        generate("scenes", 2, 0, tmp_path, question_types=["dance"])
    with pytest.raises(SynthError, match="image_size must be an integer"):
        generate("scenes", 2, 0, tmp_path, image_size="big")
    # a single name where a list is expected (as `--opt question_types=count` gives) is one item
    m = generate("scenes", 2, 0, tmp_path / "one", question_types="count")
    assert m["synth"]["options"]["question_types"] == ["count"] and m["synth"]["tasks"] == {"counting": 2}


@pytest.mark.parametrize("kind", sorted(N))
def test_manifest_counts_and_schema(shards, kind):
    d = shards[kind]
    manifest = json.loads((d / "manifest.json").read_text())
    members = _members(d)
    assert manifest["total"] == N[kind] == len(members)
    assert [s["count"] for s in manifest["shards"]] == [4] * (N[kind] // 4) + (
        [N[kind] % 4] if N[kind] % 4 else []
    )
    syn = manifest["synth"]
    assert syn["kind"] == kind and syn["seed"] == 7 and syn["split"] == "train"
    assert syn["attempted"] == N[kind] + syn["dropped"] == N[kind] + len(syn["indices_dropped"])
    assert sum(syn["tasks"].values()) == N[kind]
    for key, parts in members.items():
        rec = json.loads(parts["json"])
        img_ext = next(e for e in parts if e != "json")
        assert set(rec) == {"id", "source", "image", "task", "messages", "points", "meta"}
        assert "." not in key and rec["id"] == key and rec["source"] == f"synth/{kind}"
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        im = Image.open(io.BytesIO(parts[img_ext]))
        assert (im.width, im.height) == (rec["image"]["width"], rec["image"]["height"])
        assert re.fullmatch(r"[0-9a-f]{64}", rec["image"]["sha256"]) and re.fullmatch(
            r"[0-9a-f]{16}", rec["image"]["phash"]
        )


@pytest.mark.parametrize("kind", sorted(N))
def test_regenerate_one_sample_byte_for_byte(shards, kind):
    members = _members(shards[kind])
    key = sorted(members)[N[kind] // 2]  # a sample from the middle of the run, built after others
    rec = json.loads(members[key]["json"])
    m = rec["meta"]
    data, again = regenerate(kind, m["seed"], m["split"], m["index"])
    img_ext = next(e for e in members[key] if e != "json")
    assert data == members[key][img_ext]
    assert json.dumps(again, sort_keys=True, ensure_ascii=False).encode() == members[key]["json"]
    # a different seed gives a different image
    assert regenerate(kind, m["seed"] + 1, m["split"], m["index"])[0] != data


# ---------------------------------------------------------------- answers re-derived in the test


def _chart_expected(meta: dict) -> str | None:
    data, a = meta["data"], meta["question"]
    if data["chart_type"] == "scatter":
        pts = data["points"]
        return str(len(pts[a["series"]])) if a["qtype"] == "count" else None
    row = data["values"][a["series"]]
    cats, d = data["categories"], data["decimals"]
    q = a["qtype"]
    if q == "lookup":
        return f"{row[a['cat']]:.{d}f}"
    if q == "extremum":
        best = max(row) if a["highest"] else min(row)
        return cats[row.index(best)]
    if q == "difference":
        return f"{abs(row[a['cat']] - row[a['other']]):.{d}f}"
    if q == "yes_no":
        return "Yes" if row[a["cat"]] > row[a["other"]] else "No"
    if q == "comparison":
        return cats[a["cat"]] if row[a["cat"]] > row[a["other"]] else cats[a["other"]]
    if q == "count":
        return str(len(data["series"]) if a["what"] == "series" else len(cats))
    if q == "trend":
        return "increase" if row[-1] > row[0] else "decrease"
    if q == "ratio":
        return f"{row[a['cat']] / row[a['other']]:.2f}"
    if q == "unanswerable":
        return "unanswerable"
    return None


def _clock_expected(meta: dict) -> str:
    if meta["face"] == "digital":
        hh, mm = meta["display"].split(":")[:2]
        return f"{int(hh) % 12 or 12}:{mm}"
    (cx, cy), (hx, hy), (mx, my) = meta["center"], meta["hour_tip"], meta["minute_tip"]
    minute_deg = math.degrees(math.atan2(mx - cx, cy - my)) % 360
    hour_deg = math.degrees(math.atan2(hx - cx, cy - hy)) % 360
    minute = int(minute_deg / 6 + 1e-3) % 60  # tips are stored to 1e-4 px
    hour = round((hour_deg - minute_deg / 12) / 30) % 12 or 12
    return f"{hour}:{minute:02d}"


def _doc_expected(meta: dict) -> str | None:
    a = meta["question"]
    if meta["doc_type"] in ("receipt", "invoice") and a["qtype"] == "total":
        sub = sum(Decimal(it["unit"]) * it["qty"] for it in meta["items"])
        tax = (sub * Decimal(meta["money"]["tax_rate"]) / 100).quantize(Decimal("0.01"), ROUND_HALF_UP)
        return f"{meta['currency']}{sub + tax:,.2f}"
    if a["qtype"] == "field":
        return meta["fields"][a["key"]]
    if a["qtype"] == "n_items":
        return str(len(meta["items"]))
    return None


def _table_expected(meta: dict) -> str | None:
    t, a = meta["table"], meta["question"]
    if a["qtype"] == "lookup":
        return t["cells"][a["row"]][a["col"]]
    if a["qtype"] == "n_rows":
        return str(len(t["rows"]))
    if a["qtype"] == "count_above":
        return str(sum(r[a["col"]] > a["threshold"] for r in t["values"]))
    if a["qtype"] == "extremum":
        col = [r[a["col"]] for r in t["values"]]
        return t["rows"][col.index(max(col) if a["highest"] else min(col))]
    return None


def _scene_expected(meta: dict) -> str | None:
    q = meta["query"]
    if q["type"] != "count":
        return None
    hits = [o for o in meta["objects"] if all(q.get(k) is None or o[k] == q[k] for k in ("color", "shape"))]
    return str(len(hits))


EXPECTED = {
    "charts": _chart_expected,
    "clocks": _clock_expected,
    "docs": _doc_expected,
    "tables": _table_expected,
    "scenes": _scene_expected,
}


@pytest.mark.parametrize("kind", sorted(N))
def test_answers_recomputed_from_stored_data(kind, tmp_path):
    """Re-derive answers from each record's meta with code written here, not in data_tools."""
    out = tmp_path / kind
    n = {"charts": 24, "docs": 30, "tables": 30, "clocks": 20, "scenes": 30}[kind]
    generate(kind, n, seed=11, out=out, shard_size=100)
    checked = 0
    for parts in _members(out).values():
        rec = json.loads(parts["json"])
        meta, (q, a) = rec["meta"], (m["content"] for m in rec["messages"])
        expected = EXPECTED[kind](meta)
        if expected is not None:
            assert a == expected, (rec["id"], q, a, expected)
            checked += 1
    assert checked >= n // 4, f"only {checked} of {n} {kind} answers had a re-derivable type"


@pytest.mark.parametrize("kind", sorted(N))
def test_check_rejects_a_wrong_answer(kind):
    gen = core.get_generator(kind)
    opts = core.build_options(kind, {})
    for index in range(10):
        _, _, draft = core._build(gen, opts, 3, "train", index)
        try:
            gen.check(draft)
        except CheckFailed:
            continue
        answer = draft.messages[1]["content"]
        first_digit = re.search(r"\d", answer)
        if kind == "clocks":
            h, mm = map(int, answer.split(":"))
            wrong = f"{h % 12 + 1}:{mm:02d}"
        elif first_digit:  # change the value, not only how it is printed
            i = first_digit.start()
            wrong = answer[:i] + str((int(answer[i]) + 1) % 10 or 1) + answer[i + 1 :]
        else:
            wrong = "7"
        draft.messages[1]["content"] = wrong
        with pytest.raises(CheckFailed):
            gen.check(draft)
        return
    pytest.fail(f"no {kind} sample passed its check in 10 tries")


# ---------------------------------------------------------------- scenes: masks and points


def test_points_lie_inside_their_object_masks():
    gen = core.get_generator("scenes")
    opts = core.build_options("scenes", {"question_types": ["point"], "max_objects": 8})
    n_points = 0
    for index in range(25):
        _, rec, draft = core._build(gen, opts, 5, "train", index)
        masks = draft.aux["masks"]  # one (H, W) bool array per object, in meta["objects"] order
        objects = rec["meta"]["objects"]
        h, w = rec["image"]["height"], rec["image"]["width"]
        q = rec["meta"]["query"]
        want = [
            i for i, o in enumerate(objects) if all(q[k] is None or o[k] == q[k] for k in ("color", "shape"))
        ]
        pts = parse_points(rec["messages"][1]["content"], w, h)
        assert len(pts) == len(want) == len(rec["points"][0]["xy"])
        hit = set()
        for x, y in pts:
            inside = [i for i in want if masks[i][min(int(y), h - 1), min(int(x), w - 1)]]
            assert len(inside) == 1, (rec["id"], x, y)
            hit.add(inside[0])
        assert hit == set(want)
        for x, y in rec["points"][0]["xy"]:
            assert any(masks[i][int(y * h), int(x * w)] for i in want)
        n_points += len(pts)
        if not want:
            assert rec["messages"][1]["content"] == "There are none."
    assert n_points > 20


def test_easy_scene_config_is_one_question_with_digit_answers(tmp_path):
    generate("scenes", 40, seed=0, out=tmp_path, **EASY)
    answers = []
    for parts in _members(tmp_path).values():
        rec = json.loads(parts["json"])
        assert rec["image"]["width"] == rec["image"]["height"] == 112
        assert rec["messages"][0]["content"] == "How many shapes are there?"
        assert rec["task"] == "counting"
        answers.append(rec["messages"][1]["content"])
    assert set(answers) <= {"1", "2", "3", "4"} and len(set(answers)) == 4
    colors = set()
    for index in range(30):
        _, rec = regenerate("scenes", 0, "train", index, **EASY_COLOR)
        assert rec["messages"][0]["content"] == "What color is the circle?" and rec["task"] == "vqa"
        colors.add(rec["messages"][1]["content"])
    assert colors == {"red", "blue", "green", "yellow"}


# ---------------------------------------------------------------- held-out split


def test_eval_split_shares_no_image_with_train(tmp_path):
    generate("scenes", 30, seed=0, out=tmp_path / "train", split="train", **EASY)
    generate("scenes", 30, seed=0, out=tmp_path / "eval", split="eval", **EASY)
    report = check_disjoint(tmp_path / "train", tmp_path / "eval")
    assert report == {"train": 30, "eval": 30, "shared": []}
    # the check does catch a leak: a copy of train as "eval" shares every image
    shutil.copytree(tmp_path / "train", tmp_path / "leak")
    with pytest.raises(SynthError, match="30 image"):
        check_disjoint(tmp_path / "train", tmp_path / "leak")
    # same index, different split: different sample
    assert regenerate("scenes", 0, "eval", 0, **EASY)[0] != regenerate("scenes", 0, "train", 0, **EASY)[0]


def test_options_are_recorded_for_regeneration(tmp_path):
    m = generate("scenes", 3, seed=2, out=tmp_path, **EASY)
    opts = m["synth"]["options"]
    assert opts == dataclasses.asdict(core.build_options("scenes", EASY))
    key, parts = sorted(_members(tmp_path).items())[1]
    rec = json.loads(parts["json"])
    assert regenerate("scenes", 2, "train", rec["meta"]["index"], **opts)[0] == parts["png"]


def test_gallery_uses_the_report_format(shards, tmp_path):
    page = synth_gallery(shards["clocks"], tmp_path, n=4)
    text = page.read_text()
    assert page.suffix == ".html" and "data:image/png;base64," in text
    assert text.count("Q: ") == 4 and "A: " in text  # question and answer of each sample
    assert page.with_suffix(".png").exists()
    assert np.asarray(Image.open(page.with_suffix(".png"))).std() > 0


@pytest.mark.parametrize(
    "kind, preset, question, answers",
    [
        ("charts", "EASY_CHART", r"Which category has the (highest|lowest) .+\?", {"North", "East", "South", "West"}),
        ("docs", "EASY_DOC", r"What is the name of the store\?", {"FRESH MART", "Corner Grocer", "QuickStop", "Green Basket"}),
        ("docs", "EASY_ITEMS", r"How many different items are listed on the receipt\?", {str(n) for n in range(2, 8)}),
        ("clocks", "EASY_CLOCK", r"(What|Read).*(time|clock).*", {f"{h}:00" for h in range(1, 13)}),
    ],
)  # fmt: skip
def test_demo_presets_are_real_tasks_checked_like_any_sample(kind, preset, question, answers):
    """The easy presets (charts.EASY_CHART, docs.EASY_DOC / EASY_ITEMS, clocks.EASY_CLOCK): one kind of
    question with a small answer set, and each sample's answer re-derived by its generator's check,
    which refuses a wrong one."""
    import importlib
    import re

    opts = getattr(importlib.import_module(f"data_tools.synth.{kind}"), preset)
    gen, built = core.get_generator(kind), core.build_options(kind, opts)
    built.validate()
    seen = set()
    for index in range(12):
        draft = gen.make(core.sample_rng(kind, 0, "train", index), built)
        gen.check(draft)  # the independent re-check accepts the preset's sample
        q, a = (m["content"] for m in draft.messages)
        assert re.fullmatch(question, q) and a in answers, (q, a)
        seen.add(a)
        wrong = next(x for x in sorted(answers) if x != a)
        draft.messages[1]["content"] = wrong
        with pytest.raises(core.CheckFailed):
            gen.check(draft)
    assert len(seen) >= 3  # the answers vary


def test_clock_with_only_an_hour_hand_reads_from_that_hand():
    """clocks.hour_hand_only (the demo's EASY_CLOCK): one hand is drawn and recorded, the check reads
    the hour from it, and the option refuses faces that would need a minute hand."""
    gen = core.get_generator("clocks")
    opts = core.build_options("clocks", {"image_size": 112, "digital_rate": 0.0, "on_the_hour": True,
                                         "hour_hand_only": True})  # fmt: skip
    for index in range(6):
        draft = gen.make(core.sample_rng("clocks", 0, "train", index), opts)
        assert draft.meta["minute_tip"] is None and draft.meta["seconds_hand"] is False
        gen.check(draft)
        hour = int(draft.messages[1]["content"].split(":")[0])
        draft.messages[1]["content"] = f"{hour % 12 + 1}:00"
        with pytest.raises(core.CheckFailed, match="clock_time"):
            gen.check(draft)
    with pytest.raises(SynthError, match="hour_hand_only needs on_the_hour"):
        core.build_options("clocks", {"hour_hand_only": True}).validate()


def test_receipt_store_name_size_follows_store_scale():
    """docs.store_scale prints the store's name larger (EASY_DOC); out-of-range values are refused."""
    gen = core.get_generator("docs")
    heights = []
    for scale in (1.4, 2.6):
        opts = core.build_options("docs", {"doc_types": ["receipt"], "receipt_questions": ["store"],
                                           "store_scale": scale})  # fmt: skip
        draft = gen.make(core.sample_rng("docs", 0, "train", 3), opts)
        gen.check(draft)
        box = next(b for s, b in draft.aux["drawn"] if s == draft.messages[1]["content"])
        heights.append(box[3] - box[1])
    assert heights[1] > 1.5 * heights[0]
    with pytest.raises(SynthError, match="store_scale"):
        core.build_options("docs", {"store_scale": 5.0}).validate()


def test_chart_lead_makes_the_asked_bar_stand_out():
    """charts.lead / extremum (EASY_CHART): every other bar is at most (1 - lead) of the tallest, the
    question asks for the highest, and tied data that no question fits is drawn again (it recursed
    without end before)."""
    gen = core.get_generator("charts")
    opts = core.build_options("charts", {"chart_types": ["bar"], "question_types": ["extremum"], "dpi": 30,
                                         "categories": ["A", "B", "C", "D"], "extremum": "highest", "lead": 0.3})  # fmt: skip
    for index in range(8):
        draft = gen.make(core.sample_rng("charts", 0, "train", index), opts)
        gen.check(draft)
        row = sorted(draft.meta["data"]["values"][0])
        assert row[-2] <= 0.7 * row[-1] and "highest" in draft.messages[0]["content"]
    with pytest.raises(SynthError, match="extremum"):
        core.build_options("charts", {"extremum": "tallest"}).validate()
    from data_tools.synth import charts

    tied = {"chart_type": "bar", "categories": ["A", "B"], "series": ["Sales"], "values": [[5.0, 5.0]],
            "decimals": 0, "measure": "Sales", "category_noun": "category"}  # fmt: skip
    with pytest.raises(charts._Unaskable):
        charts._question(np.random.default_rng(0), tied, ["extremum"])


def test_grid_scenes_centre_each_object_in_its_own_cell():
    """scenes.grid (the demo's pointing preset): objects sit at distinct cell centres of a k x k
    grid, their points say so, the check passes; sizes that overflow a cell are refused."""
    gen = core.get_generator("scenes")
    opts = core.build_options("scenes", {"image_size": 112, "min_objects": 1, "max_objects": 4, "n_shapes": 1,
                                         "n_colors": 1, "min_object_size": 0.22, "max_object_size": 0.26,
                                         "question_types": ["point"], "query": "all", "background": "plain",
                                         "grid": 3})  # fmt: skip
    centres = {round((i + 0.5) / 3, 3) for i in range(3)}
    for index in range(8):
        draft = gen.make(core.sample_rng("scenes", 0, "train", index), opts)
        gen.check(draft)
        cells = set()
        for o in draft.meta["objects"]:
            x, y = (c / 112 for c in o["center"])
            assert round(x, 3) in centres and round(y, 3) in centres
            assert abs(o["point"][0] - x) < 0.01 and abs(o["point"][1] - y) < 0.01  # the point is the centre
            cells.add((x, y))
        assert len(cells) == len(draft.meta["objects"]) >= 1
    with pytest.raises(SynthError, match="max_object_size must be below 1/grid"):
        core.build_options("scenes", {"grid": 3, "max_objects": 4, "max_object_size": 0.4}).validate()
    with pytest.raises(SynthError, match="grid=2 must be"):
        core.build_options("scenes", {"grid": 2, "max_objects": 5}).validate()
