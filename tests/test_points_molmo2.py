"""Molmo2's pointing text (``<points coords="1 1 523 412 2 100 200">label</points>``) beside Molmo's.

The cases marked *molmo2 tests* are taken from allenai/molmo2
``tests/preprocessing/test_point_formatter.py`` (``test_extract_points``,
``test_extract_multi_image_points``, ``test_html1_image``, ``test_legacy_extract_points``); the
format itself is ``olmo/preprocessing/point_formatter.py`` (``UnifiedPointFormatter``, "html-v1").
The expected pixels are the ones those tests assert, or computed by hand from the format
(per mille of the image size).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmsmall.processing.points import (
    NO_POINTS,
    parse_points,
    read_point_text,
    read_points,
    render_multi_image_points,
    render_points,
    to_point_format,
)

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def _same_points(got, want, w, h) -> bool:
    """One-to-one within the text's rounding: 0.05% of the size (a tenth of a percent rounded,
    or a per mille rounded), plus float error; order aside (ties may sort either way after rounding)."""
    from scipy.optimize import linear_sum_assignment

    if len(got) != len(want):
        return False
    if not want:
        return True
    g, t = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    tol = np.array([0.0005 * w, 0.0005 * h]) * (1 + 1e-9)
    ok = (np.abs(g[:, None, :] - t[None, :, :]) <= tol).all(-1)  # (P, G)
    rows, cols = linear_sum_assignment(ok.astype(float), maximize=True)
    return bool(ok[rows, cols].sum() == len(want))


# ----------------------------------------------------------------------------- Molmo2's own cases


def test_molmo2_tests_extract_points():
    # molmo2 tests: test_extract_points
    text = '<points coords="1 1 900 700 2 900 800">tmp</points>'
    assert parse_points(text, 1000, 1000) == [(900, 700), (900, 800)]
    assert parse_points(text, 100, 50) == [(90, 35), (90, 40)]
    assert parse_points('"1 900 700 2 900 800"', 1000, 1000) == []  # numbers outside a tag are no points
    # '<points label="tmp" x1="0" y1="1"/>' is not Molmo2 text (the Unified formatter finds nothing);
    # Molmo2's eval then falls back to Molmo's reading (LegacyPointFormatting's x/y attribute
    # pattern), which reads it as percent, as ours does
    got = read_point_text('<points label="tmp" x1="0" y1="1"/>', [(1000, 1000)])
    assert got.format == "molmo" and got.points == [(0.0, 10.0)]


def test_molmo2_tests_extract_multi_image_points():
    # molmo2 tests: test_extract_multi_image_points (video timestamps as the index; one frame size,
    # so every group lands on the one image, as there)
    for text in (
        'Counting the <points label="aasdf" coords="0.1 1 900 400 2 911 800"/> shows a total of 2.',
        '<points coords="0.1 1 900 400 2 911 800">aasdf</points>',
    ):
        assert parse_points(text, 1000, 1000) == [(900, 400), (911, 800)]
        assert np.allclose(parse_points(text, 100, 100), [(90.0, 40.0), (91.1, 80.0)])
    for sep in ("\t", ";"):
        text = f'<points coords="0.1 1 900 400 2 911 800{sep}0.2 3 911 600">aasdf</points>'
        assert parse_points(text, 1000, 1000) == [(900, 400), (911, 800), (911, 600)]


def test_molmo2_tests_html1_image_rendering():
    # molmo2 tests: test_html1_image; Molmo2 wraps the tag in "Counting the ... shows a total of N."
    # (its point_then_count mode): the tag itself is what render_points writes
    cases = [
        ([(0.99, 0.8)], "label", '<points coords="1 1 990 800">label</points>'),
        ([(0.911, 0.8), (0.9, 0.4)], "aasdf", '<points coords="1 1 900 400 2 911 800">aasdf</points>'),
        ([(0.9, 0.8), (0.9, 0.7)], "tmp", '<points coords="1 1 900 700 2 900 800">tmp</points>'),
        ([(0.90001, 0.8), (0.9, 0.7)], "tmp", '<points coords="1 1 900 700 2 900 800">tmp</points>'),
    ]
    for pts, label, want in cases:
        assert render_points(pts, label, "molmo2") == want
    assert render_points([], "point", "molmo2") == NO_POINTS  # "There are none."


def test_molmo_text_still_parses_molmo2_legacy_case():
    # molmo2 tests: test_legacy_extract_points (Molmo's text, 360 x 640), expected pixels from there
    text = (
        ' <points x1="23.0" y1="17.7" x2="38.2" y2="24.1" x3="43.5" y3="5.0" x4="44.6" y4="13.8" '
        'x5="54.9" y5="20.4" x6="59.6" y6="7.7" x7="67.9" y7="12.3" x8="75.4" y8="25.0" x9="78.5" '
        'y9="7.7" x10="83.8" y10="20.3" x11="87.4" y11="12.5" x12="97.3" y12="17.3" '
        'alt="purple plates">purple plates</points>'
    )
    want = [
        [82.8, 113.28], [137.52, 154.24], [156.6, 32.0], [160.56, 88.32], [197.64, 130.56],
        [214.56, 49.28], [244.44, 78.72], [271.44, 160.0], [282.6, 49.28], [301.68, 129.92],
        [314.64, 80.0], [350.28, 110.72],
    ]  # fmt: skip
    got = read_point_text(text, [(360, 640)])
    assert got.format == "molmo" and np.allclose(got.points, want, atol=0.1, rtol=0)
    assert parse_points('<point x="12.5" y="50.0" alt="a">a</point>', 200, 100) == [(25.0, 50.0)]


# ----------------------------------------------------------------------------- ours, by hand


def test_issue_example_and_four_digit_edge():
    # the issue's example: per mille of 1000 x 500
    assert parse_points('<points coords="1 1 523 412 2 100 200">mug</points>', 1000, 500) == [
        (523.0, 206.0),
        (100.0, 100.0),
    ]
    # 1000 is the right/bottom edge (four digits), written and read back
    text = render_points([(1.0, 0.0)], "edge", "molmo2")
    assert text == '<points coords="1 1 1000 000">edge</points>'
    assert parse_points(text, 640, 480) == [(640.0, 0.0)]


def test_multi_image_points_land_on_their_own_image():
    text = '<points coords="1 1 900 400 2 911 800\t3 3 500 500">cat</points>'
    got = read_point_text(text, [(1000, 1000), (200, 100), (100, 50)])
    assert got.format == "molmo2" and got.dropped == 0
    assert got.per_image == [[(900.0, 400.0), (911.0, 800.0)], [], [(50.0, 25.0)]]
    # Molmo's text has no image index: its points are the first image's
    molmo = read_point_text('<point x="50.0" y="50.0" alt="a">a</point>', [(100, 100), (10, 10)])
    assert molmo.per_image == [[(50.0, 50.0)], []]


def test_malformed_coords_are_dropped_and_counted():
    cases = {
        '<points coords="1 1 1200 300 2 100 200">a</points>': ([(10.0, 20.0)], 1),  # x over 1000
        '<points coords="1 1 523">a</points>': ([], 1),  # a triplet cut short
        '<points coords="1 1 52 41 2 100 200">a</points>': ([(10.0, 20.0)], 1),  # two-digit coordinates
        '<points coords="1 1 5a3 412">a</points>': ([], 1),  # not a number
        '<points coords="x 1 100 200">a</points>': ([], 1),  # no image index
        '<points coords="1 1 100 200 2 300 400 5">a</points>': ([(10.0, 20.0), (30.0, 40.0)], 1),
    }
    for text, (points, dropped) in cases.items():
        assert read_points(text, 100, 100) == (points, dropped), text
    # several images: an index with no such image drops that image's points
    got = read_point_text(
        '<points coords="1 1 100 100\t3 2 500 500 3 600 600">a</points>', [(10, 10), (10, 10)]
    )
    assert got.per_image == [[(1.0, 1.0)], []] and got.dropped == 2
    got = read_point_text('<points coords="0 1 100 100">a</points>', [(10, 10), (10, 10)])
    assert got.points == [] and got.dropped == 1 and got.format == "molmo2"


coords_soup = st.lists(
    st.sampled_from(
        ["1", "2", " ", "\t", ";", ":", ",", "523", "1000", "1200", "0.1", "x", "-", "99999", ".", "07"]
    ),
    max_size=40,
).map(lambda parts: f'<points coords="{"".join(parts)}">a</points>')


@settings(max_examples=400, deadline=None)
@given(text=coords_soup, n=st.integers(1, 3), w=st.integers(0, 3000), h=st.integers(0, 3000))
def test_malformed_coords_never_raise(text, n, w, h):
    got = read_point_text(text, [(w, h)] * n)
    assert len(got.per_image) == n and got.dropped >= 0
    for x, y in got.points:
        assert 0 <= x <= w and 0 <= y <= h


@settings(max_examples=300, deadline=None)
@given(text=st.text(), w=st.integers(0, 5000), h=st.integers(0, 5000))
def test_any_text_never_raises(text, w, h):
    assert isinstance(read_point_text(text, [(w, h), (h, w)]).points, list)


# ----------------------------------------------------------------------------- round trips


@settings(max_examples=200, deadline=None)
@given(
    pts=st.lists(st.tuples(unit, unit), min_size=1, max_size=6),
    size=st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
    label=st.text(max_size=12),
    fmt=st.sampled_from(["molmo", "molmo2"]),
)
def test_render_parse_round_trip_both_formats(pts, size, label, fmt):
    w, h = size
    got = read_point_text(render_points(pts, label, fmt), [size])
    assert got.format == fmt and got.dropped == 0
    assert _same_points(got.points, [(x * w, y * h) for x, y in pts], w, h)


@settings(max_examples=150, deadline=None)
@given(
    per_image=st.lists(st.lists(st.tuples(unit, unit), max_size=4), min_size=1, max_size=4),
    sizes=st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 3000)), min_size=4, max_size=4),
)
def test_multi_image_round_trip(per_image, sizes):
    sizes = sizes[: len(per_image)]
    text = render_multi_image_points(per_image, "dog")
    if not any(per_image):
        assert text == NO_POINTS
        return
    got = read_point_text(text, sizes)
    assert got.format == "molmo2" and got.dropped == 0
    for pts, found, (w, h) in zip(per_image, got.per_image, sizes):
        assert _same_points(found, [(x * w, y * h) for x, y in pts], w, h)
    ids = [int(t) for group in text.split('"')[1].split("\t") for t in group.split()[1::3]]
    assert ids == list(range(1, len(ids) + 1))  # point ids run on across images, as in Molmo2


def test_render_refuses_unknown_format():
    with pytest.raises(ValueError, match="valid: molmo, molmo2"):
        render_points([(0.5, 0.5)], "a", "molmo3")


def test_molmo_answers_rewrite_in_molmo2_text():
    one = render_points([(0.123, 0.456)], "mug & cup")
    many = render_points([(0.9, 0.1), (0.1, 0.2)], "a <b>")
    text = f"Here: {one} and {many}. {NO_POINTS}"
    got = to_point_format(text, "molmo2")
    assert got == (
        'Here: <points coords="1 1 123 456">mug &amp; cup</points> and '
        '<points coords="1 1 100 200 2 900 100">a &lt;b&gt;</points>. There are none.'
    )
    assert got == (
        f"Here: {render_points([(0.123, 0.456)], 'mug & cup', 'molmo2')} and "
        f"{render_points([(0.9, 0.1), (0.1, 0.2)], 'a <b>', 'molmo2')}. {NO_POINTS}"
    )
    assert to_point_format(text, "molmo") == text
    assert to_point_format(got, "molmo2") == got  # already Molmo2's
    off = '<point x="120.0" y="5.0" alt="a">a</point>'
    assert to_point_format(off, "molmo2") == off  # not a point: left as it is


# ----------------------------------------------------------------------------- scoring


def test_pointing_metric_reads_molmo2_and_scores_each_image_against_its_gold(tmp_path):
    from test_eval_tasks import make_pointing

    from eval.tasks.base import Record, get_task

    task = get_task("pointing")
    recs = task.load(str(make_pointing(tmp_path)), None)
    # (5, 5) px of the 40x30 mask: 125, 167 per mille
    hit = task.score('<points coords="1 1 125 167">sq</points>', recs[0], False)
    assert hit == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "points_outside": 0.0,
                   "read_molmo2": 1.0, "read_molmo": 0.0}  # fmt: skip
    off = task.score('<points coords="1 1 125 167 2 1400 500 3 12">sq</points>', recs[0], False)
    assert off["f1"] == 1.0 and off["points_outside"] == 2.0
    assert task.score("There are none.", recs[1], False)["f1"] == 1.0

    # two images: gold at (20, 20) px on image 1 (100 x 100) and (50, 25) px on image 2 (200 x 100)
    two = Record(
        id="m0", question="Point to the dots.", answers=["2 point(s)"],
        meta={"sizes": [[100, 100], [200, 100]],
              "images": [{"points": [{"label": "", "xy": [[0.2, 0.2]]}]},
                         {"points": [{"label": "", "xy": [[0.25, 0.25]]}]}]},
    )  # fmt: skip
    both = task.score('<points coords="1 1 200 200\t2 2 250 250">dot</points>', two, False)
    assert both["f1"] == 1.0
    # image 2's gold point written on image 1 (same per mille, another image): not a match
    swapped = task.score('<points coords="1 1 200 200 2 250 250">dot</points>', two, False)
    assert swapped["precision"] == 0.5 and swapped["recall"] == 0.5
    assert (
        task.score('<points coords="1 1 200 200\t7 2 250 250">dot</points>', two, False)["points_outside"]
        == 1
    )


# ----------------------------------------------------------------------------- config


def test_point_format_config_key(tmp_path):
    from mmsmall.config import ConfigError, RunConfig, load_config
    from mmsmall.train.stage import folder_point_format, resolve_point_format

    tiny = "configs/train/tiny-finetune.yaml"
    with pytest.raises(ConfigError, match="data.point_format: 'molmo3'; valid: molmo, molmo2"):
        load_config(tiny, ["data.point_format=molmo3"], cls=RunConfig)
    with pytest.raises(ConfigError, match="point_format"):  # a typo in the key names the valid ones
        load_config(tiny, ["data.point_fromat=molmo2"], cls=RunConfig)
    with pytest.raises(ConfigError, match="model.point_format: 'x'; valid: molmo, molmo2"):
        load_config(tiny, ["model.point_format=x"], cls=RunConfig)

    plain = load_config(tiny, [], cls=RunConfig)
    assert resolve_point_format(plain) == "molmo" and plain.model.point_format == "molmo"
    mine = load_config(tiny, ["data.point_format=molmo2"], cls=RunConfig)
    assert resolve_point_format(mine) == "molmo2" and mine.model.point_format == "molmo2"

    stock = tmp_path / "stock"  # a transformers Molmo2 folder
    stock.mkdir()
    (stock / "config.json").write_text(json.dumps({"model_type": "molmo2"}))
    older = tmp_path / "older_import"  # imported before model_config.yaml recorded the format
    older.mkdir()
    (older / "model_config.yaml").write_text("prompt: chat_template\n")
    (older / "import.json").write_text(json.dumps({"format": "molmo2"}))
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "model_config.yaml").write_text("prompt: mmsmall\n")
    assert [folder_point_format(p) for p in (stock, older, ours)] == ["molmo2", "molmo2", "molmo"]
    follow = load_config(tiny, [f"train.init_from={older}"], cls=RunConfig)
    assert resolve_point_format(follow) == "molmo2"
    chosen = load_config(tiny, [f"train.init_from={older}", "data.point_format=molmo"], cls=RunConfig)
    assert resolve_point_format(chosen) == "molmo"  # the run's own choice wins


def test_resume_keeps_the_point_format(tmp_path):
    import yaml

    from mmsmall.config import ConfigError, RunConfig, load_config, save_config, to_dict
    from mmsmall.train.resume import check_resume_config
    from mmsmall.train.stage import resolve_point_format

    tiny = "configs/train/tiny-pretrain.yaml"
    run = load_config(tiny, [], cls=RunConfig)
    resolve_point_format(run)  # as the preflight does
    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    save_config(run, ckpt / "config.yaml")
    assert check_resume_config(run, ckpt) == []
    other = load_config(tiny, ["data.point_format=molmo2"], cls=RunConfig)
    resolve_point_format(other)
    with pytest.raises(ConfigError, match="data.point_format='molmo2' \\(checkpoint: 'molmo'\\)"):
        check_resume_config(other, ckpt)  # the answers' text cannot change under a resume
    old = to_dict(run)  # a checkpoint written before the key existed trained in Molmo's text
    del old["data"]["point_format"], old["model"]["point_format"]
    (ckpt / "config.yaml").write_text(yaml.safe_dump(old))
    assert check_resume_config(run, ckpt) == []


def test_model_point_format_under_init_from_is_refused_naming_the_data_key(tmp_path):
    from data_tools.fixtures import encode, natural_image
    from data_tools.shards import ShardWriter
    from mmsmall.config import ConfigError, ModelConfig, load_config, save_config
    from mmsmall.train.preflight import check_run

    with ShardWriter(tmp_path / "shards", prefix="s", max_count=4) as w:
        msgs = [{"role": "user", "content": "Point to the dot."}, {"role": "assistant", "content": NO_POINTS}]
        w.write("s_000", encode(natural_image(1, (32, 32)), "PNG"), "png", {"id": "s0", "messages": msgs})
    folder = tmp_path / "imported"
    folder.mkdir()
    model = load_config("configs/model/tiny.yaml", cls=ModelConfig)
    model.point_format = "molmo2"  # as `mmsmall import` saves a Molmo2
    save_config(model, folder / "model_config.yaml")
    (folder / "model.safetensors").write_bytes(b"")
    base = [
        f"out_dir={tmp_path / 'run'}",
        f"data.train=[{{path: {tmp_path / 'shards'}}}]",
        f"train.init_from={folder}",
    ]
    with pytest.raises(ConfigError, match="set data.point_format=molmo\\|molmo2"):
        check_run("configs/train/tiny-finetune.yaml", [*base, "model.point_format=molmo"], probe_lock=False)
    cfg, _ = check_run("configs/train/tiny-finetune.yaml", base, probe_lock=False)
    assert cfg.data.point_format == "molmo2"  # the folder's, resolved before any process starts


def test_chat_and_predict_draw_molmo2_points(tmp_path):
    from PIL import Image

    from mmsmall.inference.chat import answer_record

    blank = Image.new("RGB", (50, 40))
    rec = answer_record(
        "m2", blank, "Point.", '<points coords="1 1 500 500 2 1200 100">dot</points>', tmp_path
    )
    assert rec["points"] == [[25.0, 20.0]] and rec["points_outside"] == 1 and rec["drawn"] == "m2.png"
    assert Image.open(tmp_path / "m2.png").width > 50  # drawn, enlarged
