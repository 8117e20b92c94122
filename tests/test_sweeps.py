"""minisd.shapes.sweeps on hand-made records: rates with their intervals, diversity among right pictures only."""

import pytest

from minisd.metrics import wilson_interval
from minisd.shapes import sweeps


def record(prompt, seed, layout, **ok):
    return {"prompt": prompt, "seed": seed, "ok": ok, "layout": layout}


RECORDS = [
    record("a large red circle", 0, ["left", "large", "gray"], colour=True, shape=True, size=True),
    record("a large red circle", 1, ["right", "large", "gray"], colour=True, shape=True, size=True),
    record("a large red circle", 2, ["top", "small", "white"], colour=True, shape=False, size=False),
    record("a small blue square", 0, ["center", "small", "gray"], colour=True, shape=True, size=True),
    record("a small blue square", 1, ["center", "small", "gray"], colour=True, shape=True, size=True),
    record("a red circle on the left and a blue square on the right", 0, None, both=False, colours=True),
]


def test_open_prompts_leave_position_and_background_open():
    prompts = sweeps.open_prompts()
    assert len(prompts) == 36 and len(set(prompts)) == 36
    assert not any(" on " in p or " at " in p or " in " in p for p in prompts)


def test_rate_counts_only_pictures_asked_about():
    assert sweeps.rate(RECORDS, "shape") == (0.8, *wilson_interval(4, 5), 5)
    assert sweeps.rate(RECORDS, "both")[3] == 1
    assert sweeps.rate(RECORDS, "all")[:1] == (0.8,)  # one-object pictures only


def test_rate_refuses_a_factor_nobody_judged():
    with pytest.raises(ValueError, match="background"):
        sweeps.rate(RECORDS, "background")


def test_diversity_leaves_wrong_pictures_out():
    # right pairs: red (left vs right: differ), blue (same layout); the wrong red picture is not counted
    share, low, high, pairs = sweeps.diversity(RECORDS)
    assert (share, pairs) == (0.5, 2) and (low, high) == wilson_interval(1, 2)


def test_agreement_matches_prompt_and_seed():
    live = [dict(RECORDS[0]), dict(RECORDS[2], ok={"colour": True, "shape": True, "size": True})]
    assert sweeps.agreement(live, RECORDS) == 0.5
    with pytest.raises(ValueError, match="stored"):
        sweeps.agreement([record("a green star", 0, None, colour=True)], RECORDS)
