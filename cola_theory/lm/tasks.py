r"""MeZO's task registry for COLA: prompt templates, verbalizers and label -> candidate index.

Every string is MeZO's (princeton-nlp/MeZO `large_models/templates.py`, `tasks.py`), rendered from a row in
the HF `super_glue` / `glue` form that `cola_theory.lm.data.load_split` returns:

prompt (MeZO `Template.encode`; \n is a newline) -> candidates (appended after the prompt):

- sst2:    `{sentence.strip()} It was` -> ` terrible` / ` great`
- rte:     `{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n` -> `Yes` / `No`
- cb:      `Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n` -> `Yes` / `No` / `Maybe`
- boolq:   `{passage} {Question}?\n` (BoolQTemplateV3, MeZO's default; capitalised, '?' added) -> `Yes` / `No`
- wsc:     `{text}\nIn the previous sentence, does the pronoun "{span2_text.lower()}" refer to {span1_text}?
           Yes or No?\n` (one line) -> `No` / `Yes`
- wic:     `Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{sentence1}\n
           {sentence2}\n` (one line) -> `No` / `Yes`
- multirc: `{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?\n`
           -> `No` / `Yes`
- copa:    `{premise without its final '.'} so` (effect) / `because` (cause) -> ` {choice1}` / ` {choice2}`, the
           first word lower-cased unless it is "I"

How MeZO joins prompt and candidate (`utils.encode_prompt`): it renders the prompt (`encode`) and, per
candidate, the full text (`verbalize`), strips leading/trailing *spaces only* from both, scores the full
text and takes the candidate as the tokens the full text has beyond the prompt. `Example.prompt` is that
stripped prompt and `Example.candidates[i]` is the rest of the stripped full text, so
`prompt + candidates[i]` is exactly MeZO's scored string (SST-2: `... It was` + ` great`; RTE: `...?\n` + `Yes`).
MeZO also prepends its (empty) demonstrations with "\n\n" and `.lstrip()`s the result, i.e. drops any other
leading whitespace; both strings get that `lstrip()` here too (no row of the real data starts with any).

Label -> candidate index: HF label for every task except BoolQ, where MeZO's candidates are ("Yes", "No") and
the gold one is "Yes" when the answer is True, i.e. index `1 - label`.

Deviation, BoolQ: MeZO loads HF `boolq` (google/boolq), whose passages have no title; SuperGLUE's BoolQ
(our files, `aps/super_glue`) prefixes each passage with `"<Wikipedia title> -- "`. The template drops that
prefix (text up to the first " -- "), which reproduces MeZO's strings: same rows, same order, same text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Row = Mapping[str, Any]

TASK_NAMES = ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa")


@dataclass(frozen=True)
class Example:
    """One rendered example: score `prompt + candidates[i]` for every i; `label` indexes `candidates`."""

    task: str
    idx: int  # the row's idx (MultiRC: the answer idx, unique within a split)
    prompt: str
    candidates: tuple[str, ...]
    label: int
    group: str | None = None  # MultiRC: "<paragraph idx>-<question idx>"; None elsewhere

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError(f"{self.task} example idx={self.idx}: no candidates")
        if not 0 <= self.label < len(self.candidates):
            raise ValueError(
                f"{self.task} example idx={self.idx}: label {self.label} is not an index into its "
                f"{len(self.candidates)} candidates {self.candidates}"
            )

    @property
    def texts(self) -> tuple[str, ...]:
        """The full scored strings, one per candidate (MeZO's stripped `verbalize` output)."""
        return tuple(self.prompt + c for c in self.candidates)


@dataclass(frozen=True)
class Task:
    """A MeZO task: where its rows come from and how one row becomes prompt, candidates and gold index."""

    name: str  # our name (lower case)
    mezo_name: str  # MeZO's `--task_name`
    hub_path: str  # parquet-backed HF dataset id for `load_split(source="hub")`
    hub_name: str  # its config
    fields: tuple[str, ...]  # row fields the template reads
    encode: Callable[[Row], str]  # MeZO Template.encode
    verbalize: Callable[[Row, Any], str]  # MeZO Template.verbalize(sample, candidate)
    options: Callable[[Row], tuple[Any, ...]]  # MeZO Sample.candidates (gold: `label_to_candidate`)
    num_dev: int = 500  # MeZO finetune.sh DEV (100 for CB and Copa)
    num_labels: int = 2
    train_as_classification: bool = True  # finetune.sh: False only for Copa (LM loss on the gold option)


# --- templates (MeZO large_models/templates.py) -------------------------------------------------------------


def _sst2(row: Row) -> str:
    return f"{row['sentence'].strip()} It was"


def _rte(row: Row) -> str:
    return f"{row['premise']}\nDoes this mean that \"{row['hypothesis']}\" is true? Yes or No?\n"


def _cb(row: Row) -> str:
    return f"Suppose {row['premise']} Can we infer that \"{row['hypothesis']}\"? Yes, No, or Maybe?\n"


def boolq_passage(passage: str) -> str:
    """SuperGLUE BoolQ passage -> google/boolq passage (MeZO's): drop the `"<title> -- "` prefix."""
    _title, sep, body = passage.partition(" -- ")
    return body if sep else passage


def _boolq(row: Row) -> str:
    question = row["question"]
    if not question.endswith("?"):
        question = question + "?"
    question = question[0].upper() + question[1:]
    return f"{boolq_passage(row['passage'])} {question}\n"


def _wsc(row: Row) -> str:
    return (
        f"{row['text']}\nIn the previous sentence, does the pronoun \"{row['span2_text'].lower()}\" "
        f"refer to {row['span1_text']}? Yes or No?\n"
    )


def _wic(row: Row) -> str:
    return (
        f"Does the word \"{row['word']}\" have the same meaning in these two sentences? Yes, No?\n"
        f"{row['sentence1']}\n{row['sentence2']}\n"
    )


def _multirc(row: Row) -> str:
    return (
        f"{row['paragraph']}\nQuestion: {row['question']}\n"
        f"I found this answer \"{row['answer']}\". Is that correct? Yes or No?\n"
    )


def _copa(row: Row) -> str:
    premise = row["premise"].rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    if row["question"] == "effect":
        return premise + " so "
    if row["question"] == "cause":
        return premise + " because "
    raise ValueError(f"copa row idx={row.get('idx')}: question={row['question']!r}, expected 'cause' or 'effect'")


def _copa_choice(choice: str) -> str:
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def _appender(encode: Callable[[Row], str], verbalizer: Mapping[int, str], sep: str = "") -> Callable[[Row, Any], str]:
    return lambda row, cand: encode(row) + sep + verbalizer[cand]


_NO_YES = {0: "No", 1: "Yes"}
_YES_NO = {0: "Yes", 1: "No"}
_BINARY = lambda row: (0, 1)
_SG = "aps/super_glue"

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("sst2", "SST2", "nyu-mll/glue", "sst2", ("sentence",), _sst2,
             _appender(_sst2, {0: "terrible", 1: "great"}, " "), _BINARY),
        Task("rte", "RTE", _SG, "rte", ("premise", "hypothesis"), _rte, _appender(_rte, _YES_NO), _BINARY),
        Task("cb", "CB", _SG, "cb", ("premise", "hypothesis"), _cb,
             _appender(_cb, {0: "Yes", 1: "No", 2: "Maybe"}), lambda row: (0, 1, 2),
             num_dev=100, num_labels=3),
        Task("boolq", "BoolQ", _SG, "boolq", ("question", "passage"), _boolq, lambda row, c: _boolq(row) + c,
             lambda row: ("Yes", "No")),
        Task("wsc", "WSC", _SG, "wsc.fixed", ("text", "span1_text", "span2_text"), _wsc, _appender(_wsc, _NO_YES),
             _BINARY),
        Task("wic", "WIC", _SG, "wic", ("word", "sentence1", "sentence2"), _wic, _appender(_wic, _NO_YES),
             _BINARY),
        Task("multirc", "MultiRC", _SG, "multirc", ("paragraph", "question", "answer"), _multirc,
             _appender(_multirc, _NO_YES), _BINARY),
        Task("copa", "Copa", _SG, "copa", ("premise", "choice1", "choice2", "question"), _copa,
             lambda row, c: _copa(row) + _copa_choice(c), lambda row: (row["choice1"], row["choice2"]),
             num_dev=100, train_as_classification=False),
    )
}


