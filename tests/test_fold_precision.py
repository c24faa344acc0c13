"""bf16 knots: with the float32 master copy a bf16 chain ends at the float32 chain's W rounded once to bf16.

Derivation (why EXACT equality): fold_ computes the link's update dW_k in float32 from float32 adapter factors;
with the master copy it adds dW_k to a float32 copy of W (master <- master + dW_k) and copies master into the
bf16 W (one round-to-nearest). A float32 chain from the same W0 does W <- W + dW_k with the same float32 adds,
so master == W_float32 bitwise after every knot, and the bf16 W == W_float32.to(bf16) exactly. In place, every
knot rounds W to bf16 again, so the error grows with the number of knots.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import fold_precision as fp
finally:
    sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("ratio", [1e-3, 1e-2])
def test_bf16_chain_with_master_is_the_float32_chain_rounded_once(ratio):
    """SmolLM2-135M's q_proj (576x576) and v_proj (192x576), a 3-link chain (rank 8)."""
    f32 = fp.chain_fold(fp.SHAPES, ratio, knots=3, master=False, dtype=torch.float32)
    master = fp.chain_fold(fp.SHAPES, ratio, knots=3, master=True, dtype=torch.bfloat16)
    in_place = fp.chain_fold(fp.SHAPES, ratio, knots=3, master=False, dtype=torch.bfloat16)
    for name in fp.SHAPES:
        ref = f32[name]["folded"].float()  # the float32 chain's W
        assert torch.equal(master[name]["folded"].float(), ref.to(torch.bfloat16).float())
        err_master = (master[name]["folded"] - ref.double()).norm()
        err_in_place = (in_place[name]["folded"] - ref.double()).norm()
        assert err_in_place > 1.15 * err_master, (name, float(err_in_place), float(err_master))
        assert f32[name]["lost"] < 1e-4  # float32 weights keep all of the update but float32 rounding


def test_one_knot_rounds_once_either_way():
    one_master = fp.chain_fold(fp.SHAPES, 1e-2, knots=1, master=True)
    one_in_place = fp.chain_fold(fp.SHAPES, 1e-2, knots=1, master=False)
    for name in fp.SHAPES:
        assert torch.equal(one_master[name]["folded"], one_in_place[name]["folded"])


def test_benchmark_rows_and_markdown():
    rows = fp.measure(shapes={"q_proj": (64, 64)}, ratios=(1e-2,), knots=(1, 3))
    assert [(r["knots"], r["layer"]) for r in rows] == [(1, "q_proj"), (3, "q_proj")]
    assert rows[0]["lost_master"] == rows[0]["lost_in_place"] and rows[1]["lost_master"] < rows[1]["lost_in_place"]
    assert "float32 master" in fp.markdown(rows)
