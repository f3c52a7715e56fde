"""An imported Hugging Face model, with its own tokenizer.json, fine-tuned with MemDLM under ZeRO-3
at TP=2 x DP=1 and at TP=1 x DP=2 (2 real gloo processes), then `make sample` and `make eval` on
the result.

The source is a random LlamaForCausalLM (GQA) whose vocabulary is a byte-level BPE tokenizer.json
trained here (no hub access) with [MASK] (config.json ``mask_token_id`` and tokenizer_config.json
``mask_token``), PAD, BOS, EOS and a chat template. ``import_hf`` converts it; the SFT set is the
retrieval-task data of ``make sft`` (data_prep/task_sft.py) tokenised with the export's
tokenizer and rendered with its chat template; tests/distributed/_hf_finetune_worker.py trains
8 steps per layout and exports.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.retrieval_tasks import generate
from data_prep.task_sft import TaskDataConfig, TaskSFTSet, prepare_task_data
from pipeline.dataset.manifest import manifest_from_json
from pipeline.dataset.tokenizer import load_tokenizer
from pipeline.hf.convert import import_hf
from tests import _proc
from tests.conftest import WORDS
from tests.distributed._launch import ROOT, torchrun
from tests.unit.test_hf_tokenizer import write_hf_tokenizer

WORKER = Path(__file__).with_name("_hf_finetune_worker.py")
RUNS = {"tp2": {"tp": 2, "dp": 1}, "dp2": {"tp": 1, "dp": 2}}
VOCAB, SEQ_LEN, CONTEXT = 720, 96, 72
BABI = {"facts": 2}  # one babi task set: the shortest prompts (about 60 tokens with this tokenizer)


def _filler(path: Path) -> Path:
    rng = random.Random(0)
    sentences = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "." for _ in range(400)
    ]
    path.write_text(" ".join(sentences) + "\n")
    return path


def _hf_tokenizer(directory: Path, filler: Path) -> Path:
    """A byte-level BPE tokenizer.json of VOCAB tokens, trained on the filler prose and on task
    prompts (so a task fits a short context), with a tokenizer_config.json as transformers writes
    it: PAD, BOS, EOS and [MASK] declared, and a chat template."""

    from data_prep.retrieval_tasks import load_filler

    sentences = load_filler(filler)
    words = lambda s: len(s.split())  # noqa: E731
    texts = list(sentences)
    for seed in (5, 6):
        for ex in generate(
            "babi", 20, seed=seed, context_tokens=60, count_tokens=words, filler=sentences, **BABI
        ):
            texts.append(f"{ex.prompt} {ex.answer}")
    return write_hf_tokenizer(directory, vocab_size=VOCAB, texts=texts)


def _source_model(src: Path, filler: Path) -> Path:
    """A random Llama with GQA (4 query heads, 2 key/value heads) over the tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(_hf_tokenizer(src, filler))
    assert tok.vocab_size == VOCAB
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )
    cfg.mask_token_id = tok.mask_id
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(src)
    return src


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_finetune")
    filler = _filler(root / "filler.txt")
    src = _source_model(root / "src", filler)
    export = import_hf(src, root / "import")
    # `make sft`'s data step with the export as the tokenizer (its hf_tokenizer/tokenizer.json)
    prepare_task_data(
        TaskDataConfig(
            out_dir=str(root / "sft"),
            tokenizer=str(export),
            chat_template="tokenizer",
            filler=str(filler),
            seq_len=SEQ_LEN,
            train_shards=2,
            val_shards=2,  # one per data-parallel rank at DP=2
            tasks=[TaskSFTSet(task="babi", context_tokens=CONTEXT, n_train=32, n_val=4, difficulty=BABI)],
        )
    )
    out = root / "out"
    out.mkdir()
    proc = torchrun(WORKER, 2, str(export), str(root / "sft"), str(out), timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return {"root": root, "src": src, "import": export, "data": root / "sft", "out": out, "filler": filler}


@pytest.mark.parametrize("run", RUNS)
def test_imported_model_fine_tunes_with_its_tokenizer_json_and_exports(runs, run):
    result = json.loads((runs["out"] / f"{run}.json").read_text())
    assert result["layout"] == RUNS[run]
    records = result["history"]
    assert [r["step"] for r in records] == list(range(1, 9))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses), losses
    # the training loss (fresh noise each step, ELBO-weighted: noisy) is down over 8 steps ...
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    # ... and the held-out loss at fixed noise, memory off and after adapting to the prompt, clearly so
    before, after = result["before"], result["after"]
    for key in ("eval/loss", "eval/continuation_loss_adapted"):
        assert math.isfinite(before[key]) and after[key] < 0.8 * before[key], (key, before, after)
    run_dir = runs["out"] / run
    record = run_dir / "dataset_manifest.json"  # the run's copy of the manifest it trained on
    manifest = manifest_from_json(json.loads(record.read_text()), str(record))
    assert (manifest.kind, manifest.tokenizer_kind, manifest.tokenizer_file) == (
        "sft",
        "tokenizer.json",
        "tokenizer.json",
    )
    assert manifest.corpus["chat_template"] == "tokenizer"
    source_tok = load_tokenizer(runs["src"])  # the source checkpoint's tokenizer.json + config
    assert manifest.tokenizer_sha256 == source_tok.sha256
    export = run_dir / "export"
    assert (export / "tokenizer.json").is_file() and (export / "tokenizer_config.json").is_file()
    assert not (export / "tokenizer.model").exists()
    tok = load_tokenizer(export)
    assert (tok.kind, tok.sha256, tok.special_ids()) == (
        "tokenizer.json",
        source_tok.sha256,
        manifest.special_ids,
    )
    info = json.loads((export / "config.json").read_text())
    assert (info["method"], info["memory"]["enabled"], info["step"]) == ("memdlm", True, 8)
    assert (info["model"]["n_kv_heads"], info["model"]["vocab_size"], info["model"]["seq_len"]) == (
        2,
        VOCAB,
        SEQ_LEN,
    )
    source_cfg = json.loads((runs["src"] / "config.json").read_text())
    assert info["special_ids"]["mask"] == source_cfg["mask_token_id"] == tok.mask_id
    # every tensor of the imported model is there (same names and shapes), and training moved them
    start = load_file(str(runs["import"] / "model.safetensors"))
    end = load_file(str(export / "model.safetensors"))
    assert {k: v.shape for k, v in end.items()} == {k: v.shape for k, v in start.items()}
    assert all(not torch.equal(end[k], start[k]) for k in ("embedding.weight", "layers.0.qkv.weight"))


