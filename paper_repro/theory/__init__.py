"""Theory experiments T1-T5: bounds measured on synthetic problems (CPU, seconds to a minute).

Each module has `run(out_dir, size="full"|"smoke", force=False) -> list[Path]` (CSV + JSON + Markdown under
out_dir/theory/, skipped when a valid result with the same config exists) and `plot(out_dir, fig_dir)`
(PNG + PDF from the saved results only).

| id | module                 | checks                                                            |
|----|------------------------|-------------------------------------------------------------------|
| T1 | t1_theorem41           | COLA Theorem 4.1: idealized COLA's average FW gap vs its bound     |
| T2 | t2_convex_fw           | classical FW rate 2 beta D^2/(t+2) on convex problems             |
| T3 | t3_residual_gap        | LoRA vs COLA (2/3/4/8 links) vs full FT at a fixed step budget    |
| T4 | t4_rank_stepdown       | 2 links, rank 8 then 2/4/6/8, vs LoRA rank 8                      |
| T5 | t5_rac_counterexample  | LoRA/COLA diverge at 1/L on rac_quadratic; RAC-LoRA bounds        |
"""

from paper_repro.theory import (
    t1_theorem41,
    t2_convex_fw,
    t3_residual_gap,
    t4_rank_stepdown,
    t5_rac_counterexample,
)

EXPERIMENTS = {
    "T1": t1_theorem41,
    "T2": t2_convex_fw,
    "T3": t3_residual_gap,
    "T4": t4_rank_stepdown,
    "T5": t5_rac_counterexample,
}

__all__ = ["EXPERIMENTS"]
