"""Hostile chat templates: nested loops that would write gigabytes or never end, one huge string.

Each renders in a child process (its address space capped at 3 GiB, so a rendering without limits
fails there instead of taking the machine) that reports how long the rendering took, the error and
how much its peak resident memory grew (VmHWM, reset just before).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline.dataset.hf_tokenizer import RENDER_MAX_CHARS, RENDER_TIME_LIMIT_S
from tests import _proc
from tests.unit.test_hf_tokenizer import write_hf_tokenizer

CHILD = """
import json, re, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from pipeline.dataset.tokenizer import TokenizerError, load_tokenizer

def kib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

tok = load_tokenizer(sys.argv[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident size
before = kib("VmRSS")
t0 = time.monotonic()
try:
    tok.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True)
    error = None
except TokenizerError as exc:
    error = str(exc)
took = time.monotonic() - t0
print(json.dumps({"seconds": took, "error": error, "grew_mib": (kib("VmHWM") - before) / 1024}))
"""

LIMITS = f"(limits per conversation: {RENDER_TIME_LIMIT_S:g} s, {RENDER_MAX_CHARS:,} characters of output)"
# 10**10 copies of the message (110 GB); 10**10 empty iterations (range() is capped at 100,000 by
# jinja's sandbox, not their product); one 10 GB string.
GIGABYTES = "{% for i in range(100000) %}{% for j in range(100000) %}{{ messages[0]['content'] }}{% endfor %}{% endfor %}"
FOREVER = (
    "{% set s = messages[0]['content'] * 3000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"
)
HUGE = "{{ 'x' * 10**10 }}"


def _render_in_child(tok_dir: Path) -> dict:
    out = _proc.run([sys.executable, "-c", CHILD, str(tok_dir / "tokenizer.json")], timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "template, in_jinja_file, why",
    [
        (GIGABYTES, False, f"its output passed {RENDER_MAX_CHARS:,} characters"),
        (FOREVER, True, f"it ran past {RENDER_TIME_LIMIT_S:g} s"),
        (HUGE, False, f"'*' would build more than {RENDER_MAX_CHARS:,} characters"),
    ],
    ids=["nested-loops-writing-gigabytes", "nested-loops-without-end", "one-10-GB-string"],
)
def test_a_hostile_chat_template_stops_within_seconds_with_an_error_naming_its_file_and_limit(
    tmp_path, template, in_jinja_file, why
):
    tok_dir = tmp_path / "tok"
    if in_jinja_file:  # a chat_template.jinja beside the tokenizer (newer transformers save it there)
        write_hf_tokenizer(tok_dir, drop=("chat_template",))
        (tok_dir / "chat_template.jinja").write_text(template)
        source = f"{tok_dir / 'chat_template.jinja'}"
    else:
        write_hf_tokenizer(tok_dir, config={"chat_template": template})
        source = f"{tok_dir / 'tokenizer_config.json'} key 'chat_template'"
    result = _render_in_child(tok_dir)
    assert result["error"] == f"{source}: chat_template stopped: {why} {LIMITS}"
    assert result["seconds"] < RENDER_TIME_LIMIT_S + 3, result
    assert result["grew_mib"] < 64, result  # the output is counted as it streams, never built


def test_a_template_that_fails_on_its_own_is_one_error_naming_its_file(tmp_path):
    from pipeline.dataset.tokenizer import TokenizerError, load_tokenizer

    tok_dir = tmp_path / "tok"
    write_hf_tokenizer(tok_dir, config={"chat_template": "{% for i in range(10**6) %}{% endfor %}"})
    tok = load_tokenizer(tok_dir / "tokenizer.json")
    with pytest.raises(TokenizerError) as caught:
        tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert str(caught.value).startswith(
        f"{tok_dir / 'tokenizer_config.json'} key 'chat_template': chat_template failed: OverflowError: Range too big."
    )
