"""bAbI qa1/qa2-style location questions hidden in prose (after the BABILong task description).

A story of ``facts`` sentences: agents move between rooms ("Mary went to the kitchen."), pick up
objects ("John grabbed the apple.") and drop them ("John dropped the apple."). The sentences keep
their order and are hidden at seeded depths in prose.

* ``hops=1`` (qa1): only moves; "Where is Mary?" -- the agent's last room.
* ``hops=2`` (qa2): moves, pick-ups and drops; "Where is the apple?" -- the object goes with whoever
  holds it, so the answer needs the pick-up and the carrier's later move. The queried object was
  always carried through at least one move, so it cannot be read off a single sentence.

Prompt (haystack truncated)::

    A story about people moving between rooms and handling objects is hidden in the following
    text. Read it and answer the question about the story.

    <prose> Sandra went to the office. <prose> Sandra picked up the milk. <prose> John
    journeyed to the garden. <prose> Sandra travelled to the kitchen. <prose> ...

    Question: Where is the milk? Answer with the name of a room.
    Answer:

``answer`` is the room ("kitchen"), computed by simulating the story, so it is correct by
construction; ``values`` is ``[room]``. A generation scores 1.0 when the first room name in it is
the answer. ``candidates`` are all rooms in the fixed order of :data:`ROOMS`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from data_prep.retrieval_tasks.common import CountTokens, TaskExample, build_prompt, example_rng
from pipeline.dataset.task_format import BABI_ROOMS, score_babi

TASK = "babi"

AGENTS = ("Mary", "John", "Daniel", "Sandra")
ROOMS = BABI_ROOMS
OBJECTS = ("apple", "football", "milk")
MOVE_VERBS = ("went to", "journeyed to", "travelled to", "moved to")
PICK_VERBS = ("picked up", "grabbed", "got", "took")
DROP_VERBS = ("dropped", "discarded", "put down")

INSTRUCTIONS = (
    "A story about people moving between rooms and handling objects is hidden in the following text. "
    "Read it and answer the question about the story."
)
QUESTION = "Question: Where is {target}? Answer with the name of a room."

# (kind, agent, room or object); kind is "move", "pickup" or "drop"
Event = tuple[str, str, str]

_WEIGHTS = {"move": 5, "pickup": 3, "drop": 2}
_MAX_ATTEMPTS = 1000


@dataclass
class StoryState:
    """Where everyone and everything is after some events."""

    agent_room: dict[str, str] = field(default_factory=dict)
    holder: dict[str, str] = field(default_factory=dict)  # object -> agent holding it
    dropped_at: dict[str, str] = field(default_factory=dict)  # object -> room it was left in

    def object_room(self, obj: str) -> str | None:
        if obj in self.holder:
            return self.agent_room.get(self.holder[obj])
        return self.dropped_at.get(obj)

    def apply(self, event: Event) -> None:
        """Apply one event; ValueError if the story could not have happened."""
        kind, agent, arg = event
        if kind == "move":
            self.agent_room[agent] = arg
        elif kind == "pickup":
            if agent not in self.agent_room or arg in self.holder:
                raise ValueError(f"{agent} cannot pick up the {arg}")
            where = self.dropped_at.pop(arg, None)
            if where is not None and where != self.agent_room[agent]:
                raise ValueError(f"{agent} cannot pick up the {arg}: it is in the {where}")
            self.holder[arg] = agent
        elif kind == "drop":
            if self.holder.get(arg) != agent:
                raise ValueError(f"{agent} does not hold the {arg}")
            del self.holder[arg]
            self.dropped_at[arg] = self.agent_room[agent]
        else:
            raise ValueError(f"unknown event kind {kind!r}")


def simulate(events: Sequence[Event]) -> StoryState:
    """The state after ``events``, in order."""
    state = StoryState()
    for event in events:
        state.apply(event)
    return state


def _options(state: StoryState, hops: int) -> dict[str, list[tuple[str, str]]]:
    opts: dict[str, list[tuple[str, str]]] = {
        "move": [(a, r) for a in AGENTS for r in ROOMS if r != state.agent_room.get(a)]
    }
    if hops == 2:
        opts["pickup"] = [
            (a, o)
            for a in AGENTS
            if a in state.agent_room
            for o in OBJECTS
            if o not in state.holder and state.dropped_at.get(o, state.agent_room[a]) == state.agent_room[a]
        ]
        opts["drop"] = [(a, o) for o, a in state.holder.items()]
    return {k: v for k, v in opts.items() if v}


def _story(rng: random.Random, facts: int, hops: int) -> tuple[list[Event], str, str]:
    """Random stories until one has an answerable target; returns (events, target, room)."""
    for _ in range(_MAX_ATTEMPTS):
        state = StoryState()
        carried: dict[str, bool] = {}  # object -> moved by its holder since its last pick-up
        events: list[Event] = []
        for _ in range(facts):
            opts = _options(state, hops)
            kinds = sorted(opts)
            kind = rng.choices(kinds, weights=[_WEIGHTS[k] for k in kinds])[0]
            agent, arg = rng.choice(opts[kind])
            event = (kind, agent, arg)
            state.apply(event)
            events.append(event)
            if kind == "pickup":
                carried[arg] = False
            elif kind == "move":
                for obj, holder in state.holder.items():
                    if holder == agent:
                        carried[obj] = True
        if hops == 1:
            targets = sorted(state.agent_room)
        else:
            targets = sorted(o for o, moved in carried.items() if moved)
        if targets:
            target = rng.choice(targets)
            room = state.agent_room[target] if hops == 1 else state.object_room(target)
            assert room is not None  # targets are only agents/objects with a known room
            return events, target, room
    raise RuntimeError(f"no answerable babi story with facts={facts}, hops={hops} in {_MAX_ATTEMPTS} tries")


def _render(rng: random.Random, event: Event) -> str:
    kind, agent, arg = event
    verb = rng.choice({"move": MOVE_VERBS, "pickup": PICK_VERBS, "drop": DROP_VERBS}[kind])
    return f"{agent} {verb} the {arg}."


def _reject(sentence: str) -> bool:
    # Prose naming one of the agents could read as a story sentence ("Mary went to the garden.").
    return any(a in sentence for a in AGENTS)


def generate_example(
    seed: int,
    index: int,
    *,
    context_tokens: int,
    count_tokens: CountTokens,
    filler: Sequence[str],
    hops: int = 1,
    facts: int = 8,
) -> TaskExample:
    """Example ``index`` of the bAbI-style set under ``seed``."""
    if hops not in (1, 2):
        raise ValueError(f"babi hops must be 1 (where is an agent) or 2 (where is an object), got {hops}")
    min_facts = 1 if hops == 1 else 3  # qa2 needs at least: move, pick up, move
    if facts < min_facts:
        raise ValueError(f"babi with hops={hops} needs facts >= {min_facts}, got {facts}")
    rng = example_rng(TASK, seed, index)
    events, target, room = _story(rng, facts, hops)
    hay = build_prompt(
        rng,
        task=TASK,
        instructions=INSTRUCTIONS,
        statements=[_render(rng, e) for e in events],
        question=QUESTION.format(target=target if hops == 1 else f"the {target}"),
        context_tokens=context_tokens,
        count_tokens=count_tokens,
        filler=filler,
        reject=_reject,
    )
    return TaskExample(
        task=TASK,
        id=f"{TASK}-{seed}-{index}",
        prompt=hay.prompt,
        answer=room,
        values=[room],
        candidates=list(ROOMS),
        answer_index=ROOMS.index(room),
        meta={
            "context_tokens": context_tokens,
            "prompt_tokens": hay.prompt_tokens,
            "filler_sentences": hay.filler_sentences,
            "hops": hops,
            "facts": facts,
            "target": target,
            "positions": hay.positions,
        },
    )


score = score_babi  # the rule lives in the task-file contract (pipeline/dataset/task_format.py)
