"""Worker code for the multi-process tests (test_ddp.py, test_faults.py); also a script:

    python tests/_workers.py chain OUT [--kill step:5|knot:1|ckpt:4|result]   # one (killable) chain run
    python -m torch.distributed.run --nproc_per_node 2 tests/_workers.py ddp OUT   # a DDP chain (torchrun)

`launch(fn, world, ...)` starts `world` processes with torchrun's env variables: forked on a CPU-only machine (the
parent's imports are reused: ~0.2 s a process instead of ~5 s of imports), from a forkserver where CUDA is available
(a fork of a process that used CUDA cannot use it; ~1 s a process); COLA_TEST_START_METHOD overrides. A child that
raises writes its traceback to OUT/error-rank<r>.txt and exits 1; a child that SIGKILLs itself exits -9.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from lm_fixtures import VOCAB, lm_loss, tiny_model  # noqa: E402

from cola_theory.chain import run_chain  # noqa: E402
from cola_theory.config import ChainConfig  # noqa: E402
from cola_theory.lm.backend import PeftChainBackend  # noqa: E402
from cola_theory.lm.lora_ops import ADAPTER, lora_layers  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
GLOBAL_BATCH = 8


# -- launching ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn_name: str, rank: int, world: int, port: int, out: str, kwargs: dict) -> None:
    code = 1
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        globals()[fn_name](out, **kwargs)
        code = 0
    except BaseException:  # noqa: BLE001 - reported to the parent through the file
        Path(out, f"error-rank{rank}.txt").write_text(traceback.format_exc())
    finally:
        os._exit(code)  # never return into the parent's (pytest's) code


def launch(fn_name: str, world: int, out: str | os.PathLike, timeout: float = 60.0, **kwargs: Any) -> list[int]:
    """Run globals()[fn_name](out, **kwargs) in `world` forked processes; their exit codes (-9 = SIGKILL)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    # CUDA cannot be used in a fork of a process that touched it: on GPU machines children come from a clean server
    method = os.environ.get("COLA_TEST_START_METHOD") or ("forkserver" if torch.cuda.is_available() else "fork")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["cola_theory.lm.fsdp"])  # tests/ is not on the server's sys.path
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn_name, r, world, port, str(out), kwargs)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():  # a hung collective: end the processes this function started, by pid
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
    return [p.exitcode for p in procs]


def errors(out: str | os.PathLike) -> str:
    return "\n".join(p.read_text() for p in sorted(Path(out).glob("error-rank*.txt")))


# -- shared pieces -----------------------------------------------------------------------------------------
def global_batch_fn(seed: int = 0, batch: int = GLOBAL_BATCH, seq: int = 12):
    def fn(t: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 * seed + t)
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return fn


def chain_tensors(model) -> dict[str, torch.Tensor]:
    """W, A, B of every adapted layer (what a knot changes), detached CPU copies."""
    out = {}
    for name, layer in lora_layers(model):
        out[f"{name}.W"] = layer.get_base_layer().weight.detach().cpu().clone()
        out[f"{name}.A"] = layer.lora_A[ADAPTER].weight.detach().cpu().clone()
        out[f"{name}.B"] = layer.lora_B[ADAPTER].weight.detach().cpu().clone()
    return out


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ddp_config(rank=(4, 2, 2)) -> ChainConfig:
    return ChainConfig(total_steps=9, n_links=3, rank=rank, alpha=8.0, lr=2e-2, warmup_steps=1, seed=5)


