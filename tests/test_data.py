"""Loading official SuperGLUE/GLUE files into HF rows, validation errors, and MeZO's exact sampling."""

from pathlib import Path

import numpy as np
import pytest
from lm_fixtures import DATA_DIR, needs_data

from cola_theory.lm import data
from cola_theory.lm.data import (
    MissingSplitError,
    fix_wsc_spans,
    load_split,
    mezo_permutation,
    protocol_indices,
    resolve_data_dir,
    sample_protocol,
)
from cola_theory.lm.tasks import TASK_NAMES

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"


# --- locating the data ------------------------------------------------------------------------------------


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("COLA_DATA_DIR", raising=False)
    assert resolve_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("COLA_DATA_DIR", str(FIXTURES))
    assert resolve_data_dir(None) == FIXTURES
    assert resolve_data_dir(tmp_path) == tmp_path  # the explicit argument wins
    with pytest.raises(FileNotFoundError, match="data_dir=.*nope.*is not a directory"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("COLA_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=r"\$COLA_DATA_DIR=.*gone"):
        resolve_data_dir(None)
    monkeypatch.delenv("COLA_DATA_DIR")
    monkeypatch.setattr(data, "_repo_root", lambda: tmp_path / "repo")
    assert resolve_data_dir(None) is None
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert resolve_data_dir(None) == tmp_path / "shared" / "data"
    with pytest.raises(FileNotFoundError, match="pass data_dir, set COLA_DATA_DIR"):
        monkeypatch.setattr(data, "_repo_root", lambda: tmp_path / "elsewhere" / "repo")
        load_split("rte", "train", source="local")


# --- official -> HF rows (fixtures) ------------------------------------------------------------------------


def test_labels_are_mapped_to_hf_ids():
    assert [r["label"] for r in load_split("rte", "val", FIXTURES)] == [0, 1, 0, 1]  # entailment = 0
    assert [r["label"] for r in load_split("cb", "train", FIXTURES)] == [0, 2, 1, 2, 0, 1]  # ent/contra/neutral
    assert [r["label"] for r in load_split("boolq", "validation", FIXTURES)] == [0, 0, 1, 1, 1, 0, 1, 0]
    assert [r["label"] for r in load_split("wic", "train", FIXTURES)] == [0, 1, 0, 1, 0, 1]
    assert [r["label"] for r in load_split("wsc", "val", FIXTURES)] == [0, 0, 1, 1]
    assert [r["label"] for r in load_split("copa", "val", FIXTURES)] == [1, 0, 0, 0]
    assert [r["label"] for r in load_split("sst2", "train", FIXTURES)] == [1, 0, 1, 0, 1, 0, 0, 1]


def test_rows_have_hf_fields():
    fields = {
        "sst2": {"sentence", "label", "idx"}, "boolq": {"question", "passage", "idx", "label"},
        "cb": {"premise", "hypothesis", "idx", "label"}, "rte": {"premise", "hypothesis", "idx", "label"},
        "wic": {"word", "sentence1", "sentence2", "start1", "start2", "end1", "end2", "idx", "label"},
        "wsc": {"text", "span1_index", "span2_index", "span1_text", "span2_text", "idx", "label"},
        "multirc": {"paragraph", "question", "answer", "idx", "label"},
        "copa": {"premise", "choice1", "choice2", "question", "idx", "label"},
    }
    for task, keys in fields.items():
        for row in load_split(task, "validation", FIXTURES):
            assert set(row) == keys, task
    sst = load_split("sst2", "val", FIXTURES)[0]
    assert sst == {"sentence": "it 's a charming café of a movie . ", "label": 1, "idx": 0}  # HF keeps the space
    assert load_split("wic", "val", FIXTURES)[0]["start1"] == 7


def test_wsc_is_flattened_and_span_repaired():
    rows = load_split("wsc", "train", FIXTURES)
    assert rows[0] == {"text": "The lawyer asked the witness a question, but he was reluctant to answer it.",
                       "span1_index": 0, "span2_index": 8, "span1_text": "The lawyer", "span2_text": "he",
                       "idx": 0, "label": 0}
    assert rows[2]["span1_text"] == "the cake"  # case matched to the text
    assert rows[3]["span1_text"] == "the mouse"  # trailing '.' stripped
    assert rows[4]["span1_text"] == "Ann Smith"  # newline -> space
    assert rows[1]["span1_text"] == "Mark" and rows[1]["label"] == 1
    assert all(r["span1_text"] in r["text"] and r["span2_text"] in r["text"] for r in rows)


def test_fix_wsc_spans_hf_quirks():
    kamenev = {"text": "Kamenev and later Zinoviev", "span1_index": 0, "span2_index": 0,
               "span1_text": "Kamenev and Zinoviev", "span2_text": "Kamenev", "idx": 0}
    assert fix_wsc_spans(dict(kamenev))["span1_text"] == "Kamenev and Zinoviev"  # HF leaves it alone
    scold = {"text": "They theyscold them", "span1_index": 0, "span2_index": 1, "span1_text": "They",
             "span2_text": "theyscold.", "idx": 1}
    fixed = fix_wsc_spans(dict(scold))
    assert fixed["span2_index"] == 10 and fixed["span2_text"] == "theyscold"  # HF's branch, bug included
    with pytest.raises(ValueError, match="wsc idx=2: span1_text 'Bob' is not in text"):
        fix_wsc_spans({"text": "Ann sang.", "span1_index": 0, "span2_index": 1, "span1_text": "Bob",
                       "span2_text": "sang", "idx": 2})


def test_multirc_is_exploded_per_answer():
    train, val = load_split("multirc", "train", FIXTURES), load_split("multirc", "val", FIXTURES)
    assert (len(train), len(val)) == (9, 5)  # answers: 2 + 3 (paragraph 0) + 4 (paragraph 1); 3 + 2
    assert [r["label"] for r in train] == [1, 0, 1, 0, 1, 1, 0, 0, 1]
    assert train[5] == {"paragraph": " The storm closed the road. Workers cleared it by noon.",
                        "question": "What closed the road?", "answer": "A storm",
                        "idx": {"paragraph": 1, "question": 2, "answer": 5}, "label": 1}
    assert [r["idx"]["question"] for r in val] == [0, 0, 0, 1, 1]


# --- errors -----------------------------------------------------------------------------------------------


def test_boolq_missing_train_is_a_specific_error():
    with pytest.raises(MissingSplitError) as err:
        sample_protocol("boolq", 0, data_dir=FIXTURES)
    e = err.value
    assert isinstance(e, FileNotFoundError) and (e.task, e.split) == ("boolq", "train")
    assert e.path == FIXTURES / "boolq" / "train.jsonl"
    msg = str(e)
    assert str(FIXTURES / "boolq" / "train.jsonl") in msg and "BoolQ.zip" in msg
    assert "5a0cc1d6cb971a7a177b74bde27b8355de4b0f0e4d86d0a8435ec92cfeb63ba6" in msg
    assert "split_validation_as_train=True" in msg


def test_split_validation_as_train_is_disjoint_from_test():
    s = sample_protocol("boolq", 0, num_train=3, num_dev=2, num_test=3, data_dir=FIXTURES,
                        split_validation_as_train=True)
    assert [len(s[k]) for k in ("train", "dev", "test")] == [3, 2, 3]
    ids = {k: {e.idx for e in v} for k, v in s.items()}
    assert not (ids["train"] & ids["test"]) and not (ids["dev"] & ids["test"]) and not (ids["train"] & ids["dev"])
    with pytest.raises(ValueError, match="boolq: 0 examples leave no training set"):
        sample_protocol("boolq", 0, num_train=3, num_dev=2, num_test=8, data_dir=FIXTURES,
                        split_validation_as_train=True)


def _write(tmp_path, task, content: bytes, name="train.jsonl"):
    (tmp_path / task).mkdir(exist_ok=True)
    (tmp_path / task / name).write_bytes(content)
    return tmp_path / task / name


GOOD_RTE = b'{"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 0}\n'


@pytest.mark.parametrize("content, pattern", [
    (b"", r"rte: .*train.jsonl is empty; replace it with the official file \(SuperGLUE v2 RTE.zip"),
    (b"\n  \n", "is empty"),
    (GOOD_RTE + b'{"premise": "caf\xe9", "hypothesis": "h", "label": "entailment", "idx": 1}\n',
     r"train.jsonl:2 is not valid UTF-8 \(byte b'\\xe9' at column 17\); re-encode the file as UTF-8"),
    (GOOD_RTE + b'{"premise": "p", "hypothesis": \n', r"train.jsonl:2 is not valid JSON"),
    (b'[1, 2]\n', r"train.jsonl:1 holds a JSON list, expected one object per line"),
    (GOOD_RTE + b'{"premise": "p", "label": "entailment", "idx": 1}\n',
     r"train.jsonl:2: missing field 'hypothesis' \(have \['idx', 'label', 'premise'\]\)"),
    (b'{"premise": "p", "hypothesis": "h", "label": "yes", "idx": 0}\n',
     r"train.jsonl:1: field 'label' = \"yes\" is not one of \"entailment\", \"not_entailment\""),
    (b'{"premise": "p", "hypothesis": "h", "idx": 0}\n', r"missing field 'label' \(labelled train/val files"),
    (b'{"premise": 3, "hypothesis": "h", "label": "entailment", "idx": 0}\n',
     r"field 'premise' = 3 is a int, expected str"),
    (b'{"premise": "p", "hypothesis": "h", "label": "entailment", "idx": "0"}\n', r"field 'idx' = '0' is a str"),
])
def test_malformed_files(tmp_path, content, pattern):
    path = _write(tmp_path, "rte", content)
    with pytest.raises(ValueError, match=pattern) as err:
        load_split("rte", "train", tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("task, line, pattern", [
    ("boolq", b'{"question": "q", "passage": "p", "idx": 0, "label": "false"}',
     r"field 'label' = \"false\" is not one of false, true"),
    ("sst2", b'{"sentence": "s", "label": true, "idx": 0}', r"field 'label' = true is not one of 0, 1"),
    ("cb", b'{"premise": "p", "hypothesis": "h", "label": "not_entailment", "idx": 0}', r"\"neutral\""),
    ("copa", b'{"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0, "idx": 0}',
     r"copa: .*:1: field 'question' = 'why' is not 'cause' or 'effect'"),
    ("wsc", b'{"text": "t", "idx": 0, "label": true}', r"missing field 'target'"),
    ("multirc", b'{"idx": 0, "passage": {"text": "t", "questions": [{"question": "q", "idx": 0, '
                b'"answers": [{"text": "a", "idx": 0, "label": 2}]}]}}',
     r"multirc: .*:1 \(question 0\) answer 0: field 'label' = 2 is not one of 0, 1, false, true"),
])
def test_malformed_rows_per_task(tmp_path, task, line, pattern):
    _write(tmp_path, task, line + b"\n", "val.jsonl")
    with pytest.raises(ValueError, match=pattern):
        load_split(task, "val", tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        load_split("mnli", "train", FIXTURES)
    with pytest.raises(ValueError, match="rte: unknown split 'test'"):
        load_split("rte", "test", FIXTURES)
    with pytest.raises(ValueError, match="source='disk' is invalid"):
        load_split("rte", "train", FIXTURES, source="disk")
    with pytest.raises(MissingSplitError, match=r"rte: the local validation split is missing: .*rte/val.jsonl"):
        load_split("rte", "validation", tmp_path)


def test_hub_source_uses_parquet_ids(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return [{"premise": "p", "hypothesis": "h", "idx": 0, "label": 1}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_split("rte", "val", source="hub") == [{"premise": "p", "hypothesis": "h", "idx": 0, "label": 1}]
    load_split("wsc", "train", source="hub")
    load_split("SST2", "validation", source="hub")
    monkeypatch.delenv("COLA_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "_repo_root", lambda: tmp_path / "repo")  # no local data -> auto uses the hub
    load_split("boolq", "train")
    assert calls == [("aps/super_glue", "rte", "validation"), ("aps/super_glue", "wsc.fixed", "train"),
                     ("nyu-mll/glue", "sst2", "validation"), ("aps/super_glue", "boolq", "train")]


# --- MeZO sampling ----------------------------------------------------------------------------------------

# task: (HF train rows, HF validation rows, DEV) -> train/dev/test sizes of MeZO's sampling protocol (Malladi et al.
# 2023, arXiv 2305.17333), as `cola_theory.lm.data.sample_protocol` draws them
PROTOCOL = {
    "sst2": ((67349, 872, 500), (1000, 500, 872)),
    "rte": ((2490, 277, 500), (1000, 500, 277)),
    "cb": ((250, 56, 100), (150, 100, 56)),
    "boolq": ((9427, 3270, 500), (1000, 500, 1000)),
    "wsc": ((554, 104, 500), (54, 500, 104)),
    "wic": ((5428, 638, 500), (1000, 500, 638)),
    "multirc": ((27243, 4848, 500), (1000, 500, 1000)),
    "copa": ((400, 100, 100), (300, 100, 100)),
}


@pytest.mark.parametrize("task", TASK_NAMES)
def test_protocol_sizes_from_split_sizes(task):
    (n_train, n_val, dev), sizes = PROTOCOL[task]
    idx = protocol_indices(n_train, n_val, 0, num_dev=dev)
    assert tuple(len(idx[k]) for k in ("train", "dev", "test")) == sizes
    assert not set(idx["train"]) & set(idx["dev"])


def test_mezo_rng_and_dev_from_the_end():
    state = np.random.get_state()  # MeZO: temp_seed(seed) + np.random.permutation on the global RNG
    np.random.seed(3)
    expected = np.random.permutation(50).tolist()
    np.random.set_state(state)
    assert mezo_permutation(50, 3) == expected
    idx = protocol_indices(50, 20, 3, num_train=10, num_dev=5, num_test=7)
    assert idx["train"] == expected[:10] and idx["dev"] == expected[10:15]
    np.random.seed(3)
    assert idx["test"] == np.random.permutation(20).tolist()[:7]
    np.random.set_state(state)
    assert protocol_indices(50, 20, 3, num_train=10, num_dev=0, num_test=7)["dev"] == []
    with pytest.raises(ValueError, match="no training set after num_dev=60"):
        protocol_indices(50, 20, 3, num_train=10, num_dev=60)  # MeZO: train_samples[:-60] is empty
    with pytest.raises(ValueError, match="need all >= 0"):
        protocol_indices(50, 20, 3, num_train=-1)


def test_sample_on_fixtures_is_seeded_and_disjoint():
    kw = dict(num_train=3, num_dev=2, num_test=3, data_dir=FIXTURES)
    a, b, c = sample_protocol("rte", 0, **kw), sample_protocol("rte", 0, **kw), sample_protocol("rte", 1, **kw)
    assert a == b and a != c
    assert [len(a[k]) for k in ("train", "dev", "test")] == [3, 2, 3]
    assert not {e.idx for e in a["train"]} & {e.idx for e in a["dev"]}
    with pytest.raises(ValueError, match="cb: 6 examples leave no training set after num_dev=100"):
        sample_protocol("cb", 0, data_dir=FIXTURES)  # MeZO's DEV=100 for CB takes all 6 fixture rows
    mrc = sample_protocol("multirc", 0, num_train=5, num_dev=4, num_test=5, data_dir=FIXTURES)
    assert [len(mrc[k]) for k in ("train", "dev", "test")] == [5, 4, 5]


# --- the real data (skipped without it) -------------------------------------------------------------------



@pytest.mark.data
@needs_data
@pytest.mark.parametrize("task", TASK_NAMES)
def test_real_sample_sizes(task):
    sizes = PROTOCOL[task][1]
    has_train = (DATA_DIR / task / "train.jsonl").is_file()
    if not has_train:
        assert task == "boolq"
        with pytest.raises(MissingSplitError, match=str(DATA_DIR / "boolq" / "train.jsonl")):
            sample_protocol(task, 0)
        s = sample_protocol(task, 0, split_validation_as_train=True)
    else:
        s = sample_protocol(task, 0)
    assert tuple(len(s[k]) for k in ("train", "dev", "test")) == sizes
    ids = {k: [e.idx for e in v] for k, v in s.items()}
    assert all(len(set(v)) == len(v) for v in ids.values())
    assert not set(ids["train"]) & set(ids["dev"])
    if not has_train:
        assert not (set(ids["train"]) | set(ids["dev"])) & set(ids["test"])
    assert s == sample_protocol(task, 0, split_validation_as_train=not has_train)
    other = sample_protocol(task, 1, split_validation_as_train=not has_train)
    assert [e.idx for e in other["train"]] != ids["train"]


@pytest.mark.data
@needs_data
def test_real_split_sizes_and_repairs():
    sizes = {"sst2": (67349, 872), "cb": (250, 56), "rte": (2490, 277), "wic": (5428, 638), "wsc": (554, 104),
             "multirc": (27243, 4848), "copa": (400, 100)}
    for task, (n_train, n_val) in sizes.items():
        assert len(load_split(task, "train", DATA_DIR)) == n_train
        assert len(load_split(task, "validation", DATA_DIR)) == n_val
    assert len(load_split("boolq", "validation", DATA_DIR)) == 3270
    for split in ("train", "validation"):
        rows = load_split("wsc", split, DATA_DIR)
        assert all(r["span1_text"] in r["text"] and r["span2_text"] in r["text"] for r in rows)


@pytest.mark.data
@needs_data
def test_real_rows_render_exactly():
    from cola_theory.lm.tasks import make_example

    rte = make_example("rte", load_split("rte", "validation", DATA_DIR)[0])
    assert rte.prompt == ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
                          "according to the Christopher Reeve Foundation.\nDoes this mean that \"Christopher Reeve "
                          "had an accident.\" is true? Yes or No?\n")
    assert (rte.candidates, rte.label) == (("Yes", "No"), 1)
    boolq = make_example("boolq", load_split("boolq", "validation", DATA_DIR)[0])
    assert boolq.prompt.startswith("All biomass goes through at least some of these steps")  # title dropped
    assert boolq.prompt.endswith(" Does ethanol take more energy make that produces?\n") and boolq.label == 1
    sst = make_example("sst2", load_split("sst2", "train", DATA_DIR)[0])
    assert sst.texts[0] == "hide new secretions from the parental units It was terrible" and sst.label == 0
