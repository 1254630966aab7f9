"""Pointing text: render -> parse round-trip, and parse never raises."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmsmall.processing.points import NO_POINTS, parse_points, read_points, render_points

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    pts=st.lists(st.tuples(unit, unit), min_size=1, max_size=6),
    size=st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
    label=st.text(max_size=12),
)
def test_render_parse_round_trip(pts, size, label):
    w, h = size
    text = render_points(pts, label)
    got = parse_points(text, w, h)
    want = sorted((x * w, y * h) for x, y in pts)
    assert len(got) == len(want)
    for (gx, gy), (wx, wy) in zip(got, want):
        # one decimal of a percent: within 0.05% of the size, plus float rounding
        assert abs(gx - wx) <= 0.0005 * w + 1e-9 * w
        assert abs(gy - wy) <= 0.0005 * h + 1e-9 * h


def test_render_format_and_order():
    assert render_points([], "mug") == NO_POINTS
    assert render_points([(0.123, 0.456)], "mug") == '<point x="12.3" y="45.6" alt="mug">mug</point>'
    two = render_points([(0.9, 0.1), (0.1, 0.2)], 'a "b"')
    assert two == '<points x1="10.0" y1="20.0" x2="90.0" y2="10.0" alt="a &quot;b&quot;">a "b"</points>'
    assert parse_points(NO_POINTS, 100, 100) == []


def test_render_rejects_non_finite():
    with pytest.raises(ValueError):
        render_points([(math.nan, 0.5)], "x")


def test_parse_other_forms():
    assert parse_points("Click(50.0, 25.0)", 200, 100) == [(100.0, 25.0)]
    assert parse_points("at (10, 20) and (300, 5)", 100, 100) == [(10.0, 20.0)]


def test_coordinates_off_the_image_are_not_points():
    text = (
        '<points x1="10.0" y1="20.0" x2="100.5" y2="50.0" x3="-3.0" y3="5.0" x4="50.0" y4="100.0" '
        'alt="a">a</points> <point x="101" y="7" alt="a">a</point>'
    )
    points, dropped = read_points(text, 200, 100)
    assert points == [(20.0, 20.0), (100.0, 100.0)] and dropped == 3  # 0 and 100 are on the edge
    assert parse_points(text, 200, 100) == points
    assert read_points('<point x="250.0" y="9000" alt="a">a</point>', 200, 100) == ([], 1)
    assert read_points('<point x="nan" y="5" alt="a">a</point>', 200, 100) == ([], 0)  # not a number at all
    assert read_points("near (150, 20)", 200, 100) == ([], 0)  # a bare pair off the image is prose


@settings(max_examples=500, deadline=None)
@given(text=st.text(), w=st.integers(0, 10_000), h=st.integers(0, 10_000))
def test_parse_never_raises_on_any_text(text, w, h):
    out = parse_points(text, w, h)
    assert isinstance(out, list)


tag_soup = st.lists(
    st.sampled_from(
        [
            '<point x="',
            '<points x1="',
            '" y="',
            '" y1="',
            "1e999",
            "-5",
            "nan",
            "inf",
            ".",
            "9" * 400,
            '">',
            "</point>",
            "Click(",
            ",",
            ")",
            "(",
            " ",
            'alt="',
            "x2=",
            '"',
        ]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(text=tag_soup, w=st.integers(0, 4000), h=st.integers(0, 4000))
def test_parse_never_raises_on_tag_soup(text, w, h):
    for x, y in parse_points(text, w, h):
        assert isinstance(x, float) and isinstance(y, float)