# -- DDP ---------------------------------------------------------------------------------------------------
def ddp(out: str, rank: Any = (4, 2, 2), stop_at: int = 0, resume: bool = False, compile: str | None = None) -> None:
    """A 2+-rank DDP chain; after every knot gathers W, A, B of all ranks to compare them bitwise (an independent
    check of the backend's own hash check). stop_at > 0 stops cleanly after that many steps (then resume=True
    continues from the rank-0 checkpoints)."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch._dynamo.utils import counters

    from cola_theory.lm.checkpoint import RankZeroCheckpointer
    from cola_theory.lm.collectives import init_from_env, shard_batch_fn

    me = init_from_env()
    cfg = ddp_config(tuple(rank) if isinstance(rank, list) else rank)
    torch.manual_seed(100 + me.rank)  # different global RNG per rank: nothing may depend on it
    b = PeftChainBackend(tiny_model("opt"), cfg, shard_batch_fn(global_batch_fn()), lm_loss,
                         target_modules=TARGETS, ddp=True, compile=compile, compile_backend="aot_eager")
    checks: list[dict] = []
    tie = b.tie_knot

    def checked_tie() -> None:
        tie()
        mine = chain_tensors(b.model)
        same = True
        for name in sorted(mine):
            parts = [torch.empty_like(mine[name]) for _ in range(me.world_size)]
            dist.all_gather(parts, mine[name])
            same &= all(torch.equal(p, parts[0]) for p in parts)
        checks.append({"t": b.t, "identical": bool(same), "tensors": len(mine)})

    b.tie_knot = checked_tie
    stop = {"t": stop_at}

    class Stop(Exception):
        pass

    def on_step(t, link):
        if stop["t"] and t == stop["t"]:
            raise Stop

    ckpt = RankZeroCheckpointer(Path(out) / "ckpt", every_steps=2, log=lambda s: None) if (stop_at or resume) else None
    try:
        res = run_chain(b, cfg, checkpointer=ckpt, on_step=on_step)
    except Stop:
        return
    final = chain_tensors(b.model)
    Path(out, f"rank{me.rank}.json").write_text(json.dumps(
        {"history": res.history, "checks": checks, "digest": digest(final), "wrapped": b.wrapped is not None,
         "graphs": int(counters["stats"]["unique_graphs"])}))
    if me.rank == 0:
        save_file(final, str(Path(out) / "final.safetensors"))
    dist.destroy_process_group()


def fsdp2(out: str, steps: int = 6) -> None:
    """An FSDP2-sharded chain (3 links): the full W on rank 0 after the run, for comparison with one process."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from cola_theory.lm.collectives import init_from_env, shard_batch_fn
    from cola_theory.lm.fsdp import Fsdp2ChainBackend

    me = init_from_env()
    cfg = ChainConfig(total_steps=steps, n_links=3, rank=4, alpha=8.0, lr=2e-2, seed=5)
    b = Fsdp2ChainBackend(tiny_model("opt"), cfg, shard_batch_fn(global_batch_fn()), lm_loss, target_modules=TARGETS)
    res = run_chain(b, cfg)
    full = b.full_weights()
    local = {n: layer.get_base_layer().weight.to_local().shape[0] for n, layer in lora_layers(b.model)}
    if me.rank == 0:
        save_file(full, str(Path(out) / "fsdp2.safetensors"))
        Path(out, "fsdp2.json").write_text(json.dumps({"history": res.history, "local_rows": local}))
    dist.destroy_process_group()