def _cli(*args: str, timeout: int = 240):
    return _proc.run([sys.executable, *args], timeout=timeout, cwd=ROOT)


def test_make_sample_generates_from_the_fine_tuned_export(runs):
    export = runs["out"] / "tp2" / "export"
    tok = load_tokenizer(export)
    questions = ("Where is the lamp?", "Where is Mary?", "Where is the river?")
    prompts = [  # rendered as the SFT data was: the user turn and the generation prompt
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in questions
    ]
    proc = _cli(
        "-m",
        "launch.sample",
        "--checkpoint",
        str(export),
        *(a for p in prompts for a in ("--prompt", p)),
        "--gen-length",
        "8",
        "--temperature",
        "1.0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"checkpoint {export}: method memdlm, step 8" in proc.stdout
    # a MemDLM export samples with memory off, then on (adapted to the prompt): each prompt, then
    # its response cut at the first EOS (a response may be empty: EOS is a valid first token)
    parts = [p.split(" ---\n", 1) for p in proc.stdout.split("--- memory ")[1:]]
    assert [mode for mode, _ in parts] == ["off"] * 3 + ["on (adapted to the prompt)"] * 3
    responses = []
    for (_, text), prompt in zip(parts, prompts * 2, strict=True):
        assert text.startswith(prompt), text
        responses.append(text[len(prompt) :].rstrip("\n"))
    assert any(r.strip() for r in responses), proc.stdout  # the tokenizer.json decodes real text


def test_make_eval_scores_the_fine_tuned_export(runs):
    eval_cfg = runs["root"] / "eval.yaml"
    eval_cfg.write_text(
        json.dumps(  # JSON is YAML
            {
                "out_dir": str(runs["root"] / "eval"),
                "filler": str(runs["filler"]),
                "device": "cpu",
                "memory": ["off", "on"],
                "tasks": [{"task": "babi", "context_tokens": CONTEXT, "n": 2, "difficulty": BABI}],
                "scoring": {"batch_size": 2, "mc_samples": 2, "precision": "fp32"},
                "exposure_bias": {
                    "data": str(runs["data"]),  # the SFT set's val split: the export's tokenizer
                    "pairs": 2,
                    "prompt_tokens": 16,
                    "response_tokens": 8,
                    "steps": 4,
                },
                "tracking": {"enabled": False},
            }
        )
    )
    export = runs["out"] / "dp2" / "export"
    proc = _cli("-m", "launch.evaluate", "--checkpoint", str(export), "--config", str(eval_cfg))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (res,) = json.loads((runs["root"] / "eval" / "latest" / "results.json").read_text())["results"]
    assert (res["method"], res["step"]) == ("memdlm", 8)
    (scores,) = res["tasks"].values()
    assert set(scores) == {"off", "on"}
    for s in scores.values():
        assert s["n"] == 2 and 0.0 <= s["generation"] <= 1.0 and 0.0 <= s["ranking"] <= 1.0
    for mem in ("off", "on"):
        curve = res["exposure_bias"][mem]
        assert curve["steps"] == [1, 2, 3] and all(math.isfinite(r) for r in curve["R"])