def get_task(name: str) -> Task:
    """Look a task up by our name or MeZO's (case-insensitive: 'SST2', 'MultiRC', 'Copa', ...)."""
    key = str(name).lower()
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}: use one of {', '.join(TASK_NAMES)} (case-insensitive)")
    return TASKS[key]


def make_example(task: str | Task, row: Row) -> Example:
    """Render one HF-form row into an `Example`, exactly as MeZO's `encode_prompt` would score it."""
    t = task if isinstance(task, Task) else get_task(task)
    for field in (*t.fields, "label", "idx"):
        if field not in row:
            raise ValueError(
                f"{t.name} row idx={row.get('idx')!r}: missing field {field!r} (have {sorted(row)}); "
                f"rows must be in the HF {t.hub_path}/{t.hub_name} form, as cola_theory.lm.data.load_split returns"
            )
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < t.num_labels:
        raise ValueError(
            f"{t.name} row idx={row['idx']!r}: label={label!r} is not an HF class id in 0..{t.num_labels - 1}"
        )
    gold = label_to_candidate(t, label)
    prompt = t.encode(row).strip(" ").lstrip()
    options = t.options(row)
    candidates = []
    for option in options:
        full = t.verbalize(row, option).strip(" ").lstrip()
        if not full.startswith(prompt) or len(full) == len(prompt):
            raise ValueError(
                f"{t.name} row idx={row['idx']!r}: candidate {option!r} renders to {full!r}, which does not "
                f"extend the prompt {prompt!r}"
            )
        candidates.append(full[len(prompt):])
    if t.name == "multirc":
        ids = row["idx"]
        return Example(t.name, int(ids["answer"]), prompt, tuple(candidates), gold,
                       f"{ids['paragraph']}-{ids['question']}")
    return Example(t.name, int(row["idx"]), prompt, tuple(candidates), gold)


def label_to_candidate(task: str | Task, label: int) -> int:
    """HF label id -> index into `Example.candidates` (identity except BoolQ: True=1 -> "Yes"=0)."""
    t = task if isinstance(task, Task) else get_task(task)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < t.num_labels:
        raise ValueError(f"{t.name}: label={label!r} is not an HF class id in 0..{t.num_labels - 1}")
    if t.name == "boolq":
        return 1 - label
    return label
