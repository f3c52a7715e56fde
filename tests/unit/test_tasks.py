"""Long-context retrieval tasks: determinism, answers correct by construction, budget, scorers, files."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from data_prep.retrieval_tasks import (
    TASKS,
    TaskExample,
    TaskFileError,
    generate,
    load_filler,
    read_jsonl,
    score_generation,
    write_jsonl,
)
from data_prep.retrieval_tasks.__main__ import main
from data_prep.retrieval_tasks.babi import AGENTS, DROP_VERBS, MOVE_VERBS, OBJECTS, PICK_VERBS, ROOMS

# Pseudo-prose with no digits, no agent or room names and no "VAR": nothing a parser could mistake.
_WORDS = "alpha beta gamma delta stone river cloud paper table quickly slowly walked built found green small large".split()


def _filler(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "." for _ in range(n)
    ]


FILLER = _filler()


def count_words(s: str) -> int:
    return len(s.split())


def _gen(task: str, n: int = 3, seed: int = 0, context_tokens: int = 300, **knobs: int) -> list[TaskExample]:
    return generate(
        task, n, seed=seed, context_tokens=context_tokens, count_tokens=count_words, filler=FILLER, **knobs
    )


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_prefix_stable_and_seed_sensitive(task):
    a = _gen(task, 3)
    assert a == _gen(task, 3)
    assert _gen(task, 5)[:3] == a  # example i does not depend on n
    assert [e.id for e in a] == [f"{task}-0-{i}" for i in range(3)]
    b = _gen(task, 3, seed=1)
    assert all(x.prompt != y.prompt for x, y in zip(a, b, strict=True))
    assert len({e.prompt for e in a}) == 3


# --------------------------------------------------------------------------- correct by construction

_NEEDLE = re.compile(r"The special magic number for ([a-z]+-[a-z]+) is: (\d+)\.")


def test_niah_answer_is_exactly_the_keys_needles():
    for ex in _gen("niah", 4, values=4, distractors=2):
        key = re.search(r"magic numbers for ([a-z]+-[a-z]+) mentioned", ex.prompt).group(1)
        needles = _NEEDLE.findall(ex.prompt)
        assert len(needles) == 6
        assert [v for k, v in needles if k == key] == ex.values
        assert len(ex.values) == 4 and len(set(ex.values)) == 4
        assert all(re.fullmatch(r"[1-9]\d{6}", v) for v in ex.values)
        assert {k for k, _ in needles} - {key} == set(ex.meta["distractor_keys"]) and len(
            ex.meta["distractor_keys"]
        ) == 2
        assert ex.answer == ", ".join(ex.values)
        for v in ex.values:  # each value occurs once, and only inside its key's needle
            assert ex.prompt.count(v) == 1
            assert f"The special magic number for {key} is: {v}." in ex.prompt
        assert ex.prompt.endswith("\nAnswer:")
        assert score_generation(ex, ex.answer) == 1.0


_ASSIGN = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.")


def _resolve(source: dict[str, str], name: str) -> str:
    # Follow VAR X = VAR Y back to the literal value X holds.
    while source[name] in source:
        name = source[name]
    return source[name]


def test_variable_tracking_answer_follows_the_assignments():
    for ex in _gen("variable_tracking", 4, hops=3, distractors=2):
        value = re.search(r"assigned the value (\d+) in", ex.prompt).group(1)
        source: dict[str, str] = {}  # name -> the name or value it was assigned from
        order: list[str] = []
        for name, ref, literal in _ASSIGN.findall(ex.prompt):
            assert name not in source, "names are unique"
            source[name] = ref or literal
            order.append(name)
        assert len(order) == 12  # 3 chains of 4

        found = [n for n in order if _resolve(source, n) == value]
        assert found == ex.values == ex.answer.split(" ")
        assert all(source[b] == a for a, b in itertools.pairwise(found))  # chain order
        assert score_generation(ex, ex.answer) == 1.0


_STORY = re.compile(
    rf"\b({'|'.join(AGENTS)}) ({'|'.join(MOVE_VERBS + PICK_VERBS + DROP_VERBS)}) the ([a-z]+)\."
)


def _resimulate(prompt: str) -> tuple[dict[str, str], dict[str, str]]:
    # An independent simulator: agent -> room, object -> room, from the sentences in the prompt.
    agent_room: dict[str, str] = {}
    holder: dict[str, str] = {}
    obj_room: dict[str, str] = {}
    for agent, verb, arg in _STORY.findall(prompt):
        if verb in MOVE_VERBS:
            assert arg in ROOMS
            agent_room[agent] = arg
            for obj, who in holder.items():
                if who == agent:
                    obj_room[obj] = arg
        elif verb in PICK_VERBS:
            assert arg in OBJECTS and arg not in holder and agent in agent_room
            assert obj_room.get(arg, agent_room[agent]) == agent_room[agent]
            holder[arg] = agent
            obj_room[arg] = agent_room[agent]
        else:
            assert holder.pop(arg) == agent
    return agent_room, obj_room


@pytest.mark.parametrize("hops", [1, 2])
def test_babi_answer_matches_a_resimulation(hops):
    for ex in _gen("babi", 5, hops=hops, facts=8):
        assert len(_STORY.findall(ex.prompt)) == 8
        agent_room, obj_room = _resimulate(ex.prompt)
        target = re.search(r"Question: Where is (?:the )?(\w+)\?", ex.prompt).group(1)
        assert target == ex.meta["target"]
        assert ex.answer == (agent_room if hops == 1 else obj_room)[target]
        assert ex.values == [ex.answer]
        if hops == 1:
            assert not re.search(r"picked up|grabbed|dropped", ex.prompt)


def test_statement_positions_are_ordered_fractions():
    for task in sorted(TASKS):
        for ex in _gen(task, 2):
            pos = ex.meta["positions"]
            assert pos == sorted(pos) and all(0.0 <= p < 1.0 for p in pos)


# --------------------------------------------------------------------------- length budget


@pytest.mark.parametrize(("task", "knobs"), [("niah", {}), ("variable_tracking", {}), ("babi", {"hops": 2})])
def test_prompt_fits_the_budget(task, knobs):
    for ctx in (200, 500, 2048):  # up to the 2048-token presets (filler cycles past its end)
        for ex in _gen(task, 3, context_tokens=ctx, **knobs):
            tokens = count_words(ex.prompt)
            assert 0.8 * ctx <= tokens <= ctx
            assert ex.meta["prompt_tokens"] == tokens and ex.meta["context_tokens"] == ctx


def test_subadditive_counter_is_still_respected():
    # A counter where joining adds tokens (per-sentence counts undercount): the final recount trims.
    def chars(s: str) -> int:
        return len(s) // 4

    (ex,) = generate("niah", 1, seed=0, context_tokens=600, count_tokens=chars, filler=FILLER)
    assert 0.8 * 600 <= chars(ex.prompt) <= 600


@pytest.mark.parametrize("task", sorted(TASKS))
def test_too_small_context_names_the_numbers(task):
    with pytest.raises(ValueError, match=r"context_tokens=20 is too small") as err:
        _gen(task, 1, context_tokens=20)
    needed = int(re.search(r"take (\d+) tokens", str(err.value)).group(1))
    assert needed > 20
    assert count_words(_gen(task, 1, context_tokens=needed)[0].prompt) <= needed  # that much suffices


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        _gen("nope")
    with pytest.raises(ValueError, match="no difficulty knob 'facts'"):
        _gen("niah", facts=3)
    with pytest.raises(ValueError, match="hops must be 1"):
        _gen("babi", hops=3)
    with pytest.raises(ValueError, match="filler is empty"):
        generate("niah", 1, seed=0, context_tokens=300, count_tokens=count_words, filler=[])


# --------------------------------------------------------------------------- scorers


def _ex(task: str, values: list[str]) -> TaskExample:
    return TaskExample(task, f"{task}-x", "p", " ".join(values), values, [" ".join(values)], 0)


def test_niah_scorer():
    ex = _ex("niah", ["1234567", "7654321", "1111111", "2222222"])
    assert score_generation(ex, "") == 0.0
    assert score_generation(ex, "1234567 and 7654321") == 0.5
    assert score_generation(ex, "Numbers: 1234567,7654321;1111111.\n2222222!") == 1.0
    assert score_generation(ex, "12345678 and 71234567") == 0.0  # digits inside longer numbers do not count


def test_variable_tracking_scorer():
    ex = _ex("variable_tracking", ["ABCDE", "FGHIJ", "KLMNO"])
    assert score_generation(ex, "") == 0.0
    assert score_generation(ex, "abcde, FGHIJ and Klmno.") == 1.0
    assert score_generation(ex, "ABCDE FGHIJ") == 0.0
    assert score_generation(ex, "ABCDEX FGHIJ KLMNO") == 0.0  # whole words only


def test_babi_scorer():
    ex = _ex("babi", ["kitchen"])
    assert score_generation(ex, "") == 0.0
    assert score_generation(ex, " The KITCHEN.") == 1.0
    assert score_generation(ex, "garden, not the kitchen") == 0.0
    assert score_generation(ex, "It is in the kitchen; earlier the garden.") == 1.0


# --------------------------------------------------------------------------- candidates


@pytest.mark.parametrize("task", sorted(TASKS))
def test_candidates_hold_the_answer_once(task):
    examples = _gen(task, 8)
    for ex in examples:
        assert ex.candidates[ex.answer_index] == ex.answer
        assert len(set(ex.candidates)) == len(ex.candidates)
    if task == "babi":
        assert all(ex.candidates == list(ROOMS) for ex in examples)
    else:
        assert all(len(ex.candidates) == 4 for ex in examples)
        assert len({ex.answer_index for ex in examples}) > 1  # position does not leak the answer
        for ex in examples:  # wrong lists have the answer's length and score below 1
            assert {len(c.split()) for c in ex.candidates} == {len(ex.answer.split())}
            assert all(
                score_generation(ex, c) < 1.0 for i, c in enumerate(ex.candidates) if i != ex.answer_index
            )


# --------------------------------------------------------------------------- files


def test_jsonl_round_trip(tmp_path):
    examples = _gen("niah", 2) + _gen("variable_tracking", 2) + _gen("babi", 2, hops=2)
    path = tmp_path / "sub" / "tasks.jsonl"
    assert write_jsonl(examples, path) == 6
    assert read_jsonl(path) == examples
    assert [p.name for p in path.parent.iterdir()] == ["tasks.jsonl"]  # no tmp file left behind
    assert TaskExample.from_json(json.loads(json.dumps(examples[0].to_json()))) == examples[0]


def test_read_jsonl_errors_name_file_line_and_key(tmp_path):
    good = _gen("babi", 1)[0].to_json()
    path = tmp_path / "bad.jsonl"

    def write(*objs: object) -> None:
        path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n")

    write(good, {k: v for k, v in good.items() if k != "answer"})
    with pytest.raises(TaskFileError, match=rf"{re.escape(str(path))}:2: missing key 'answer'"):
        read_jsonl(path)
    write(good, good, {**good, "answer_index": "2"})
    with pytest.raises(TaskFileError, match=r"bad\.jsonl:3: bad key 'answer_index'"):
        read_jsonl(path)
    write({**good, "answer_index": 99})
    with pytest.raises(TaskFileError, match=r":1: bad key 'answer_index': 99 is out of range"):
        read_jsonl(path)
    write(good, "", "{not json")
    with pytest.raises(TaskFileError, match=r"bad\.jsonl:3: invalid JSON"):
        read_jsonl(path)


def test_load_filler(tmp_path):
    docs = tmp_path / "documents.jsonl"
    docs.write_text(
        json.dumps({"text": "Too short. This one has   five\n words in it! And is this one long enough? Yes"})
        + "\n\n"
        + json.dumps({"text": " ".join(["word"] * 61) + ". A second document with five words."})
        + "\n"
    )
    assert load_filler(docs) == [
        "This one has five words in it!",
        "And is this one long enough?",
        "A second document with five words.",
    ]
    assert load_filler(docs, max_sentences=1) == ["This one has five words in it!"]
    txt = tmp_path / "prose.txt"
    txt.write_text("The first plain sentence here. The second plain sentence here.")
    assert load_filler(txt) == ["The first plain sentence here.", "The second plain sentence here."]
    docs.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(TaskFileError, match=r"documents\.jsonl:1: no field 'text'"):
        load_filler(docs)
    with pytest.raises(TaskFileError, match=r"missing\.txt"):
        load_filler(tmp_path / "missing.txt")


def test_cli_writes_a_readable_set(tmp_path, capsys):
    filler = tmp_path / "prose.txt"
    filler.write_text(" ".join(FILLER))
    out = tmp_path / "vt.jsonl"
    args = ["--task", "variable_tracking", "--n", "3", "--context-tokens", "250", "--filler", str(filler)]
    assert main([*args, "--out", str(out), "--hops", "2"]) == 0
    examples = read_jsonl(out)
    assert [len(e.values) for e in examples] == [3, 3, 3]
    assert examples == generate(
        "variable_tracking",
        3,
        seed=0,
        context_tokens=250,
        count_tokens=count_words,
        filler=load_filler(filler),
        hops=2,
    )
    assert main([*args[:-4], "--context-tokens", "5", "--filler", str(filler), "--out", str(out)]) == 2
    assert "too small" in capsys.readouterr().err


def test_shipped_eval_and_task_data_configs_load():
    """Every YAML under configs/eval and the task-data config parse against their schemas."""
    from pathlib import Path

    from data_prep.task_sft import TaskDataConfig
    from launch.evaluate import EvalRunConfig
    from pipeline.config import load_config

    for path in sorted(Path("configs/eval").glob("*.yaml")):
        cfg = load_config(EvalRunConfig, path)
        assert cfg.tasks and set(cfg.memory) <= {"off", "on"}
        assert all(t.task in ("niah", "variable_tracking", "babi") for t in cfg.tasks)
    assert load_config(TaskDataConfig, "configs/data/tasks.yaml").seed != 1000  # never the eval seed
