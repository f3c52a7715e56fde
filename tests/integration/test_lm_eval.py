"""lm-evaluation-harness runs our checkpoint offline, end to end, on task YAMLs over local jsonl."""

from __future__ import annotations

import json
import math
import os
import tempfile

import pytest

# Offline and a private cache, before datasets / lm_eval are imported (they read these at import).
_CACHE = tempfile.mkdtemp(prefix="memdlm-hf-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", _CACHE)
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_CACHE, "datasets"))

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from pipeline.eval.likelihood import mc_loglikelihood  # noqa: E402
from pipeline.eval.lm_eval_model import MemDLMEvalModel  # noqa: E402
from pipeline.sampler import SamplerConfig, cut_at_eos  # noqa: E402


def _docs():
    """Short hand-made questions: the tiny model's 512 tokens hold them with room to spare."""
    rooms = ["kitchen", "garden", "office", "hallway"]
    people = ["Mary", "John", "Sandra", "Daniel", "Mary"]
    return [
        {
            "prompt": f"{p} went to the {rooms[i % 4]}. Where is {p}?\nAnswer:",
            "candidates": rooms,
            "answer_index": i % 4,
            "answer": rooms[i % 4],
        }
        for i, p in enumerate(people)
    ]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval_tasks")
    data = d / "rooms.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in _docs()))
    common = (
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"  # absolute: lm-eval resolves against the cwd
        "test_split: test\n"
        'doc_to_text: "{{prompt}}"\n'
        "metadata:\n  version: 1.0\n"
    )
    (d / "rooms_mc.yaml").write_text(
        "task: rooms_mc\noutput_type: multiple_choice\n" + common + 'doc_to_choice: "{{candidates}}"\n'
        "doc_to_target: answer_index\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (d / "rooms_gen.yaml").write_text(
        "task: rooms_gen\noutput_type: generate_until\n" + common + 'doc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return d


def test_lm_eval_runs_our_checkpoint_offline_and_scores_like_our_own_code(tiny_export, task_dir):
    lm = MemDLMEvalModel(checkpoint=str(tiny_export), mc_samples=2)
    res = simple_evaluate(
        model=lm,
        tasks=["rooms_mc", "rooms_gen"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    acc = res["results"]["rooms_mc"]["acc,none"]
    em = res["results"]["rooms_gen"]["exact_match,none"]
    # The same numbers computed directly with the likelihood estimator and the sampler.
    s, tok = lm.sampler, lm.tok
    hits = 0
    for doc in _docs():
        p = tok.encode(doc["prompt"])
        ll = mc_loglikelihood(
            s.model,
            [p] * 4,
            [tok.encode(" " + c) for c in doc["candidates"]],
            mask_id=s.mask_id,
            pad_id=s.pad_id,
            vocab_size=s.vocab_size,
            samples=2,
            seed=0,
        ).loglik
        hits += max(range(4), key=ll.__getitem__) == doc["answer_index"]
    assert acc == pytest.approx(hits / 5)
    gens = {smp["doc"]["prompt"]: smp["resps"][0][0] for smp in res["samples"]["rooms_gen"]}
    correct = 0
    for doc in _docs():
        ids = s.generate([tok.encode(doc["prompt"])], SamplerConfig(gen_length=6, steps=6)).tokens[0].tolist()
        text = tok.decode(cut_at_eos(ids, tok.eos_id)).split("\n")[0]
        assert gens[doc["prompt"]] == text
        correct += text.strip() == doc["answer"]
    assert em == pytest.approx(correct / 5)


def test_lm_eval_builds_the_registered_model_from_its_name(tiny_export, task_dir):
    res = simple_evaluate(
        model="memdlm",
        model_args=f"checkpoint={tiny_export},mc_samples=2,adapt=true",
        tasks=["rooms_mc"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        limit=2,
        bootstrap_iters=0,
        log_samples=False,
    )
    assert 0.0 <= res["results"]["rooms_mc"]["acc,none"] <= 1.0
    assert res["n-samples"]["rooms_mc"]["effective"] == 2


class _Req:
    def __init__(self, *args):
        self.args = args


def test_rolling_loglikelihood_sums_windows_and_adapted_memory_changes_scores(tiny_export):
    plain = MemDLMEvalModel(checkpoint=str(tiny_export), mc_samples=2)
    text = "Mary went to the kitchen. John went to the garden. " * 20
    n = len(plain.tok.encode(text))
    assert n > plain.seq_len // 2  # several windows
    (ll,) = plain.loglikelihood_rolling([_Req(text)])
    assert math.isfinite(ll) and ll < 0
    adapted = MemDLMEvalModel(checkpoint=str(tiny_export), mc_samples=2, adapt=True)
    req = [_Req("Mary went to the kitchen. Where is Mary?", " kitchen")]
    assert adapted.loglikelihood(req)[0][0] != plain.loglikelihood(req)[0][0]
    with pytest.raises(ValueError, match=r"unknown key.*mc_sample"):
        MemDLMEvalModel(checkpoint=str(tiny_export), mc_sample=2)


def test_lm_eval_command_line_writes_the_results(tiny_export, task_dir, tmp_path):
    from pipeline.eval.lm_eval_model import main

    out = tmp_path / "res.json"
    args = ["--checkpoint", str(tiny_export), "--include-path", str(task_dir), "--tasks", "rooms_mc"]
    assert main([*args, "--limit", "2", "--model-args", "mc_samples=2", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert 0.0 <= res["rooms_mc"]["acc,none"] <= 1.0
