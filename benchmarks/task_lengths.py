"""Token lengths of the MeZO samples per task (real data), the input of the GPU grid projection.

python benchmarks/task_lengths.py  ->  benchmarks/results/task_lengths.json
Tokenizer: SmolLM2's (offline). OPT's BPE and Llama's SentencePiece give lengths within ~10-20% of it;
the projection in gpu_bench.py states this.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from cola_theory.lm.data import MissingSplitError, sample_protocol
from cola_theory.lm.models import load_model
from cola_theory.lm.scoring import collate, encode_example
from cola_theory.lm.tasks import TASK_NAMES
from cola_theory.results import atomic_write_text

OUT = Path(__file__).parent / "results" / "task_lengths.json"


def main() -> None:
    _, tok, note = load_model("smollm2-135m", device="cpu")
    out = {"tokenizer": note, "tasks": {}}
    for task in TASK_NAMES:
        try:
            sample = sample_protocol(task, seed=0)
            fallback = False
        except MissingSplitError:
            sample = sample_protocol(task, seed=0, split_validation_as_train=True)
            fallback = True
        row = {"fallback_split": fallback, **{f"n_{k}": len(v) for k, v in sample.items()}}
        for split in ("train", "test"):
            enc = [encode_example(tok, ex, 4096) for ex in sample[split]]
            row[f"{split}_tokens_per_example"] = statistics.mean(sum(len(s) for s in e.input_ids) for e in enc)
            # what the model really processes: one sequence per example when candidates share a prefix
            row[f"{split}_model_tokens_per_example"] = statistics.mean(
                int(collate([e])["attention_mask"].sum()) for e in enc)
            row[f"{split}_candidates"] = statistics.mean(len(e.input_ids) for e in enc)
            row[f"{split}_max_len"] = max(e.max_len for e in enc)
        out["tasks"][task] = row
        print(task, {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
    atomic_write_text(OUT, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
