"""`run_lm_packed`: a grid of `LMRunConfig`s (learning rates x seeds x reset policies ...) trained in ONE pass over
one frozen base (`cola_theory.lm.packed`), each run written exactly as `run_lm` writes it.

The runs of a pack share everything but `PACK_FREE` (and the per-run chain overrides of `PACK_FREE_CHAIN`):
model, task, protocol sizes, chain shape, batch size, max_length. Each run keeps its own MeZO sample and batch
order (its seed), its own A draws, learning-rate schedule, weight decay, optimizer and reset policy. Evaluation
is packed the same way: run k's examples in run k's block, chunked exactly as `scoring.score_examples` chunks them.
Result files carry `meta.packed = {"size", "index"}`; nothing else tells a packed result from a sequential one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cola_theory.chain import run_chain
from cola_theory.lm import fork, scoring
from cola_theory.lm.packed import PackedChainBackend, merge_batches
from cola_theory.lm.packed_best_dev import PackedBestDev
from cola_theory.lm.run_config import SPEED_ONLY, LMRunConfig
from cola_theory.lm.tasks import Example
from cola_theory.lm.train import (
    base_metrics,
    batch_plan,
    fresh_device,
    inside_root,
    load_base,
    load_sample,
    write_result,
)

PACK_FREE = ("lr", "seed", "weight_decay", "lr_schedule", "optimizer_reset", "zero_shot")
PACK_FREE_CHAIN = ("warmup_steps", "restart_warmup_steps", "min_lr_ratio", "init", "init_std", "fresh_init")


def pack_key(cfg: LMRunConfig) -> tuple:
    """Configs with equal keys can share a pack (a hashable view of every field a pack must share)."""
    d = cfg.to_dict()
    shared = {k: v for k, v in d.items() if k not in PACK_FREE and k not in SPEED_ONLY  # packed runs: eager,
              and k != "chain_overrides"}  # padded per step
    chain = {k: v for k, v in dict(d.get("chain_overrides") or ()).items() if k not in PACK_FREE_CHAIN}
    return tuple(sorted((k, repr(v)) for k, v in {**shared, "chain_overrides": chain}.items()))


def check_lm_packable(cfgs: Sequence[LMRunConfig]) -> None:
    """Raise ValueError naming the first field that differs where a pack needs one value."""
    if not cfgs:
        raise ValueError("run_lm_packed needs at least one LMRunConfig")
    ref = dict(pack_key(cfgs[0]))
    for i, c in enumerate(cfgs):
        if c.compile != "off":
            raise ValueError(f"LMRunConfig.compile={c.compile!r} (run {i}): packed runs are eager; use compile='off'")
        mine = dict(pack_key(c))
        for name in ref:
            if mine.get(name) != ref[name]:
                raise ValueError(f"LMRunConfig.{name} differs within the pack (run 0: {ref[name]}, run {i}: "
                                 f"{mine.get(name)}); only {PACK_FREE} and the chain overrides {PACK_FREE_CHAIN} "
                                 "may differ between the runs of one pack")


class _Encoder:
    """encode_example with a cache: runs of one pack mostly score the same examples."""

    def __init__(self, tok: Any, max_length: int) -> None:
        self.tok, self.max_length, self.cache = tok, max_length, {}

    def __call__(self, ex: Example) -> scoring.EncodedExample:
        if ex not in self.cache:
            self.cache[ex] = scoring.encode_example(self.tok, ex, self.max_length)
        return self.cache[ex]


@torch.no_grad()
def packed_scores(model: torch.nn.Module, encode: _Encoder, examples: Sequence[Sequence[Example]], batch_size: int,
                  pad_id: int, max_length: int) -> list[torch.Tensor]:
    """Run k's (n_k, max_candidates) candidate scores, computed in packed forwards (run k's examples in block k).

    Each run's examples are sorted and chunked exactly as `scoring.score_examples` does; a run with no chunk
    left at some forward fills its block with a padding chunk whose scores are dropped.
    """
    enc = [[encode(ex) for ex in exs] for exs in examples]
    orders = [sorted(range(len(e)), key=lambda i, e=e: -e[i].max_len) for e in enc]
    chunks = [[o[s:s + batch_size] for s in range(0, len(o), batch_size)] for o in orders]
    outs = [torch.full((len(exs), max((len(x.candidates) for x in exs), default=0)), float("-inf"))
            for exs in examples]
    filler = next(e[o[-1]] for e, o in zip(enc, orders) if o)  # the shortest example of a non-empty run
    was_training = model.training
    model.eval()
    try:
        for i in range(max(len(c) for c in chunks)):
            batches = [scoring.collate([enc[k][j] for j in chunks[k][i]] if i < len(chunks[k]) else [filler],
                                       pad_id=pad_id, pad_limit=max_length) for k in range(len(enc))]
            merged, sizes = merge_batches(batches, pad_id)
            scores = scoring.candidate_logprobs(model, merged).cpu()
            start = 0
            for k, n in enumerate(sizes):
                if i < len(chunks[k]):
                    part = scores[start:start + n]
                    outs[k][chunks[k][i], :part.shape[1]] = part[:, :outs[k].shape[1]]
                start += n
    finally:
        model.train(was_training)
    return outs


def run_lm_packed(cfgs: Sequence[LMRunConfig], out_paths: Sequence[str | Path | None] | None = None, *,
                  data_dir: str | None = None, model_bundle: tuple | None = None, device: str | None = None,
                  checkpoint_dir: str | Path | None = None, split_validation_as_train: bool = False,
                  results_root: str | Path | None = None, trunk_root: str | Path | None = None) -> list[dict]:
    """Train the K configs as one pack and write K result files; returns one payload per config, as `run_lm`.

    model_bundle=(model, tokenizer, note) reuses a loaded base (given back untouched: W is never modified).
    checkpoint_dir: knot checkpoints of the whole pack (a killed pack resumes to the same results).
    trunk_root: with a checkpoint_dir, share the first knot's checkpoint with packs of runs that agree, member by
    member, up to it (`cola_theory.lm.fork`).
    """
    cfgs = list(cfgs)
    check_lm_packable(cfgs)
    out_paths = list(out_paths) if out_paths is not None else [None] * len(cfgs)
    if len(out_paths) != len(cfgs):
        raise ValueError(f"out_paths has {len(out_paths)} entries for {len(cfgs)} configs; give one per config")
    out_paths = [inside_root(results_root, p, "out_path") for p in out_paths]
    checkpoint_dir = inside_root(results_root, checkpoint_dir, "checkpoint_dir")
    trunk_root = inside_root(results_root, trunk_root, "trunk_root")
    c0, K = cfgs[0], len(cfgs)
    for c in cfgs:
        print(f"[cola] pack of {K}: {c}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    samples_by_seed: dict[int, dict] = {}
    for c in cfgs:  # the runs of one seed share its sample (the protocol sizes are the pack's)
        if c.seed not in samples_by_seed:
            samples_by_seed[c.seed] = load_sample(c, data_dir, split_validation_as_train)
    samples = [samples_by_seed[c.seed] for c in cfgs]
    model, tok, note = load_base(c0, device, model_bundle)
    encode = _Encoder(tok, c0.max_length)
    pad_id = tok.pad_token_id or 0
    train = [[encode(ex) for ex in s["train"]] for s in samples]
    plans = [batch_plan(c, tr) for tr, c in zip(train, cfgs)]
    steps_per_epoch = plans[0][1]
    chain_cfgs = [c.chain_config(steps_per_epoch) for c in cfgs]

    def batch_fn(t: int) -> list[scoring.CandidateBatch]:
        return [scoring.collate([tr[i] for i in idx(t)], pad_id=pad_id, pad_limit=c0.max_length)
                for tr, (idx, _) in zip(train, plans)]

    def evaluate(split: str, runs: list[int], metric) -> list[float]:
        """metric(scores, examples) of each run's `split`, scored in packed forwards (as score_examples)."""
        examples = [samples[k][split] for k in runs]
        scores = packed_scores(model, encode, examples, c0.eval_batch_size, pad_id, c0.max_length) if runs else []
        return [metric(s, exs) for s, exs in zip(scores, examples)]

    def dev_losses(runs: list[int]) -> list[float]:
        return evaluate("dev", runs, scoring.mean_loss)

    def accuracies(split: str, runs: list[int]) -> list[float]:
        return evaluate(split, runs, scoring.accuracy)

    metrics: list[dict[str, Any]] = [
        {**base_metrics(note, s, steps_per_epoch, chain_cfgs[0].total_steps),
         "fold": "float32 low-rank factors (packed: W is never folded)"} for s in samples]
    zs = [k for k, c in enumerate(cfgs) if c.zero_shot]
    for k, acc in zip(zs, accuracies("test", zs)):  # the untrained base (no adapter attached yet)
        metrics[k]["zero_shot_test_acc"] = acc
    fresh_device(c0, device)
    backend = PackedChainBackend(model, chain_cfgs, batch_fn, target_modules=list(c0.target_modules), pad_id=pad_id,
                                 device=device)
    try:
        ckpt = fork.checkpointer(checkpoint_dir, c0.checkpoint_every, trunk_root, cfgs, chain_cfgs, "packed", device)
        best = None
        if c0.best_dev:  # MeZO's load_best_model_at_end, run by run (cola_theory.lm.packed_best_dev)
            best = PackedBestDev(backend, dev_losses, steps_per_epoch, chain_cfgs[0].total_steps)
            backend.extra_state["best_dev"] = best
        t_train = time.perf_counter()
        result = run_chain(backend, chain_cfgs[0], log_every=1, checkpointer=ckpt, on_step=best)
        train_s = time.perf_counter() - t_train
        forked_at = getattr(ckpt, "forked_at", None)
        histories = backend.run_histories(result.history)
        finished = [k for k in range(K) if backend.diverged[k] is None]
        for k in range(K) if best is not None else ():
            metrics[k].update(best.metrics(k))
            if k in finished:
                metrics[k]["best_dev_restored"] = best.restore_best(k)  # False: the last epoch is the best
        t_eval = time.perf_counter()
        test = dict(zip(finished, accuracies("test", finished)))
        with_dev = [k for k in finished if cfgs[k].eval_dev and samples[k]["dev"]]
        dev = dict(zip(with_dev, accuracies("dev", with_dev)))
        eval_s = time.perf_counter() - t_eval
        n_params = sum(layer.A[0].numel() + layer.B[0].numel() for _, layer in backend.layers)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    finally:
        backend.release()
    wall = time.perf_counter() - t0
    payloads = []
    for k, (cfg, out) in enumerate(zip(cfgs, out_paths)):
        m = metrics[k]
        if forked_at is not None:
            m["forked_at_step"] = forked_at  # the steps before it were trained by a pack of its family
        # times are the pack's, shared equally by its runs (the pack's totals are kept beside them)
        m.update(train_time_s=train_s / K, pack_train_time_s=train_s, trainable_params=n_params,
                 status="diverged" if backend.diverged[k] else "finished", diverged=backend.diverged[k])
        if k in test:
            m["test_acc"] = test[k]
            if k in dev:
                m["dev_acc"] = dev[k]
            m["eval_time_s"], m["pack_eval_time_s"] = eval_s / K, eval_s
        if peak is not None:
            m["peak_mem_gb"] = peak  # the whole pack's peak
        m["wall_time_s"], m["pack_wall_time_s"] = wall / K, wall
        payloads.append(write_result(out, cfg, chain_cfgs[k], histories[k], m, device,
                                     packed={"size": K, "index": k}))
        print(f"[cola] {cfg.task} {cfg.method} lr={cfg.lr:g} seed={cfg.seed} (pack {k + 1}/{K}): "
              f"test_acc={m.get('test_acc')}")
    print(f"[cola] pack of {K} runs: {wall:.0f}s ({wall / K:.1f}s per run)")
    return payloads
