"""`make eval`'s runner end to end on a tiny export: task files, scores, exposure bias, MLflow."""

from __future__ import annotations

import json

import pytest

from launch.evaluate import EvalRunConfig, main, run
from pipeline.config import ConfigError, load_config


def _cfg(tmp_path, dataset, filler, *extra):
    overrides = [
        f"out_dir={tmp_path / 'eval'}",
        f"filler={filler}",
        f"tracking.root={tmp_path / 'mlruns'}",
        "tasks=[{task: niah, context_tokens: 420, n: 3, difficulty: {values: 2}}, "
        "{task: babi, context_tokens: 440, n: 3, difficulty: {facts: 4}}]",
        "scoring.mc_samples=2",
        f"exposure_bias.data={dataset}",
        "exposure_bias.pairs=3",
        "exposure_bias.prompt_tokens=16",
        "exposure_bias.response_tokens=8",
        "exposure_bias.steps=4",
        *extra,
    ]
    return load_config(EvalRunConfig, "configs/eval/local.yaml", overrides)


@pytest.fixture
def filler(tmp_path):
    import random

    from tests.conftest import WORDS

    rng = random.Random(0)
    path = tmp_path / "filler.txt"
    path.write_text(
        " ".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
            for _ in range(400)
        )
    )
    return path


def test_eval_run_writes_tables_curves_and_an_mlflow_run(tiny_export, tiny_dataset, tmp_path, filler):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path, tiny_dataset, filler)
    out = run([str(tiny_export)], cfg)
    data = json.loads((out / "results.json").read_text())
    (res,) = data["results"]
    assert set(res["tasks"]) == {"niah@420,values=2", "babi@440,facts=4"}
    for by_mem in res["tasks"].values():
        assert set(by_mem) == {"off", "on"}
        for s in by_mem.values():
            assert 0.0 <= s["generation"] <= 1.0 and 0.0 <= s["ranking"] <= 1.0 and s["n"] == 3
    for mem in ("off", "on"):
        c = res["exposure_bias"][mem]
        assert c["steps"] == [1, 2, 3] and c["masked_ratio"] == [0.75, 0.5, 0.25]
        assert c["R"] == pytest.approx([s / t for s, t in zip(c["L_seq"], c["L_static"], strict=True)])
    # memory on changes the numbers: the adapted memory is really used
    assert res["exposure_bias"]["on"]["L_seq"] != res["exposure_bias"]["off"]["L_seq"]
    md = (out / "results.md").read_text()
    assert "MemDLM train-only" in md and "MemDLM + inference adaptation" in md and "niah@420" in md
    assert (out / "exposure_bias.png").stat().st_size > 1000
    assert (tmp_path / "eval" / "latest").resolve() == out.resolve()
    # the same numbers read back from MLflow
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eval")
    (mrun,) = client.search_runs([exp.experiment_id])
    name = f"memdlm_at_{tiny_export.parent.name}"
    key = f"{name}/babi_at_440_facts-4/on/ranking"
    assert mrun.data.metrics[key] == pytest.approx(res["tasks"]["babi@440,facts=4"]["on"]["ranking"])
    hist = client.get_metric_history(mrun.info.run_id, f"{name}/exposure_bias_R/off")
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx(
        res["exposure_bias"]["off"]["R"]
    )


def test_eval_run_is_deterministic(tiny_export, tiny_dataset, tmp_path, filler):
    cfg = _cfg(
        tmp_path,
        tiny_dataset,
        filler,
        "exposure_bias.enabled=false",
        "tracking.enabled=false",
        'memory=["on"]',
    )
    a = json.loads((run([str(tiny_export)], cfg) / "results.json").read_text())["results"][0]["tasks"]
    b = json.loads((run([str(tiny_export)], cfg) / "results.json").read_text())["results"][0]["tasks"]
    for d in (a, b):
        for by in d.values():
            by["on"].pop("seconds")
    assert a == b


def test_eval_config_and_checkpoint_errors_are_clear(tmp_path, capsys):
    with pytest.raises(ConfigError, match="memory"):
        load_config(EvalRunConfig, None, ['memory=["of"]'])
    # YAML 1.1 reads bare off/on as booleans: refused, not silently turned into False/True
    with pytest.raises(ConfigError, match=r"memory\[0\]': got False, expected a string"):
        load_config(EvalRunConfig, None, ["memory=[off, on]"])
    with pytest.raises(ConfigError, match=r"tasks\[0\].contxt_tokens.*did you mean 'context_tokens'"):
        load_config(EvalRunConfig, None, ["tasks=[{task: niah, contxt_tokens: 100}]"])
    assert main(["--checkpoint", str(tmp_path)]) == 2
    assert "not an export directory" in capsys.readouterr().err


def test_task_scores_equal_a_direct_per_example_computation(tiny_export, filler):
    """Batched scoring (candidate offsets, memory rows, EOS cut) against one example at a time."""
    from data_prep.retrieval_tasks import generate, load_filler, score_generation
    from pipeline.eval.likelihood import mc_loglikelihood
    from pipeline.eval.task_scores import TaskScoringConfig, evaluate_examples
    from pipeline.sampler import SamplerConfig, cut_at_eos, load_sampler

    sampler, tok, _ = load_sampler(tiny_export)
    examples = generate(
        "variable_tracking",
        3,
        seed=5,
        context_tokens=420,
        count_tokens=lambda s: len(tok.encode(s)),
        filler=load_filler(filler),
        hops=1,
        distractors=0,
    )
    cfg = TaskScoringConfig(batch_size=2, mc_samples=2)
    for adapt in (False, True):
        got = evaluate_examples(sampler, tok, examples, adapt=adapt, cfg=cfg)
        G = got["gen_length"]
        gen, hits, texts, chose = [], 0, [], []
        for ex in examples:
            p = tok.encode(ex.prompt)
            out = sampler.generate([p], SamplerConfig(gen_length=G, steps=G, adapt=adapt))
            texts.append(tok.decode(cut_at_eos(out.tokens[0].tolist(), tok.eos_id)))
            gen.append(score_generation(ex, texts[-1]))
            conts = [[*tok.encode(" " + c), tok.eos_id] for c in ex.candidates]
            ll = mc_loglikelihood(
                sampler.model,
                [p] * len(conts),
                conts,
                mask_id=sampler.mask_id,
                pad_id=sampler.pad_id,
                vocab_size=sampler.vocab_size,
                samples=2,
                fast=out.fast,
                fast_rows=[0] * len(conts) if adapt else None,
            ).loglik
            best = max(range(len(ll)), key=ll.__getitem__)
            chose.append(ex.candidates[best])
            hits += best == ex.answer_index
        assert [s["generated"] for s in got["samples"]] == texts
        assert [s["chose"] for s in got["samples"]] == chose
        assert got["generation"] == pytest.approx(sum(gen) / 3)
        assert got["ranking"] == pytest.approx(hits / 3)


def test_make_eval_and_sample_pass_their_arguments_through():
    import subprocess

    def dry(*args: str) -> str:
        return subprocess.run(["make", "-n", *args], capture_output=True, text=True, check=True).stdout

    assert "--checkpoint a/export --checkpoint b/export --config configs/eval/local.yaml" in dry(
        "eval", "CHECKPOINT=a/export b/export"
    )
    assert '--checkpoint c/export --prompt "Once upon"' in dry(
        "sample", "CHECKPOINT=c/export", "PROMPT=Once upon"
    )