def fsdp1(out: str) -> None:
    """fold_fsdp1_ / reinit_fsdp1_ on a FullyShardedDataParallel model: W + s B A, function preserved."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from cola_theory.links import link_generator
    from cola_theory.lm.collectives import init_from_env
    from cola_theory.lm.fsdp import fold_fsdp1_, reinit_fsdp1_
    from cola_theory.lm.lora_ops import add_chain_lora

    me = init_from_env()
    model = add_chain_lora(tiny_model("opt"), 4, 8.0, TARGETS)
    f = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    reinit_fsdp1_(f, link_generator(0, 0))
    with torch.no_grad():  # a non-zero link so that the fold matters
        with FSDP.summon_full_params(f, writeback=True):
            for _, layer in lora_layers(f):
                layer.lora_B[ADAPTER].weight.normal_(generator=torch.Generator().manual_seed(1))
            before = chain_tensors(f)
    ids = global_batch_fn()(0)["input_ids"][me.rank * 2:(me.rank + 1) * 2]
    with torch.no_grad():
        y0 = f(input_ids=ids).logits
        fold_fsdp1_(f)
        y1 = f(input_ids=ids).logits
    with FSDP.summon_full_params(f):
        after = chain_tensors(f)
    err = max(float((after[n[:-2] + ".W"] - before[n[:-2] + ".W"] - 2.0 * before[n[:-2] + ".B"] @ before[n]).abs().max())
              for n in before if n.endswith(".A"))
    Path(out, f"fsdp1-rank{me.rank}.json").write_text(json.dumps({
        "fold_err": err, "logit_err": float((y1 - y0).abs().max()),
        "b_zero": all(float(after[n].abs().max()) == 0 for n in after if n.endswith(".B"))}))
    dist.destroy_process_group()


def mismatch(out: str) -> None:
    """Rank 1 builds its base model from another seed: the backend must refuse at the first link."""
    from cola_theory.lm.collectives import init_from_env, replica_mismatches, replicas_identical

    me = init_from_env()
    model = tiny_model("opt", seed=me.rank)
    probe = {"w": torch.full((3,), float(me.rank))}
    result = {"probe": replica_mismatches(model, probe), "same": replicas_identical(model, {"w": torch.ones(3)})}
    b = PeftChainBackend(model, ddp_config(), global_batch_fn(), lm_loss, target_modules=TARGETS, ddp=True)
    try:
        run_chain(b, ddp_config())
    except RuntimeError as exc:
        result["error"] = str(exc)
    Path(out, f"mismatch-{me.rank}.json").write_text(json.dumps(result))


def gpu_ddp(out: str) -> None:
    """nccl on CUDA, one process per GPU (world 1 on a one-GPU machine, 2 where two exist): the DDP chain (each
    rank its share of the global batch, tensor loss all-reduce, knots checked bitwise across ranks by the backend)
    equals one process training on the whole global batch; FSDP2 (W sharded over the ranks) equals that process
    too. With one GPU this checks the CUDA code path of DDP / FSDP2 (device_ids, nccl collectives, the all-reduced
    tensor loss) against the plain backend; with two it also checks the sharded gradients and weights."""
    import torch.distributed as dist

    from cola_theory.lm.collectives import init_from_env, shard_batch_fn
    from cola_theory.lm.fsdp import Fsdp2ChainBackend

    me = init_from_env()
    dev = f"cuda:{me.rank}"
    cfg = ddp_config()
    runs = []
    for on in (True, False):  # DDP over the ranks, then the reference: this process alone on the global batch
        fn = shard_batch_fn(global_batch_fn()) if on else global_batch_fn()
        b = PeftChainBackend(tiny_model("opt"), cfg, fn, lm_loss, target_modules=TARGETS, device=dev, ddp=on)
        res = run_chain(b, cfg)
        runs.append((chain_tensors(b.model), [h["loss"] for h in res.history if h["event"] == "step"]))
    cfg2 = ChainConfig(total_steps=6, n_links=3, rank=4, alpha=8.0, lr=2e-2, seed=5)
    for cls, fn in ((Fsdp2ChainBackend, shard_batch_fn(global_batch_fn())), (PeftChainBackend, global_batch_fn())):
        b = cls(tiny_model("opt"), cfg2, fn, lm_loss, target_modules=TARGETS, device=dev)
        run_chain(b, cfg2)
        runs.append(({n: layer.get_base_layer().weight for n, layer in lora_layers(b.model)}, None))
    (t1, l1), (t2, l2), (f1, _), (f2, _) = runs
    fsdp_w = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in f1.items()}
    if me.rank == 0:
        Path(out, "gpu.json").write_text(json.dumps({
            "world": me.world_size,
            "weight_diff": max(float((t1[k] - t2[k]).abs().max()) for k in t1),
            "loss_diff": max(abs(a - b) for a, b in zip(l1, l2)),
            "fsdp2_diff": max(float((fsdp_w[k] - f2[k].detach().cpu()).abs().max()) for k in f2),
            "fsdp2_sharded": all(hasattr(v, "full_tensor") for v in f1.values())}))
    dist.destroy_process_group()


def lm_config():
    from cola_theory.lm.train import LMRunConfig

    # 8 examples, global batch 3: shares of 1 and 2 (and 1 and 1) rows per step - uneven, hence weighted
    return LMRunConfig(model="tiny-opt", task="sst2", method="cola", n_links=2, epochs=2.0, batch_size=3,
                       num_train=8, num_dev=0, num_test=4, eval_dev=False, lr=1e-2, max_length=64, rank=4)


def lm_bundle():
    """tiny-opt without dropout (else the ranks' dropout masks differ from one process's) + a char tokenizer."""
    from transformers import AutoModelForCausalLM

    from cola_theory.lm.models import tiny_config
    from paper_repro.lm.runner import tiny_tokenizer

    cfg = tiny_config("tiny-opt")
    cfg.dropout = cfg.attention_dropout = 0.0
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval(), tiny_tokenizer(), "tiny-opt, no dropout"


def lm_run(out: str, world: int = 2) -> None:
    """`run_lm` under torch.distributed: rank 0 alone writes the result (inside results_root) and checkpoints."""
    from cola_theory.lm.collectives import init_from_env
    from cola_theory.lm.train import run_lm

    me = init_from_env()
    payload = run_lm(lm_config(), "res.json", data_dir=str(HERE / "fixtures" / "superglue"), checkpoint_dir="ck",
                     model_bundle=lm_bundle(), results_root=out)
    Path(out, f"lm-rank{me.rank}.json").write_text(json.dumps(payload["history"]))


# -- a killable chain run (test_faults.py) -----------------------------------------------------------------
def fault_config() -> ChainConfig:
    return ChainConfig(total_steps=12, n_links=3, rank=(4, 2, 2), alpha=8.0, lr=2e-2, warmup_steps=1, seed=3,
                       optimizer_reset="full")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def chain(out: str, kill: str = "") -> None:
    """One run of a 12-step, 3-link chain with dropout, checkpointed every step into OUT/ckpt, resuming from it.

    kill: "step:k" dies inside step k (after the forward), "knot:j" inside the j-th knot of this process (after
    W was folded in memory), "ckpt:n" in the middle of the n-th checkpoint file this process writes (half the
    bytes written), "result" inside the result's atomic write (temp file written, not yet renamed).
    Appends "t sha256(W, A, B)" per finished step to OUT/steps-<pid>.log; writes OUT/result.json at the end.
    """
    import cola_theory.lm.backend as backend_mod
    import cola_theory.lm.checkpoint as ckpt_mod
    from cola_theory.lm.checkpoint import KnotCheckpointer
    from cola_theory.results import save_result

    kind, _, arg = kill.partition(":")
    n = int(arg) if arg else 0
    cfg = fault_config()
    base_batches = global_batch_fn(seed=1, batch=4)
    b = PeftChainBackend(tiny_model("opt", dropout=0.1), cfg, base_batches, lm_loss, target_modules=TARGETS,
                         lora_dropout=0.1)
    if kind == "step":
        def loss_fn(model, batch):
            loss = lm_loss(model, batch)
            if b.t == n:
                _die()
            return loss
        b.loss_fn = loss_fn
    elif kind == "knot":
        real_fold, count = backend_mod.fold_, [0]

        def fold_(model, master=None):
            tied = real_fold(model, master)
            count[0] += 1
            if count[0] == n:
                _die()
            return tied
        backend_mod.fold_ = fold_
    elif kind == "ckpt":
        real_write, count = ckpt_mod._write, [0]

        def _write(path, data):
            count[0] += 1
            if count[0] == n:
                with open(path, "wb") as fh:
                    fh.write(data[:len(data) // 2])
                _die()
            real_write(path, data)
        ckpt_mod._write = _write
    elif kind == "result":
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            if str(dst).endswith("result.json"):
                _die()
            return real_replace(src, dst, *a, **k)
        os.replace = replace
    elif kind:
        raise ValueError(f"kill={kill!r}: use step:k, knot:j, ckpt:n or result")

    log = open(Path(out) / f"steps-{os.getpid()}.log", "a")  # flushed per line; closed when the process ends

    def on_step(t, link):
        log.write(f"{t} {digest(chain_tensors(b.model))}\n")
        log.flush()

    ckpt = KnotCheckpointer(Path(out) / "ckpt", every_steps=1, log=lambda s: None)
    res = run_chain(b, cfg, checkpointer=ckpt, on_step=on_step)
    final = chain_tensors(b.model)
    save_result(Path(out) / "result.json", config=cfg.to_dict(), history=res.history,
                metrics={"status": res.status, "digest": digest(final)}, meta={"worker": "chain"})


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["chain", "ddp"])
    ap.add_argument("out")
    ap.add_argument("--kill", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.what == "chain":
        chain(a.out, a.kill)
    else:
        ddp(a.out)  # an exception exits non-zero as usual
        # results written, process group destroyed: skip interpreter finalization, where gloo's C++ threads can
        # abort a rank ("terminate called without an active exception", SIGABRT; seen once in CI, and a known
        # PyTorch teardown race: pytorch/pytorch#179291). `_child` exits the same way.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
