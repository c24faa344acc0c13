"""SuperGLUE / GLUE rows from local official files (or the HF hub) and MeZO's exact train/dev/test sampling.

Local layout (`resolve_data_dir`): `<data_dir>/<task>/train.jsonl` and `val.jsonl`, each the official
SuperGLUE v2 file (SST-2: GLUE's TSV converted to JSONL `{sentence, label, idx}`). `load_split` turns them into
the rows HF `super_glue` / `glue` yields: string labels mapped to HF class ids (RTE entailment=0; CB
entailment/contradiction/neutral=0/1/2; BoolQ/WiC/WSC/MultiRC False/True=0/1), WSC flattened and span-repaired
like HF `wsc.fixed`, MultiRC exploded to one row per answer.

MeZO's protocol (`large_models/tasks.py::sample_subset`, `run.py::main`, `finetune.sh`), reproduced exactly:
`np.random.seed(seed); np.random.permutation(len(train))[:num_train + num_dev]` (here
`np.random.RandomState(seed).permutation`, the same stream) - the LAST `num_dev` of those are dev, the rest
train; test = `np.random.permutation(len(validation))[:num_test]` under the same seed. DEV is 100 for CB and
Copa (finetune.sh), 500 otherwise. So CB gives 150/100/56, WSC 54/500/104, RTE 1000/500/277.

Deviations: `num_dev=0` gives no dev set (MeZO's `samples[-0:]` would make everything dev); an empty train set
raises instead of training on nothing; `split_validation_as_train=True` (off by default) is NOT MeZO: it draws
test from the validation permutation as usual and carves train+dev out of the rest of that permutation.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cola_theory.lm.tasks import Example, get_task, make_example

logger = logging.getLogger(__name__)

ENV_VAR = "COLA_DATA_DIR"
SPLITS = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation"}
_FILES = {"train": "train.jsonl", "validation": "val.jsonl"}
_OFFICIAL = {  # where each local file comes from
    "sst2": "GLUE SST-2 (SST-2.zip: SST-2/train.tsv, dev.tsv) converted to JSONL {sentence, label, idx}",
    "boolq": "SuperGLUE v2 BoolQ.zip (BoolQ/train.jsonl, BoolQ/val.jsonl)",
    "cb": "SuperGLUE v2 CB.zip (CB/train.jsonl, CB/val.jsonl)",
    "rte": "SuperGLUE v2 RTE.zip (RTE/train.jsonl, RTE/val.jsonl)",
    "wsc": "SuperGLUE v2 WSC.zip (WSC/train.jsonl, WSC/val.jsonl)",
    "wic": "SuperGLUE v2 WiC.zip (WiC/train.jsonl, WiC/val.jsonl)",
    "multirc": "SuperGLUE v2 MultiRC.zip (MultiRC/train.jsonl, MultiRC/val.jsonl)",
    "copa": "SuperGLUE v2 COPA.zip (COPA/train.jsonl, COPA/val.jsonl)",
}
_SHA256 = {
    ("boolq", "train"): "5a0cc1d6cb971a7a177b74bde27b8355de4b0f0e4d86d0a8435ec92cfeb63ba6 (9,427 rows; BoolQ.zip "
                        "sha256 853fbe7922f70c59629f06a39e8d9ca440c3d740e760fd3b87a5ddf3dcba2436)",
}


class MissingSplitError(FileNotFoundError):
    """A task's split file is not in the local data directory (e.g. BoolQ train). Runners skip with `str(err)`."""

    def __init__(self, task: str, split: str, path: Path, message: str) -> None:
        super().__init__(message)
        self.task, self.split, self.path = task, split, path


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Explicit `data_dir`, else $COLA_DATA_DIR, else `<repo root>/../shared/data` if it exists, else None."""
    for value, origin in ((data_dir, "data_dir"), (os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")):
        if value is not None:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"{origin}={str(value)!r} is not a directory; point it at a folder holding <task>/train.jsonl "
                    "and <task>/val.jsonl (the official SuperGLUE files), e.g. shared/data"
                )
            return path
    default = _repo_root().parent / "shared" / "data"
    return default if default.is_dir() else None


# --- reading and validating official rows ----------------------------------------------------------------


def _read_jsonl(path: Path, task: str) -> list[tuple[str, dict[str, Any]]]:
    """[(where, obj)] for every non-blank line; `where` is 'path:line' for error messages."""
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{task}: {path} is empty; replace it with the official file ({_OFFICIAL[task]})")
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            byte = raw[err.start:err.start + 1]
            raise ValueError(
                f"{task}: {where} is not valid UTF-8 (byte {byte!r} at column {err.start + 1}); "
                f"re-encode the file as UTF-8 or restore the official file ({_OFFICIAL[task]})"
            ) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{task}: {where} is not valid JSON ({err.msg} at column {err.colno}); "
                             f"each line must be one JSON object as in {_OFFICIAL[task]}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{task}: {where} holds a JSON {type(obj).__name__}, expected one object per line")
        out.append((where, obj))
    return out


def _field(obj: dict[str, Any], name: str, kind: type, task: str, where: str) -> Any:
    if name not in obj:
        raise ValueError(f"{task}: {where}: missing field {name!r} (have {sorted(obj)}); "
                         f"the official format is {_OFFICIAL[task]}")
    value = obj[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{task}: {where}: field {name!r} = {value!r} is a {type(value).__name__}, "
                         f"expected {kind.__name__}; use the official file ({_OFFICIAL[task]})")
    return value


def _label(obj: dict[str, Any], mapping: tuple[tuple[Any, int], ...], task: str, where: str) -> int:
    name = "label"
    if name not in obj:
        raise ValueError(f"{task}: {where}: missing field {name!r} (labelled train/val files are needed; "
                         "SuperGLUE test files have no labels)")
    value = obj[name]
    for key, hf in mapping:
        if type(value) is type(key) and value == key:
            return hf
    allowed = ", ".join(json.dumps(k) for k, _ in mapping)
    raise ValueError(f"{task}: {where}: field {name!r} = {json.dumps(value)} is not one of {allowed}; "
                     f"use the official file ({_OFFICIAL[task]})")


_BOOL, _BIN = ((False, 0), (True, 1)), ((0, 0), (1, 1))
_LABELS: dict[str, tuple[tuple[Any, int], ...]] = {  # official value -> HF class id (types must match)
    "sst2": _BIN, "boolq": _BOOL, "cb": (("entailment", 0), ("contradiction", 1), ("neutral", 2)),
    "rte": (("entailment", 0), ("not_entailment", 1)), "wic": _BOOL, "wsc": _BOOL, "copa": _BIN,
    "multirc": _BIN + _BOOL,  # HF casts bool(label)
}
_FIELDS: dict[str, dict[str, type]] = {
    "sst2": {"sentence": str},
    "boolq": {"question": str, "passage": str},
    "cb": {"premise": str, "hypothesis": str},
    "rte": {"premise": str, "hypothesis": str},
    "wic": {"word": str, "sentence1": str, "sentence2": str, "start1": int, "start2": int, "end1": int, "end2": int},
    "wsc": {"text": str, "span1_index": int, "span2_index": int, "span1_text": str, "span2_text": str},
    "copa": {"premise": str, "choice1": str, "choice2": str, "question": str},
}


def fix_wsc_spans(row: dict[str, Any]) -> dict[str, Any]:
    """HF `super_glue` `_fix_wst` (the `wsc.fixed` config), verbatim in behaviour, bugs included.

    A span text that is not a substring of `text` gets its first letter's case matched to the word at its
    span index, a trailing '.' stripped and newlines replaced by spaces. (HF's "theyscold" branch discards
    its `str.replace` result and only sets span2_index=10; kept as is.)
    """
    for key in ("span1", "span2"):
        span, index = row[f"{key}_text"], row[f"{key}_index"]
        if span in row["text"] or span in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
            continue
        if "theyscold" in span:
            row["span2_index"] = 10
        words = row["text"].split()
        if not span or not 0 <= index < len(words):
            raise ValueError(f"wsc idx={row.get('idx')}: {key}_index={index} is outside the {len(words)} words "
                             f"of text {row['text']!r}; use the official WSC file")
        span = (span[0].lower() if words[index][0].islower() else span[0].upper()) + span[1:]
        row[f"{key}_text"] = span.rstrip(".").replace("\n", " ")
        if row[f"{key}_text"] not in row["text"]:  # HF asserts here
            raise ValueError(f"wsc idx={row.get('idx')}: {key}_text {row[f'{key}_text']!r} is not in text "
                             f"{row['text']!r} even after HF's wsc.fixed repair; use the official WSC file")
    return row


def _convert(task: str, where: str, obj: dict[str, Any]) -> list[dict[str, Any]]:
    """One official JSONL object -> the HF row(s) it yields."""
    if task == "multirc":
        passage = _field(obj, "passage", dict, task, where)
        text, questions = _field(passage, "text", str, task, where), _field(passage, "questions", list, task, where)
        pid, rows = _field(obj, "idx", int, task, where), []
        for q in questions:
            qwhere = f"{where} (question {q.get('idx') if isinstance(q, dict) else q!r})"
            if not isinstance(q, dict):
                raise ValueError(f"multirc: {qwhere}: expected an object with question/idx/answers")
            question, qid = _field(q, "question", str, task, qwhere), _field(q, "idx", int, task, qwhere)
            for a in _field(q, "answers", list, task, qwhere):
                awhere = f"{qwhere} answer {a.get('idx') if isinstance(a, dict) else a!r}"
                if not isinstance(a, dict):
                    raise ValueError(f"multirc: {awhere}: expected an object with text/idx/label")
                rows.append({"paragraph": text, "question": question, "answer": _field(a, "text", str, task, awhere),
                             "idx": {"paragraph": pid, "question": qid, "answer": _field(a, "idx", int, task, awhere)},
                             "label": _label(a, _LABELS[task], task, awhere)})
        return rows
    if task == "wsc":
        target = _field(obj, "target", dict, task, where)
        obj = {**obj, **target}
    row = {name: _field(obj, name, kind, task, where) for name, kind in _FIELDS[task].items()}
    row["idx"] = _field(obj, "idx", int, task, where)
    row["label"] = _label(obj, _LABELS[task], task, where)
    if task == "copa" and row["question"] not in ("cause", "effect"):
        raise ValueError(f"copa: {where}: field 'question' = {row['question']!r} is not 'cause' or 'effect'")
    return [fix_wsc_spans(row)] if task == "wsc" else [row]


def _missing_split(task: str, split: str, path: Path) -> MissingSplitError:
    msg = (f"{task}: the local {split} split is missing: {path} does not exist. To add it, put the labelled "
           f"{_FILES[split]} from the official {_OFFICIAL[task]} at {path}")
    if (task, split) in _SHA256:
        readme = path.parent.parent / "README.md"
        msg += f" (sha256 {_SHA256[(task, split)]}" + (f"; see {readme})" if readme.is_file() else ")")
    if split == "train":
        msg += (". Or pass split_validation_as_train=True to sample_protocol to carve train/dev out of the "
                "validation split (a documented deviation from MeZO)")
    return MissingSplitError(task, split, path, msg)


def _load_local(task: str, split: str, data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / task / _FILES[split]
    if not path.is_file():
        raise _missing_split(task, split, path)
    rows = [row for where, obj in _read_jsonl(path, task) for row in _convert(task, where, obj)]
    if not rows:
        raise ValueError(f"{task}: {path} yields no examples; replace it with the official file")
    return rows


def _load_hub(task: str, split: str) -> list[dict[str, Any]]:
    """HF hub fallback (needs the network): parquet-backed `nyu-mll/glue` and `aps/super_glue` (`wsc.fixed`)."""
    t = get_task(task)
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"{task}: no local data directory and `datasets` is not installed: pip install "
                          f"'cola-theory[lm]', or set {ENV_VAR} to a folder with <task>/train.jsonl, "
                          "val.jsonl") from err
    ds = datasets.load_dataset(t.hub_path, t.hub_name, split=split)
    return [dict(row) for row in ds]


def load_split(task: str, split: str, data_dir: str | os.PathLike | None = None,
               source: str = "auto") -> list[dict[str, Any]]:
    """Rows of `split` ('train' | 'validation', alias 'val') in the HF `super_glue`/`glue` form.

    source='local' reads `<data_dir>/<task>/{train,val}.jsonl`; 'hub' calls `datasets.load_dataset`;
    'auto' reads local files when `resolve_data_dir(data_dir)` finds a directory, else the hub.
    """
    name = get_task(task).name
    if split not in SPLITS:
        raise ValueError(f"{name}: unknown split {split!r}: use 'train' or 'validation' (alias 'val')")
    split = SPLITS[split]
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"{name}: source={source!r} is invalid: use 'auto', 'local' or 'hub'")
    if source == "hub":
        return _load_hub(name, split)
    root = resolve_data_dir(data_dir)
    if root is None:
        if source == "local":
            raise FileNotFoundError(f"{name}: no local data directory: pass data_dir, set {ENV_VAR}, or put the "
                                    f"official files at {_repo_root().parent / 'shared' / 'data'}/<task>/")
        return _load_hub(name, split)
    return _load_local(name, split, root)


# --- MeZO sampling ----------------------------------------------------------------------------------------


def mezo_permutation(n: int, seed: int) -> list[int]:
    """MeZO `temp_seed(seed): np.random.permutation(n)` (the legacy global RandomState stream)."""
    return np.random.RandomState(seed).permutation(n).tolist()


def protocol_indices(n_train: int, n_val: int, seed: int, num_train: int = 1000, num_dev: int = 500,
                     num_test: int = 1000, split_validation_as_train: bool = False, *,
                     name: str = "sample") -> dict[str, list[int]]:
    """Row indices of MeZO's train/dev/test sample. train/dev index the train split (the validation split
    with `split_validation_as_train`, disjoint from test), test indexes the validation split. `name` (the
    task) only labels messages."""
    if min(num_train, num_dev, num_test) < 0 or num_train + num_dev == 0:
        raise ValueError(f"{name}: num_train={num_train}, num_dev={num_dev}, num_test={num_test}: "
                         "need all >= 0 and num_train + num_dev > 0")
    val_perm = mezo_permutation(n_val, seed)
    test = val_perm[:num_test]
    if split_validation_as_train:
        pool = val_perm[num_test:][:num_train + num_dev]
    else:
        pool = mezo_permutation(n_train, seed)[:num_train + num_dev]
    if num_train + num_dev > len(pool):
        logger.warning("%s: num_train + num_dev = %d > %d available examples: train gets %d (as in MeZO)",
                       name, num_train + num_dev, len(pool), max(len(pool) - num_dev, 0))
    dev = pool[-num_dev:] if num_dev else []  # MeZO: train_samples[-num_dev:], train_samples[:-num_dev]
    train = pool[:-num_dev] if num_dev else pool
    if not train:
        raise ValueError(f"{name}: {len(pool)} examples leave no training set after num_dev={num_dev} dev examples "
                         "(MeZO takes dev from the END of the sample); lower num_dev (MeZO: 100 for CB/Copa)")
    return {"train": train, "dev": dev, "test": test}


def sample_protocol(task: str, seed: int, num_train: int = 1000, num_dev: int | None = None, num_test: int = 1000,
                    *, data_dir: str | os.PathLike | None = None, source: str = "auto",
                    split_validation_as_train: bool = False) -> dict[str, list[Example]]:
    """MeZO's sample for `task` under `seed`: {'train', 'dev', 'test'} lists of `Example`.

    `num_dev=None` takes MeZO's finetune.sh value (100 for CB and Copa, else 500). A missing local train split
    raises `MissingSplitError`, unless `split_validation_as_train=True` (a deviation: train/dev are then drawn
    from the validation rows not in the test sample).
    """
    t = get_task(task)
    num_dev = t.num_dev if num_dev is None else num_dev
    val_rows = load_split(t.name, "validation", data_dir, source)
    train_rows = val_rows if split_validation_as_train else load_split(t.name, "train", data_dir, source)
    idx = protocol_indices(len(train_rows), len(val_rows), seed, num_train, num_dev, num_test,
                           split_validation_as_train, name=t.name)
    render: Callable[[list[dict[str, Any]], list[int]], list[Example]] = (
        lambda rows, ids: [make_example(t, rows[i]) for i in ids])
    return {"train": render(train_rows, idx["train"]), "dev": render(train_rows, idx["dev"]),
            "test": render(val_rows, idx["test"])}
