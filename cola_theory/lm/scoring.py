"""Candidate scoring for causal LMs, as MeZO's `--train_as_classification` does it, batched.

MeZO (`utils.encode_prompt`, `utils.forward_wrap_with_option_len`, `run.py::Framework.one_step_pred`):
every candidate is the full text `prompt + candidate`, tokenized as a whole; its option tokens are the last
`len(tok(prompt + candidate)) - len(tok(prompt))` tokens; its score is the MEAN log-probability of those
tokens (length-normalised); training is cross-entropy over the candidates' scores, prediction the argmax.
Sequences longer than `max_length` lose tokens from the left, after the leading special tokens (BOS), as in
MeZO; the candidate itself is never cut (a candidate that cannot fit raises).

Here all candidates of all examples of a batch go through ONE forward pass: right padding + attention mask
(so positions and causal attention of the real tokens are exactly those of the unpadded sequence), and the
LM head + log-softmax run only at the option positions (transformers' `logits_to_keep` with a 2-D index
tensor, when the model honours it; otherwise full logits are sliced).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cola_theory.lm.tasks import Example

CandidateBatch = dict[str, Tensor]  # keys: see `collate`


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of `prompt + candidate` per candidate and how many trailing tokens are the candidate's."""

    input_ids: tuple[tuple[int, ...], ...]
    option_lens: tuple[int, ...]
    label: int

    @property
    def max_len(self) -> int:
        return max(len(ids) for ids in self.input_ids)


def _n_prefix_specials(tokenizer: Any, text: str, ids: list[int]) -> int:
    """How many leading special tokens (BOS) the tokenizer added to `ids` = tokenizer.encode(text)."""
    plain = tokenizer.encode(text, add_special_tokens=False)
    extra = len(ids) - len(plain)
    return extra if extra > 0 and ids[extra:] == plain else 0


