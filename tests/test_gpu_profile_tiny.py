"""The GPU profile's configs (Tables 1, 2, 4 and Figure 3) run end to end on tiny random models on a CPU.

Each paper artefact's first job is taken from `gpu_jobs()` unchanged except for the model (tiny OPT / Llama with
a character tokenizer) and the data sizes; the chain schedule (links, link epochs, ranks, lr, reset, schedule)
is the paper configuration itself.
"""

import dataclasses

import pytest
from lm_fixtures import DATA_DIR, needs_data

from cola_theory.config import link_plan
from cola_theory.lm.models import load_model
from cola_theory.lm.train import run_lm
from paper_repro.lm.profiles import gpu_jobs
from paper_repro.lm.runner import tiny_tokenizer

pytestmark = needs_data


def first_job(group: str, task: str | None = None):
    return next(j for j in gpu_jobs() if group in j.groups and (task is None or j.cfg.task == task))


@pytest.mark.parametrize("group, task, tiny", [("table1", "rte", "tiny-opt"), ("table2", "cb", "tiny-llama"),
                                               ("table4", "wsc", "tiny-opt"), ("fig3", "sst2", "tiny-llama")])
def test_paper_config_runs_on_a_tiny_model(tmp_path, group, task, tiny):
    job = first_job(group, task)
    assert job.cfg.model in ("opt-1.3b", "llama-2-7b") and job.cfg.epochs == 5.0  # hub ids via PAPER_MODELS
    cfg = dataclasses.replace(job.cfg, model=tiny, num_train=8, num_dev=4, num_test=6, batch_size=4,
                              eval_batch_size=8, max_length=96)
    model, _, _ = load_model(tiny, device="cpu", tiny_vocab=128)
    payload = run_lm(cfg, tmp_path / "r.json", data_dir=str(DATA_DIR), model_bundle=(model.eval(), tiny_tokenizer(),
                     "tiny"), device="cpu", progress=False)
    m, chain = payload["metrics"], payload["config"]["chain"]
    assert m["status"] == "finished" and 0.0 <= m["test_acc"] <= 1.0 and 0.0 <= m["dev_acc"] <= 1.0
    assert m["total_steps"] == 5 * 2  # 5 epochs of 8 examples at batch 4
    knots = [h["t"] for h in payload["history"] if h["event"] == "knot"]
    plan = link_plan(job.cfg.chain_config(m["steps_per_epoch"]))
    assert knots == [link.start for link in plan[1:]]  # the paper's knot schedule (e.g. after epoch 3 for fig3)
    assert chain["rank"] == (list(job.cfg.rank) if isinstance(job.cfg.rank, tuple) else job.cfg.rank)
