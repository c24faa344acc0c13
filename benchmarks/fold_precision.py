"""How much of a link's update a bf16 knot loses, with and without the float32 master copy (CPU, seconds).

    python benchmarks/fold_precision.py            # -> results/fold_precision.json (+ printed table)

A SmolLM2-135M-shaped q_proj (576x576) and v_proj (192x576) with bf16 weights W0 (gaussian, std 0.02) get
1 or 3 links of rank 8 (alpha 16), each with ||dW_k|| / ||W0|| = ratio, folded by `cola_theory.lm.lora_ops.fold_`
(the chain's knot) into the bf16 weights in place (fp32_master=False) or through a float32 master copy
(`make_master`, the default for bf16/fp16 bases). Reported: the fraction of the update lost,

    ||W_fold - W_exact|| / ||W_exact - W0||,   W_exact = W0 + sum_k dW_k in float64.

With the master copy W_fold is the exact chain rounded ONCE to bf16 (what a bf16 model can hold), however many
knots; in place every knot rounds again, and the smaller the link the more of it is lost.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cola_theory.lm.lora_ops import ADAPTER, add_chain_lora, fold_, lora_layers, make_master  # noqa: E402
from cola_theory.results import atomic_write_text, environment_meta  # noqa: E402

SHAPES = {"q_proj": (576, 576), "v_proj": (192, 576)}  # SmolLM2-135M (out, in)
RATIOS = (1e-3, 1e-2)
KNOTS = (1, 3)
RANK, ALPHA, STD = 8, 16.0, 0.02


class Layers(nn.Module):
    """Just the adapted projections (PEFT wraps them by name, as in a transformers model); W0 holds bf16 values
    whatever `dtype`, so a float32 chain starts from the same weights."""

    def __init__(self, shapes: dict[str, tuple[int, int]], dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, (m, n) in shapes.items():
            lin = nn.Linear(n, m, bias=False)
            with torch.no_grad():
                lin.weight.copy_((torch.randn(m, n, generator=g) * STD).to(torch.bfloat16))  # bf16 values
            setattr(self, name, lin.to(dtype))


def chain_fold(shapes: dict[str, tuple[int, int]], ratio: float, knots: int, master: bool, seed: int = 0,
               dtype: torch.dtype = torch.bfloat16) -> dict[str, dict[str, float]]:
    """Fold `knots` random links (||dW_k|| = ratio ||W0||) into W0 of `dtype`: per layer the lost fraction of the
    update and the folded weights (float64) next to the exact ones."""
    model = add_chain_lora(Layers(shapes, dtype, seed), RANK, ALPHA, list(shapes))
    copy = make_master(model) if master else None
    w0 = {name: layer.get_base_layer().weight.detach().double().clone() for name, layer in lora_layers(model)}
    exact = {k: v.clone() for k, v in w0.items()}
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(knots):
        for name, layer in lora_layers(model):
            A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            a, b = torch.randn(A.shape, generator=g), torch.randn(B.shape, generator=g)
            delta = layer.scaling[ADAPTER] * (b @ a)
            b *= ratio * w0[name].norm().item() / delta.norm().item()
            with torch.no_grad():
                A.copy_(a)
                B.copy_(b)
            exact[name] += (layer.scaling[ADAPTER] * (B.detach().float() @ A.detach().float())).double()
        fold_(model, copy)
    out = {}
    for name, layer in lora_layers(model):
        folded = layer.get_base_layer().weight.detach().double()
        out[name.rsplit(".", 1)[-1]] = {"lost": float((folded - exact[name]).norm() / (exact[name] - w0[name]).norm()),
                     "folded": folded, "exact": exact[name]}
    return out


def measure(shapes: dict[str, tuple[int, int]] = SHAPES, ratios=RATIOS, knots=KNOTS, seed: int = 0) -> list[dict]:
    rows = []
    for ratio in ratios:
        for k in knots:
            with_master = chain_fold(shapes, ratio, k, master=True, seed=seed)
            in_place = chain_fold(shapes, ratio, k, master=False, seed=seed)
            for name in shapes:
                rows.append({"layer": name, "shape": list(shapes[name]), "ratio": ratio, "knots": k,
                             "lost_master": with_master[name]["lost"], "lost_in_place": in_place[name]["lost"]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| layer | ‖dW_k‖ / ‖W‖ per link | knots | update lost, float32 master | update lost, bf16 in place |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} {r['shape'][0]}x{r['shape'][1]} | {r['ratio']:g} | {r['knots']} | "
                     f"{r['lost_master']:.1%} | {r['lost_in_place']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fold_precision.json")
    args = ap.parse_args()
    rows = measure()
    report = {"meta": environment_meta(seed=0, device="cpu"), "rank": RANK, "alpha": ALPHA, "w_std": STD,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
