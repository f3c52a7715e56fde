"""Every data_prep entry point, `launch.sample` and the lm-eval command line: a bad input is one
``error:`` line naming it, exit status 2, no traceback (pipeline/cli.py's run_main)."""

from __future__ import annotations

import os
import sys

import pytest

from tests import _proc


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, args, message",
    [
        (
            "data_prep.prepare",
            ["--corpus", "{tmp}/none.jsonl", "--out", "{tmp}/ds"],
            "corpus path '{tmp}/none.jsonl' does not exist",
        ),
        (
            "data_prep.task_sft",
            ["out_dir={tmp}/t", "tokenizer={tmp}/none"],
            "{tmp}/none: tokenizer not found",
        ),
        ("data_prep.sample_corpus", ["--out", "{tmp}/file/corpus"], "cannot create {tmp}/file/corpus"),
        (
            "data_prep.retrieval_tasks",
            [
                "--task",
                "niah",
                "--n",
                "2",
                "--context-tokens",
                "50",
                "--filler",
                "{tmp}/none.txt",
                "--out",
                "{tmp}/t.jsonl",
            ],
            "{tmp}/none.txt: filler file not found",
        ),
        ("launch.sample", ["--checkpoint", "{tmp}", "--prompt", "x"], "{tmp}: not an export directory"),
        (
            "pipeline.eval.lm_eval_model",
            ["--checkpoint", "{tmp}", "--tasks", "x"],
            "{tmp}: no model.safetensors",
        ),
    ],
    ids=["prepare", "task_data", "sample_corpus", "tasks", "sample", "lm_eval_model"],
)
def test_a_bad_input_is_one_error_line_and_exit_2(tmp_path, module, args, message):
    (tmp_path / "file").write_text("a file where a directory is expected\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "MEMDLM_DEBUG": "0"}
    out = _proc.run(
        [sys.executable, "-m", module, *(a.format(tmp=tmp_path) for a in args)], timeout=300, env=env
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {message.format(tmp=tmp_path)}"), out.stderr[
        -3000:
    ]
