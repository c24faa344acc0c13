"""Theory experiments T1-T5 at smoke size: results (CSV + checksummed JSON + Markdown), figures (PNG + PDF),
caching (a second run skips), corruption detection (a damaged JSON is recomputed), bounds recorded as held."""

import csv
import json

import pytest

from cola_theory.results import load_result
from paper_repro.theory import EXPERIMENTS
from paper_repro.theory.common import check_size

FILES = {"T1": "theorem41", "T2": "convex_fw", "T3": "residual_gap", "T4": "rank_stepdown",
         "T5": "rac_counterexample"}
FIGS = {"T1": "t1_theorem41", "T2": "t2_convex_fw", "T3": "t3_residual_gap", "T4": "t4_rank_stepdown",
        "T5": "t5_rac_counterexample"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out, fig = tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("figures")
    paths = {k: mod.run(out, "smoke") for k, mod in EXPERIMENTS.items()}
    return out, fig, paths


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("key", sorted(FILES))
def test_smoke_run_writes_results_and_plot_reads_them(smoke, key):
    out, fig, paths = smoke
    d = out / "theory"
    stem = FILES[key]
    assert {d / f"{stem}.csv", d / f"{stem}.json"} <= set(paths[key])
    assert any(p.suffix == ".md" and p.exists() for p in paths[key])
    payload = load_result(d / f"{stem}.json")  # checksum verified
    assert payload["config"]["size"] == "smoke" and payload["history"]
    assert len(read_csv(d / f"{stem}.csv")) == len(payload["history"])
    figs = EXPERIMENTS[key].plot(out, fig)
    assert sorted(p.suffix for p in figs) == [".pdf", ".png"]
    assert all(p.stat().st_size > 1000 and p.stem == FIGS[key] for p in figs)


# --- what the figures show: their data read back from the matplotlib artists, expected values from the CSVs -----


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _ys(line) -> list[float]:
    return [float(y) for y in line.get_ydata()]


def _check_t1(fig, rows, payload):
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    assert [ax.get_title().split(" (")[0] for ax in fig.axes] == problems
    for ax, name in zip(fig.axes, problems):
        rs = [r for r in rows if r["problem"] == name]
        Ts = sorted({int(r["T"]) for r in rs})
        lines = {line.get_label(): line for line in ax.get_lines()}
        for label, col in ((r"idealized COLA $\frac{1}{T}\sum g_t$", "avg_fw_gap"),
                           (r"$\frac{M}{\eta T}+\frac{\eta\beta D^2}{2}+\bar\epsilon$", "bound")):
            expected = [_mean([float(r[col]) for r in rs if int(r["T"]) == T]) for T in Ts]
            assert _ys(lines[label]) == pytest.approx(expected, rel=1e-12), (name, col)


def _check_t2(fig, rows, payload):
    cases = list(dict.fromkeys(r["case"] for r in rows))
    assert [ax.get_title() for ax in fig.axes] == cases
    for ax, case in zip(fig.axes, cases):
        seeds = sorted({r["seed"] for r in rows if r["case"] == case}, key=int)
        lines = ax.get_lines()
        assert len(lines) == 2 * len(seeds)
        for line, seed in zip(lines, seeds):  # FW suboptimality per seed, then the bound per seed
            assert _ys(line) == [max(float(r["subopt"]), 1e-16) for r in rows if r["case"] == case
                                 and r["seed"] == seed]
        for line, seed in zip(lines[len(seeds):], seeds):
            assert _ys(line) == [float(r["bound"]) for r in rows if r["case"] == case and r["seed"] == seed]


def _check_t3(fig, rows, payload):
    from matplotlib.container import BarContainer

    chosen = [r for r in rows if r["chosen"] == "True"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, col in zip(fig.axes, ("dist", "final_loss")):
        (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
        means = [_mean([float(r[col]) for r in chosen if r["method"] == m]) for m in methods]
        assert [b.get_height() for b in bars] == pytest.approx(means, rel=1e-12)
        dots = [_ys(line) for line in ax.get_lines() if line.get_marker() == "."]
        assert dots == [[float(r[col]) for r in chosen if r["method"] == m] for m in methods]


def _check_t4(fig, rows, payload):
    from matplotlib.container import ErrorbarContainer

    chosen = [r for r in rows if r["chosen"] == "True"]
    cola = list(dict.fromkeys(r["method"] for r in chosen if r["method"].startswith("COLA")))
    for ax, col in zip(fig.axes, ("dist", "final_loss")):
        (errorbar,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        xs = [int(x) for x in errorbar.lines[0].get_xdata()]
        assert xs == [int(r["ranks"].split("/")[1]) for r in chosen if r["method"] in cola]
        assert _ys(errorbar.lines[0]) == pytest.approx(
            [_mean([float(r[col]) for r in chosen if r["method"] == m]) for m in cola], rel=1e-12)
        lora = [_ys(line)[0] for line in ax.get_lines() if line.get_label().startswith("LoRA rank")]
        assert lora == pytest.approx([float(r[col]) for r in chosen if r["method"].startswith("LoRA")], rel=1e-12)


def _check_t5(fig, rows, payload):
    curves = payload["metrics"]["curves"]
    seed = next(s for s in curves if "chain" in curves[s])
    cf = curves[seed]["closed_form"]
    for ax, keys in zip(fig.axes[1:], (("subopt", "pl_bound"), ("avg_grad_sq", "grad_bound"))):
        assert [_ys(line) for line in ax.get_lines()] == [[float(v) for v in cf[k]] for k in keys]
    diverged = {r["method"]: int(r["diverged_step"]) for r in rows if r["part"] == "chain" and
                r["seed"] == seed and r["status"] == "diverged"}
    marked = sorted(int(line.get_xdata()[0]) - 1 for line in fig.axes[0].get_lines() if line.get_marker() == "x")
    assert len(diverged) == 2 and marked == sorted(diverged.values())  # LoRA and COLA diverge at 1/L


CHECKS = {"T1": _check_t1, "T2": _check_t2, "T3": _check_t3, "T4": _check_t4, "T5": _check_t5}


@pytest.mark.parametrize("key", sorted(FILES))
def test_figure_shows_the_saved_results(smoke, key):
    import matplotlib.pyplot as plt

    out = smoke[0]
    rows = read_csv(out / "theory" / f"{FILES[key]}.csv")
    fig = EXPERIMENTS[key].figure(out)
    try:
        CHECKS[key](fig, rows, load_result(out / "theory" / f"{FILES[key]}.json"))
    finally:
        plt.close(fig)


def test_t1_table_has_the_promised_columns_and_every_point_holds(smoke):
    rows = read_csv(smoke[0] / "theory" / "theorem41.csv")
    for col in ("problem", "seed", "T", "avg_fw_gap", "eps", "bound", "paper_bound", "ratio", "eta", "M", "beta",
                "D", "tau", "holds"):
        assert col in rows[0]
    assert {r["problem"] for r in rows} == {"robust_cauchy", "two_layer", "sigmoid_sensing"}
    for r in rows:
        assert r["holds"] == "True" and float(r["avg_fw_gap"]) <= float(r["bound"])
        assert float(r["ratio"]) == pytest.approx(float(r["avg_fw_gap"]) / float(r["bound"]))
        assert float(r["eps"]) >= 0 and 0 < float(r["eta"]) <= 1


def test_t2_t5_bounds_recorded_as_held(smoke):
    d = smoke[0] / "theory"
    assert all(r["holds"] == "True" for r in read_csv(d / "convex_fw.csv"))
    rows = read_csv(d / "rac_counterexample.csv")
    status = {r["method"]: r["status"] for r in rows if r["part"] == "chain"}
    assert status == {"LoRA": "diverged", "COLA": "diverged", "RAC-LoRA": "finished"}
    assert all(r["diverged_step"] != "" for r in rows if r["part"] == "chain" and r["status"] == "diverged")
    assert all(r["holds"] == "True" for r in rows if r["part"] == "closed_form")


def test_t3_chains_close_the_gap_in_smoke(smoke):
    rows = [r for r in read_csv(smoke[0] / "theory" / "residual_gap.csv") if r["chosen"] == "True"]
    dist = {r["method"]: float(r["dist"]) for r in rows}
    assert dist["full FT"] < dist["COLA-4"] < dist["LoRA"]
    assert all(float(r["dist"]) >= float(r["floor"]) - 1e-9 for r in rows)  # Eckart-Young


def test_second_run_skips(smoke, capsys):
    out = smoke[0]
    path = out / "theory" / "convex_fw.json"
    before = (path.stat().st_mtime_ns, load_result(path)["meta"]["created_at"])
    EXPERIMENTS["T2"].run(out, "smoke")
    assert (path.stat().st_mtime_ns, load_result(path)["meta"]["created_at"]) == before
    assert "skipped" in capsys.readouterr().out


def test_corrupt_result_is_detected_and_recomputed(tmp_path, capsys):
    mod = EXPERIMENTS["T2"]
    mod.run(tmp_path, "smoke")
    path = tmp_path / "theory" / "convex_fw.json"
    payload = json.loads(path.read_text())
    payload["history"][0]["subopt"] = -1.0  # a silent edit: the checksum no longer matches
    path.write_text(json.dumps(payload))
    capsys.readouterr()
    mod.run(tmp_path, "smoke")
    assert "recomputing" in capsys.readouterr().out
    assert load_result(path)["history"][0]["subopt"] != -1.0
    path.write_text(path.read_text()[:100])  # truncated
    mod.run(tmp_path, "smoke")
    assert "recomputing" in capsys.readouterr().out
    load_result(path)


def test_force_recomputes_and_bad_size_is_rejected(tmp_path, capsys):
    mod = EXPERIMENTS["T4"]
    mod.run(tmp_path, "smoke")
    capsys.readouterr()
    mod.run(tmp_path, "smoke", force=True)
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(ValueError, match="size='huge'"):
        check_size("huge")
    with pytest.raises(ValueError, match="size='huge'"):
        mod.run(tmp_path, "huge")


def test_plot_without_results_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the experiment first"):
        EXPERIMENTS["T1"].plot(tmp_path, tmp_path / "fig")
