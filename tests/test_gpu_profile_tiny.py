"""The GPU profile's configs (Tables 1, 2, 4 and Figure 3) run end to end on tiny random models on a CPU.

Each paper artefact's first job is taken from `gpu_jobs()` unchanged except for the model (tiny OPT / Llama with
a character tokenizer) and the data sizes; the chain schedule (links, link epochs, ranks, lr, reset, schedule)
is the paper configuration itself.
"""

import dataclasses

import pytest
import torch
from lm_fixtures import DATA_DIR, needs_data, probe_ids

from cola_theory.config import link_plan
from cola_theory.lm import scoring
from cola_theory.lm.models import load_model
from cola_theory.lm.train import run_lm
from cola_theory.results import load_result
from paper_repro.lm.profiles import gpu_jobs
from paper_repro.lm.runner import tiny_tokenizer

pytestmark = needs_data


def first_job(group: str, task: str | None = None):
    return next(j for j in gpu_jobs() if group in j.groups and (task is None or j.cfg.task == task))


@torch.no_grad()
def correct_one_by_one(model, tokenizer, examples, max_length: int) -> int:
    """MeZO's metric recomputed without batching or padding: one forward pass per candidate, the mean
    log-probability of the candidate's tokens, argmax over candidates; how many equal the gold label."""
    was = model.training
    model.eval()
    right = 0
    for ex in examples:
        enc = scoring.encode_example(tokenizer, ex, max_length)
        scores = []
        for ids, n in zip(enc.input_ids, enc.option_lens):
            logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            scores.append(float(logp[len(ids) - n - 1:len(ids) - 1].gather(1, torch.tensor(ids[-n:])[:, None]).mean()))
        right += int(max(range(len(scores)), key=scores.__getitem__) == ex.label)
    model.train(was)
    return right


@pytest.mark.parametrize("group, task, tiny", [("table1", "rte", "tiny-opt"), ("table2", "cb", "tiny-llama"),
                                               ("table4", "wsc", "tiny-opt"), ("fig3", "sst2", "tiny-llama")])
def test_paper_config_runs_on_a_tiny_model(tmp_path, monkeypatch, group, task, tiny):
    job = first_job(group, task)
    assert job.cfg.model in ("opt-1.3b", "llama-2-7b") and job.cfg.epochs == 5.0  # hub ids via PAPER_MODELS
    cfg = dataclasses.replace(job.cfg, model=tiny, num_train=8, num_dev=4, num_test=6, batch_size=4,
                              eval_batch_size=8, max_length=96)
    model, _, _ = load_model(tiny, device="cpu", tiny_vocab=128)
    tok = tiny_tokenizer()
    with torch.no_grad():
        base_logits = model.eval()(input_ids=probe_ids()).logits

    evaluated = []  # (number of examples, reported accuracy, correct when recomputed, evaluated model != base)
    batched = scoring.evaluate_accuracy

    def recorded(m, tokenizer, examples, *args, **kwargs):
        acc = batched(m, tokenizer, examples, *args, **kwargs)
        was = m.training
        with torch.no_grad():
            trained = not torch.equal(m.eval()(input_ids=probe_ids()).logits, base_logits)
        m.train(was)  # the zero-shot evaluation comes before training: leave dropout as it was
        evaluated.append((len(examples), acc, correct_one_by_one(m, tokenizer, examples, cfg.max_length), trained))
        return acc

    monkeypatch.setattr(scoring, "evaluate_accuracy", recorded)
    payload = run_lm(cfg, tmp_path / "r.json", data_dir=str(DATA_DIR), model_bundle=(model, tok, "tiny"),
                     device="cpu")
    m, chain = payload["metrics"], payload["config"]["chain"]
    assert m["status"] == "finished" and m["sizes"] == {"train": 8, "dev": 4, "test": 6}
    # every accuracy equals the unbatched recomputation; test and dev are of the TRAINED model, zero-shot of the base
    assert all(acc == pytest.approx(right / n, abs=1e-6) for n, acc, right, _ in evaluated), evaluated
    expected = [(6, m["test_acc"], True), (4, m["dev_acc"], True)]
    if cfg.zero_shot:
        expected.append((6, m["zero_shot_test_acc"], False))
    assert sorted((n, acc, trained) for n, acc, _, trained in evaluated) == sorted(expected)
    assert load_result(tmp_path / "r.json")["metrics"] == m  # the file holds what was returned (checksummed)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=probe_ids()).logits, base_logits)  # the shared base is restored
    assert m["total_steps"] == 5 * 2  # 5 epochs of 8 examples at batch 4
    steps = [h for h in payload["history"] if h["event"] == "step"]
    assert [h["t"] for h in steps] == list(range(1, m["total_steps"] + 1))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    knots = [h["t"] for h in payload["history"] if h["event"] == "knot"]
    plan = link_plan(job.cfg.chain_config(m["steps_per_epoch"]))
    assert knots == [link.start for link in plan[1:]]  # the paper's knot schedule (e.g. after epoch 3 for fig3)
    assert chain["rank"] == (list(job.cfg.rank) if isinstance(job.cfg.rank, tuple) else job.cfg.rank)
