"""ChainConfig validation and the knot schedule (property-based)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cola_theory.config import ChainConfig, knots_from_epochs, link_plan, lr_at, parse_reset


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 500), m=st.integers(1, 12))
def test_even_links_cover_the_budget(T, m):
    if m > T:
        with pytest.raises(ValueError, match="n_links"):
            ChainConfig(total_steps=T, n_links=m)
        return
    plan = link_plan(ChainConfig(total_steps=T, n_links=m))
    assert len(plan) == m and plan[0].start == 0 and plan[-1].end == T
    assert all(a.end == b.start for a, b in zip(plan, plan[1:]))
    assert all(link.end > link.start for link in plan)  # no empty link
    assert max(link.end - link.start for link in plan) - min(link.end - link.start for link in plan) <= 1


@settings(max_examples=60, deadline=None)
@given(T=st.integers(3, 400), data=st.data())
def test_explicit_knots(T, data):
    knots = sorted(data.draw(st.sets(st.integers(1, T - 1), min_size=1, max_size=min(6, T - 1))))
    ranks = data.draw(st.lists(st.integers(1, 16), min_size=len(knots) + 1, max_size=len(knots) + 1))
    cfg = ChainConfig(total_steps=T, knots=tuple(knots), rank=tuple(ranks), n_links=99)
    plan = link_plan(cfg)
    assert cfg.n_links == len(knots) + 1  # explicit knots win over n_links
    assert [link.start for link in plan[1:]] == knots
    assert [link.rank for link in plan] == ranks


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 10, "n_links": 0}, "n_links"),
        ({"total_steps": 10, "knots": (5, 3)}, "knots"),
        ({"total_steps": 10, "knots": (0, 5)}, "knots"),
        ({"total_steps": 10, "knots": (5, 10)}, "knots"),
        ({"total_steps": 10, "knots": (4, 4)}, "knots"),
        ({"total_steps": 10, "rank": 0}, "rank"),
        ({"total_steps": 10, "rank": (8, 2)}, "rank"),  # 2 ranks for 1 link
        ({"total_steps": 10, "optimizer_reset": "sometimes"}, "optimizer_reset"),
        ({"total_steps": 10, "optimizer_reset": "magnitude:1.5"}, "optimizer_reset"),
        ({"total_steps": 10, "optimizer_reset": "random:x"}, "optimizer_reset"),
        ({"total_steps": 10, "lr_schedule": "cosine"}, "lr_schedule"),
        ({"total_steps": 10, "init": "zeros"}, "init"),
        ({"total_steps": 10, "frozen_factor": "both"}, "frozen_factor"),
        ({"total_steps": 10, "lr": -1.0}, "lr"),
        ({"total_steps": 10, "lr": math.nan}, "lr"),
        ({"total_steps": 10, "alpha": 0}, "alpha"),
        ({"total_steps": 10, "warmup_steps": 10}, "warmup_steps"),
        ({"total_steps": 10, "optimizer": "lion"}, "optimizer"),
    ],
)
def test_invalid_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ChainConfig(**kwargs)


def test_rank_larger_than_layer():
    with pytest.raises(ValueError, match="min\\(m, n\\)"):
        ChainConfig(total_steps=10, rank=9).check_rank(8)


def test_parse_reset():
    assert parse_reset("full") == ("full", 1.0)
    assert parse_reset("none") == ("none", 0.0)
    assert parse_reset("magnitude:0.9") == ("magnitude", 0.9)
    assert parse_reset("random:0.999") == ("random", 0.999)


def test_knots_from_epochs():
    assert knots_from_epochs((3, 2), 10) == (50, (30,))
    assert knots_from_epochs((5 / 3,) * 3, 30) == (150, (50, 100))
    with pytest.raises(ValueError, match="epochs_per_link"):
        knots_from_epochs((3, 0), 10)


def test_linear_schedule_is_global_and_restart_is_per_link():
    cfg = ChainConfig(total_steps=100, n_links=4, lr=1.0)
    plan = link_plan(cfg)
    lrs = [lr_at(cfg, t, link) for link in plan for t in range(link.start, link.end)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # one monotone decay across knots
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.01)
    cfg = ChainConfig(total_steps=100, n_links=4, lr=1.0, lr_schedule="restart")
    starts = [lr_at(cfg, link.start, link) for link in link_plan(cfg)]
    assert starts == [1.0] * 4  # every link starts its own schedule


def test_jagged_cosine_rewarms_after_each_knot():
    cfg = ChainConfig(total_steps=200, n_links=4, lr=1.0, lr_schedule="jagged_cosine", restart_warmup_steps=10,
                      min_lr_ratio=0.1)
    plan = link_plan(cfg)
    for link in plan[1:]:
        ramp = [lr_at(cfg, link.start + s, link) for s in range(11)]
        assert ramp[0] == 0.0 and all(a < b for a, b in zip(ramp, ramp[1:-1]))
    assert lr_at(cfg, 199, plan[-1]) == pytest.approx(0.1, abs=1e-3)  # cosine floor


def test_warmup_matches_transformers():
    import torch
    from transformers import get_linear_schedule_with_warmup

    cfg = ChainConfig(total_steps=30, n_links=3, lr=0.5, warmup_steps=5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = get_linear_schedule_with_warmup(opt, 5, 30)
    for link in link_plan(cfg):
        for t in range(link.start, link.end):
            assert lr_at(cfg, t, link) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
            opt.step()
            sched.step()
