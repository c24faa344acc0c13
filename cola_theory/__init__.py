"""cola_theory: Chain of LoRA (Xia, Qin & Hazan 2024) as code - one chain engine, two backends.

Notation: W (m x n) weights, W0 pre-trained, Delta = W - W0; a link is (B: m x r, A: r x n) with
update (alpha/r) B A; T total steps; knots = steps where a link is tied into W; eta a Frank-Wolfe step;
K = {||Delta||_* <= tau} with diameter D = 2 tau; beta smoothness; M = f(Delta_1) - min_K f bound.
"""

from cola_theory.bounds import convex_fw_bound, rac_lora_bound, theorem41_bound, theorem41_eta
from cola_theory.chain import ChainBackend, ChainResult, run_chain
from cola_theory.config import ChainConfig, Link, knots_from_epochs, link_plan, lr_at
from cola_theory.frank_wolfe import fw_gap, nuclear_lmo
from cola_theory.matrix_backend import MatrixBackend
from cola_theory.problems import make_problem

__all__ = [
    "ChainBackend", "ChainConfig", "ChainResult", "Link", "MatrixBackend", "convex_fw_bound", "fw_gap",
    "knots_from_epochs", "link_plan", "lr_at", "make_problem", "nuclear_lmo", "rac_lora_bound", "run_chain",
    "theorem41_bound", "theorem41_eta",
]
__version__ = "0.1.0"
