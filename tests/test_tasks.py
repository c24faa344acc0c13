"""MeZO templates, verbalizers and label -> candidate mapping (exact strings from MeZO's templates.py)."""

from pathlib import Path

import pytest

from cola_theory.lm.data import load_split
from cola_theory.lm.tasks import TASK_NAMES, TASKS, Example, boolq_passage, get_task, label_to_candidate, make_example

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"

# (task, split, row position) -> (prompt, candidates, gold index); strings written out from MeZO's templates.
EXPECTED = {
    ("sst2", "val", 0): (
        "it 's a charming café of a movie . It was", (" terrible", " great"), 1),
    ("rte", "val", 1): (
        'The ship sank near the coast.\nDoes this mean that "The ship reached port safely." is true? Yes or No?\n',
        ("Yes", "No"), 1),
    ("cb", "val", 2): (
        'Suppose Perhaps the letter arrived. Can we infer that "the letter arrived"? Yes, No, or Maybe?\n',
        ("Yes", "No", "Maybe"), 2),
    ("boolq", "val", 0): (
        "The Moon is a rocky body that orbits the Earth. Is the moon made of cheese?\n", ("Yes", "No"), 1),
    ("boolq", "val", 5): (
        "Most fish take oxygen from water with gills. Do fish breathe air?\n", ("Yes", "No"), 1),
    ("boolq", "val", 2): (
        "Water is a liquid at room temperature -- most of the time. Is water wet?\n", ("Yes", "No"), 0),
    ("wsc", "val", 3): (
        'Bob paid Carl because He owed him money.\nIn the previous sentence, does the pronoun "he" refer to Bob? '
        "Yes or No?\n", ("No", "Yes"), 1),
    ("wsc", "val", 0): (
        "The city refused the marchers a permit because they feared violence.\nIn the previous sentence, does the "
        'pronoun "they" refer to the marchers? Yes or No?\n', ("No", "Yes"), 0),
    ("wic", "val", 1): (
        'Does the word "cold" have the same meaning in these two sentences? Yes, No?\nA cold wind.\n'
        "The soup is cold.\n", ("No", "Yes"), 1),
    ("multirc", "val", 2): (
        "The library opens at nine. It closes at five on weekdays.\nQuestion: When does the library open?\n"
        'I found this answer "9 o\'clock". Is that correct? Yes or No?\n', ("No", "Yes"), 1),
    ("multirc", "train", 5): (  # the leading space of the paragraph is stripped (strip(' '))
        "The storm closed the road. Workers cleared it by noon.\nQuestion: What closed the road?\n"
        'I found this answer "A storm". Is that correct? Yes or No?\n', ("No", "Yes"), 1),
    ("copa", "val", 0): (
        "The man turned on the tap so", (" the sink stayed dry.", " water flowed out."), 1),
    ("copa", "val", 2): (
        "The plant died because", (" nobody watered it.", " it was watered daily."), 0),
    ("copa", "train", 2): (  # trailing space and final '.' of the premise dropped; "I" keeps its case
        "I opened the window so", (" the room got cold.", " I lost my keys."), 0),
    ("copa", "val", 3): (  # no final '.' to drop; the word "I" is never lower-cased
        "My hands were cold so", (" I wore gloves.", " I ate soup."), 0),
}


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}")
def test_template_renders_mezo_strings(key):
    task, split, pos = key
    row = load_split(task, split, FIXTURES)[pos]
    ex = make_example(task, row)
    prompt, candidates, gold = EXPECTED[key]
    assert ex.prompt == prompt
    assert ex.candidates == candidates
    assert ex.label == gold
    assert ex.texts == tuple(prompt + c for c in candidates)
    assert ex.task == task


def test_full_text_is_mezo_verbalize_stripped():
    """prompt + candidate == MeZO's verbalize(sample, candidate).strip(' ') for every candidate."""
    for name in TASK_NAMES:
        t = get_task(name)
        split = "val" if name == "boolq" else "train"
        for row in load_split(name, split, FIXTURES):
            ex = make_example(t, row)
            assert ex.prompt == t.encode(row).strip(" ")
            for option, text in zip(t.options(row), ex.texts):
                assert text == t.verbalize(row, option).strip(" ")


def test_sst2_candidates_are_space_joined():
    ex = make_example("sst2", {"sentence": "  fine film ", "label": 0, "idx": 7})
    assert ex.prompt == "fine film It was" and ex.texts == ("fine film It was terrible", "fine film It was great")
    assert (ex.idx, ex.label, ex.group) == (7, 0, None)


def test_multirc_group_and_idx():
    rows = load_split("multirc", "val", FIXTURES)
    exs = [make_example("multirc", r) for r in rows]
    assert [e.idx for e in exs] == [0, 1, 2, 3, 4]
    assert [e.group for e in exs] == ["0-0"] * 3 + ["0-1"] * 2
    assert [e.label for e in exs] == [1, 0, 1, 1, 0]


def test_registry_and_names():
    assert TASK_NAMES == ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa")
    assert set(TASKS) == set(TASK_NAMES)
    for mezo in ("SST2", "RTE", "CB", "BoolQ", "WSC", "WIC", "MultiRC", "Copa"):
        assert get_task(mezo).mezo_name == mezo
    assert get_task("cb").num_dev == 100 and get_task("copa").num_dev == 100 and get_task("rte").num_dev == 500
    assert not get_task("copa").train_as_classification and get_task("wsc").train_as_classification
    assert get_task("wsc").hub_name == "wsc.fixed"
    with pytest.raises(ValueError, match="unknown task 'mnli'.*sst2, rte, cb"):
        get_task("mnli")


def test_label_to_candidate():
    for name in ("sst2", "rte", "wsc", "wic", "multirc", "copa"):
        assert [label_to_candidate(name, y) for y in (0, 1)] == [0, 1]
    assert [label_to_candidate("cb", y) for y in (0, 1, 2)] == [0, 1, 2]
    assert [label_to_candidate("boolq", y) for y in (0, 1)] == [1, 0]  # True -> "Yes" (index 0)
    for bad in (2, -1, True, "1"):
        with pytest.raises(ValueError, match="rte: label"):
            label_to_candidate("rte", bad)
    with pytest.raises(ValueError, match="0..2"):
        label_to_candidate("cb", 3)


def test_boolq_passage():
    assert boolq_passage("Title -- body -- more") == "body -- more"
    assert boolq_passage("no title here") == "no title here"


def test_bad_rows():
    with pytest.raises(ValueError, match="rte row idx=3: missing field 'hypothesis'"):
        make_example("rte", {"premise": "p", "label": 0, "idx": 3})
    with pytest.raises(ValueError, match="label=2 is not an HF class id in 0..1"):
        make_example("rte", {"premise": "p", "hypothesis": "h", "label": 2, "idx": 3})
    with pytest.raises(ValueError, match="question='why'"):
        make_example("copa", {"premise": "p.", "choice1": "a", "choice2": "b", "question": "why", "label": 0,
                              "idx": 0})


def test_example_validates_label():
    with pytest.raises(ValueError, match="label 2 is not an index"):
        Example("rte", 0, "p", ("Yes", "No"), 2)
    with pytest.raises(ValueError, match="no candidates"):
        Example("rte", 0, "p", (), 0)
    ex = Example("rte", 0, "p\n", ("Yes", "No"), 1)
    with pytest.raises(AttributeError):
        ex.label = 0  # frozen