def encode_example(tokenizer: Any, example: Example, max_length: int) -> EncodedExample:
    """MeZO's `encode_prompt` for one example (no demonstrations): ids per candidate + option lengths."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is too small: need >= 2 tokens")
    prompt_len = len(tokenizer.encode(example.prompt))
    sequences, option_lens = [], []
    for cand, text in zip(example.candidates, example.texts):
        ids = tokenizer.encode(text)
        option_len = len(ids) - prompt_len
        if option_len < 1:
            raise ValueError(f"{example.task} idx={example.idx}: candidate {cand!r} adds {option_len} tokens to the "
                             "prompt; the tokenizer merges it into the prompt, so it cannot be scored")
        if len(ids) > max_length:
            keep = _n_prefix_specials(tokenizer, text, ids)
            if option_len > max_length - keep:
                raise ValueError(f"{example.task} idx={example.idx}: candidate {cand!r} has {option_len} tokens, "
                                 f"more than max_length={max_length} allows; raise max_length")
            ids = ids[:keep] + ids[keep:][-(max_length - keep):]
        sequences.append(tuple(ids))
        option_lens.append(option_len)
    return EncodedExample(tuple(sequences), tuple(option_lens), example.label)


def shares_prefix(ex: EncodedExample) -> bool:
    """True when every candidate is ONE token after the same prefix (SST-2, RTE, CB, BoolQ, WSC, WiC, MultiRC
    under MeZO's templates): then one forward pass of the prefix scores all candidates exactly."""
    return all(n == 1 for n in ex.option_lens) and len({ids[:-1] for ids in ex.input_ids}) == 1


def collate(batch: Sequence[EncodedExample], pad_id: int = 0, pad_to_multiple_of: int | None = None,
            share_prefix: bool = True, pad_limit: int | None = None) -> CandidateBatch:
    """Right-pad the sequences of a batch: one per candidate, or ONE per example whose candidates are single
    tokens after a common prefix (`shares_prefix`; the candidate token itself is then not fed: the logits at the
    prefix's last position score every candidate). Same scores as one sequence per candidate, 1/C the compute.

    Keys: input_ids, attention_mask (S, L); target_positions (S, K): the positions whose logits are needed;
    per candidate (N = sum of #candidates): cand_seq (N,) its sequence, target_ids, target_mask (N, K): logits at
    target_positions[cand_seq] predict target_ids (mask False = padding), example_index, candidate_index (N,);
    labels, num_candidates (B,). pad_to_multiple_of rounds L up (few shapes for compiled models), at most to
    pad_limit.
    """
    if not batch:
        raise ValueError("collate needs at least one encoded example")
    seqs: list[tuple[tuple[int, ...], list[int]]] = []  # (input ids, positions whose logits are needed)
    cands: list[tuple[int, int, int, tuple[int, ...]]] = []  # (example, candidate, sequence, target ids)
    for b, ex in enumerate(batch):
        if share_prefix and shares_prefix(ex):
            prefix = ex.input_ids[0][:-1]
            seqs.append((prefix, [len(prefix) - 1]))
            cands += [(b, c, len(seqs) - 1, (ids[-1],)) for c, ids in enumerate(ex.input_ids)]
            continue
        for c, (ids, n) in enumerate(zip(ex.input_ids, ex.option_lens)):
            # option tokens are predicted by the logits one step earlier
            seqs.append((ids, list(range(len(ids) - n - 1, len(ids) - 1))))
            cands.append((b, c, len(seqs) - 1, tuple(ids[-n:])))
    L = max(len(ids) for ids, _ in seqs)
    if pad_to_multiple_of:  # never past `pad_limit` (e.g. max_length, the model's position limit)
        L = max(L, min(-(-L // pad_to_multiple_of) * pad_to_multiple_of, pad_limit or 2**62))
    K = max(len(pos) for _, pos in seqs)
    S, N = len(seqs), len(cands)
    input_ids = torch.full((S, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((S, L), dtype=torch.long)
    target_positions = torch.zeros((S, K), dtype=torch.long)
    for s, (ids, pos) in enumerate(seqs):
        input_ids[s, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[s, :len(ids)] = 1
        target_positions[s, :len(pos)] = torch.tensor(pos, dtype=torch.long)
    target_ids = torch.zeros((N, K), dtype=torch.long)
    target_mask = torch.zeros((N, K), dtype=torch.bool)
    for i, (_, _, _, tgt) in enumerate(cands):
        target_ids[i, :len(tgt)] = torch.tensor(tgt, dtype=torch.long)
        target_mask[i, :len(tgt)] = True
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "target_positions": target_positions,
        "target_ids": target_ids, "target_mask": target_mask,
        "cand_seq": torch.tensor([s for _, _, s, _ in cands], dtype=torch.long),
        "example_index": torch.tensor([b for b, *_ in cands], dtype=torch.long),
        "candidate_index": torch.tensor([c for _, c, *_ in cands], dtype=torch.long),
        "labels": torch.tensor([ex.label for ex in batch], dtype=torch.long),
        "num_candidates": torch.tensor([len(ex.input_ids) for ex in batch], dtype=torch.long),
    }


def _device(model: torch.nn.Module) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


def _option_logits(model: torch.nn.Module, batch: Mapping[str, Tensor], use_logits_to_keep: bool) -> Tensor:
    """(S, K, V) logits at the target positions."""
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["target_positions"]
    logits = None
    if use_logits_to_keep:
        try:
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=pos, use_cache=False).logits
        except TypeError:  # a forward without `logits_to_keep`
            logits = None
        if logits is not None and logits.dim() == 3 and logits.shape[:2] == pos.shape:
            return logits  # K < L, so full-length logits never match this shape
    if logits is None or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return torch.take_along_dim(logits, pos[..., None], dim=1)


def candidate_logprobs(model: torch.nn.Module, batch: Mapping[str, Tensor], use_logits_to_keep: bool = True) -> Tensor:
    """(n_examples, max_candidates) mean per-token log-likelihood of each candidate's tokens (float32);
    -inf where an example has fewer candidates. Differentiable; one forward pass for the whole batch."""
    dev = _device(model)
    B, C = batch["labels"].shape[0], int(batch["num_candidates"].max())  # read on the host: no device sync
    batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    logits = _option_logits(model, batch, use_logits_to_keep)  # (S, K, V)
    logp_seq = F.log_softmax(logits.float(), dim=-1)
    seq = batch.get("cand_seq")
    logp_cand = logp_seq if seq is None else logp_seq[seq]  # (N, K, V): candidates that share a prefix share rows
    logp = logp_cand.gather(-1, batch["target_ids"][..., None]).squeeze(-1)
    mask = batch["target_mask"]
    mean = torch.where(mask, logp, torch.zeros_like(logp)).sum(-1) / mask.sum(-1)
    scores = torch.full((B, C), float("-inf"), dtype=mean.dtype, device=dev)
    return scores.index_put((batch["example_index"], batch["candidate_index"]), mean)


def classification_loss(scores: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over candidates (MeZO's train_as_classification loss); -inf scores get 0 mass."""
    return F.cross_entropy(scores, labels.to(scores.device))


def candidate_loss(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The training loss of one collated batch: cross-entropy over the candidates' mean log-likelihoods."""
    return classification_loss(candidate_logprobs(model, batch), batch["labels"])


def predict(scores: Tensor) -> Tensor:
    """Index of the best-scoring candidate per example (ties: the first, like np.argmax)."""
    return scores.argmax(dim=-1)


@torch.no_grad()
def score_examples(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], batch_size: int = 8,
                   max_length: int = 2048, pad_to_multiple_of: int | None = None) -> Tensor:
    """(n, max_candidates) scores for `examples` in their order; batches are formed by length (less padding);
    `pad_to_multiple_of` rounds each batch's length up (few shapes for compiled models / CUDA graphs)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    encoded = [encode_example(tokenizer, ex, max_length) for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: -encoded[i].max_len)
    C = max((len(ex.candidates) for ex in examples), default=0)
    out = torch.full((len(examples), C), float("-inf"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate([encoded[i] for i in chunk], pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of,
                            pad_limit=max_length)
            scores = candidate_logprobs(model, batch).cpu()
            out[chunk, :scores.shape[1]] = scores
    finally:
        model.train(was_training)
    return out


def evaluate_accuracy(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], batch_size: int = 8,
                      max_length: int = 2048, pad_to_multiple_of: int | None = None) -> float:
    """Accuracy of argmax-of-mean-log-prob predictions (MeZO's metric, MultiRC per answer), without gradients."""
    if not examples:
        raise ValueError("evaluate_accuracy needs at least one example")
    return accuracy(score_examples(model, tokenizer, examples, batch_size, max_length, pad_to_multiple_of), examples)


def accuracy(scores: Tensor, examples: Sequence[Example]) -> float:
    """Share of `examples` whose best-scoring candidate (`predict`) is the label; scores (n, max_candidates)."""
    return float((predict(scores) == torch.tensor([ex.label for ex in examples])).float().mean())


def mean_loss(scores: Tensor, examples: Sequence[Example]) -> float:
    """The classification loss of `examples` from their candidate scores (the eval loss best_dev ranks by)."""
    return float(classification_loss(scores, torch.tensor([ex.label for ex in examples])))
