"""Hugging Face ``tokenizer.json`` tokenizers (the ``tokenizers`` library) as a :class:`Tokenizer`.

Each special token the DLM needs ([MASK], PAD, BOS, EOS) is taken from, in this order:

1. the explicit option (``load_tokenizer(..., special_tokens={"pad": ...})``; the data config's
   ``tokenizer.pad_token`` etc.);
2. ``<name>_token`` of the ``tokenizer_config.json`` beside the tokenizer.json (a string, or
   ``{"content": ...}`` as transformers writes it);
3. ``<name>_token_id`` of a Hugging Face model ``config.json`` beside it (a single id).

and then verified: the token is one id of the vocabulary and text holding it encodes to that id
alone; a model config id agrees with a tokenizer_config.json token; tokenizer_config.json's
``added_tokens_decoder`` agrees with tokenizer.json; [MASK] is none of the others. Nothing is
guessed: a missing token is an error naming the file and how to give it. PAD may be EOS only
when a config says so, and a warning then says what that costs.

Tokens found by 1 or 3 (and a ``chat_template.jinja`` file's template) are written into the
tokenizer_config.json that :meth:`Tokenizer.save` writes, so the copy in a dataset describes
itself: it loads with the same ids and hash, without options.

``encode`` adds no BOS/EOS and never truncates or pads (a tokenizer.json's own truncation and
padding settings are switched off). ``encode_batch`` runs on the library's thread pool, sized by
``RAYON_NUM_THREADS`` when the pool starts and off with ``TOKENIZERS_PARALLELISM=false``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.dataset.tokenizer_types import (
    SPECIAL_TOKEN_NAMES,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_JSON,
    Tokenizer,
    TokenizerError,
    tokenizer_json_sha256,
)

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers versions save the template
MODEL_CONFIG_FILE = "config.json"
_LABELS = {"mask": "[MASK]", "pad": "PAD", "bos": "BOS", "eos": "EOS"}


class _Tokenizers:
    """A ``tokenizers.Tokenizer`` behind the Backend API of pipeline/dataset/tokenizer.py."""

    def __init__(self, tok: Any):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _declared(cfg: Mapping[str, Any] | None, key: str) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken ``{"content": ...}``."""
    value = (cfg or {}).get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _model_config(directory: Path) -> tuple[dict[str, Any] | None, Path]:
    """A Hugging Face model config.json beside the tokenizer (one with ``model_type``), if any."""
    path = directory / MODEL_CONFIG_FILE
    if not path.is_file():
        return None, path
    data = _read_json_object(path)
    return (data if "model_type" in data else None), path


class _Sources:
    """Where the special tokens of one tokenizer.json may come from (see the module docstring)."""

    def __init__(self, path: Path, hf: Any, overrides: Mapping[str, str | None]):
        self.path, self.hf, self.overrides = path, hf, overrides
        self.cfg_path = path.parent / TOKENIZER_CONFIG_FILE
        self.cfg = _read_json_object(self.cfg_path) if self.cfg_path.is_file() else None
        self.model_cfg, self.model_cfg_path = _model_config(path.parent)

    def model_ids(self, name: str) -> list[Any]:
        value = (self.model_cfg or {}).get(f"{name}_token_id")
        return value if isinstance(value, list) else [] if value is None else [value]

    def resolve(self, name: str) -> tuple[str, str]:
        """``(token, where it came from)`` for special token ``name``."""
        key = f"{name}_token"
        if self.overrides.get(name) is not None:
            return str(self.overrides[name]), f"the given {key}"
        declared, ids = _declared(self.cfg, key), self.model_ids(name)
        if declared is not None:
            if ids and self.hf.token_to_id(declared) not in ids:
                raise TokenizerError(
                    f"{self.cfg_path}: {key} '{declared}' is id {self.hf.token_to_id(declared)}, but "
                    f"{self.model_cfg_path} says {name}_token_id {ids if len(ids) > 1 else ids[0]}; give the "
                    f"right one explicitly (data config: tokenizer.{key}=<token>)"
                )
            return declared, f"{self.cfg_path} key '{key}'"
        if len(ids) == 1 and isinstance(ids[0], int):
            token = self.hf.id_to_token(ids[0])
            if token is None:
                raise TokenizerError(
                    f"{self.model_cfg_path}: {name}_token_id {ids[0]} is not an id of {self.path}"
                )
            return token, f"{self.model_cfg_path} key '{name}_token_id'"
        raise TokenizerError(self.missing(name, ids))

    def missing(self, name: str, ids: list[Any]) -> str:
        key = f"{name}_token"
        looked = [f"'{key}' in {self.cfg_path}" + ("" if self.cfg is not None else " (no such file)")]
        if self.model_cfg is not None:
            found = f" (it has {ids}: more than one)" if ids else ""
            looked.append(f"'{name}_token_id' in {self.model_cfg_path}{found}")
        msg = (
            f"{self.path}: no {_LABELS[name]} token: not given, and no {' nor '.join(looked)}; a diffusion "
            f"LM needs [MASK], PAD, BOS and EOS. Declare '{key}' in {TOKENIZER_CONFIG_FILE} or give it in "
            f"the data config (tokenizer.{key}=<token>)"
        )
        if name == "pad":
            msg += (
                "; a tokenizer without a PAD token may use its EOS token as PAD only when told so "
                "(tokenizer.pad_token=<the EOS token>)"
            )
        return msg

    def check_added_tokens(self) -> None:
        """tokenizer_config.json's ``added_tokens_decoder`` (id -> token) must match tokenizer.json."""
        entries = (self.cfg or {}).get("added_tokens_decoder") or {}
        if not isinstance(entries, dict):
            raise TokenizerError(f"{self.cfg_path}: key 'added_tokens_decoder': expected an object")
        for key, entry in entries.items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if not str(key).isdigit() or not isinstance(content, str):
                raise TokenizerError(
                    f"{self.cfg_path}: added_tokens_decoder entry {key!r}: expected an id mapped to "
                    "{'content': <token>, ...}"
                )
            if self.hf.token_to_id(content) != int(key):
                raise TokenizerError(
                    f"{self.cfg_path}: added_tokens_decoder says id {key} is '{content}', but {self.path} "
                    f"has id {self.hf.token_to_id(content)} for it: the config is not this tokenizer's"
                )


def _single_id(hf: Any, path: Path, token: str, where: str) -> int:
    """The id of special token ``token``, checked to be one vocabulary entry that text encodes to."""
    i = hf.token_to_id(token)
    if i is None:
        raise TokenizerError(f"{path}: {where} is '{token}', which is not a token of this vocabulary")
    encoded = hf.encode(token, add_special_tokens=False).ids
    if encoded != [i]:
        raise TokenizerError(
            f"{path}: {where} is '{token}' (id {i}), but text holding it encodes to {encoded}; a special "
            f"token must be an added token of {TOKENIZER_JSON} (its added_tokens)"
        )
    return i


def _check_distinct(path: Path, ids: dict[str, int], tokens: dict[str, str]) -> None:
    for other in ("pad", "bos", "eos"):
        if ids["mask"] == ids[other]:
            raise TokenizerError(
                f"{path}: the [MASK] token '{tokens['mask']}' is also the {_LABELS[other]} token; a diffusion "
                "LM needs a [MASK] token of its own"
            )
    if ids["pad"] == ids["eos"]:
        warnings.warn(
            f"{path}: PAD is the EOS token '{tokens['eos']}' (id {ids['eos']}), as the config says: EOS "
            "positions are then never masked, scored or sampled (training treats PAD as padding)",
            stacklevel=3,
        )


def _chat_template(sources: _Sources) -> tuple[str | None, bool]:
    """``(template, came from chat_template.jinja)``: tokenizer_config.json's ``chat_template`` (a
    string, or a list of named templates of which ``default`` is used), else the .jinja file's."""
    value = (sources.cfg or {}).get("chat_template")
    where = f"{sources.cfg_path} key 'chat_template'"
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise TokenizerError(f"{where}: named templates {sorted(map(str, named))}, none called 'default'")
        value = named["default"]
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{where}: expected a Jinja string, got {type(value).__name__}")
    file = sources.path.parent / CHAT_TEMPLATE_FILE
    if value is None and file.is_file():
        return file.read_text(encoding="utf-8"), True
    return value, False


def _config_bytes(
    sources: _Sources, tokens: dict[str, str], template: str | None, from_file: bool
) -> bytes | None:
    """tokenizer_config.json as saved with the tokenizer: the file's bytes, or the file's keys plus
    whatever was resolved from elsewhere (the tokens, a chat_template.jinja's template)."""
    added: dict[str, Any] = {
        f"{name}_token": token
        for name, token in tokens.items()
        if _declared(sources.cfg, f"{name}_token") != token
    }
    if from_file:
        added["chat_template"] = template
    if not added:
        return sources.cfg_path.read_bytes() if sources.cfg is not None else None
    return (json.dumps({**(sources.cfg or {}), **added}, indent=2, ensure_ascii=False) + "\n").encode()


def _read_tokenizers(path: Path) -> Any:
    from tokenizers import Tokenizer as HFTokenizer  # optional: only tokenizer.json datasets need it

    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as exc:  # the library raises plain Exception for a malformed file
        raise TokenizerError(f"{path}: not a Hugging Face tokenizers {TOKENIZER_JSON} ({exc})") from None
    hf.no_truncation()  # encode() must return every token of a document
    hf.no_padding()
    return hf


def load_tokenizer_json(path: Path, overrides: Mapping[str, str | None]) -> Tokenizer:
    """Load and validate a tokenizer.json (see the module docstring); ``overrides`` by special-token name."""
    hf = _read_tokenizers(path)
    sources = _Sources(path, hf, overrides)
    sources.check_added_tokens()
    tokens, ids = {}, {}
    for name in SPECIAL_TOKEN_NAMES:
        token, where = sources.resolve(name)
        tokens[name], ids[name] = token, _single_id(hf, path, token, where)
    _check_distinct(path, ids, tokens)
    template, from_file = _chat_template(sources)
    config_bytes = _config_bytes(sources, tokens, template, from_file)
    unk = _declared(sources.cfg, "unk_token") or getattr(hf.model, "unk_token", None)
    newline = hf.encode("\n", add_special_tokens=False).ids
    return Tokenizer(
        kind=TOKENIZER_JSON,
        path=path,
        sha256=tokenizer_json_sha256(path, config_bytes),
        backend=_Tokenizers(hf),
        vocab_size=max(hf.get_vocab(with_added_tokens=True).values()) + 1,
        pad_id=ids["pad"],
        mask_id=ids["mask"],
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        unk_id=hf.token_to_id(unk) if unk else None,
        newline_id=newline[0] if len(newline) == 1 else None,
        special_tokens=tokens,
        chat_template=template,
        config_bytes=config_bytes,
        renderer=render_chat_template,
    )


# ---------------------------------------------------------------- chat templates

# A chat template renders one conversation in well under a millisecond; these only stop a hostile
# or broken one (nested loops over range() write gigabytes or never end).
RENDER_TIME_LIMIT_S = 5.0
RENDER_MAX_CHARS = 16 * 2**20  # ~4M tokens of output: far past any context window
_MAX_POWER = 4096  # ``x ** n`` beyond this exponent: a number no template needs, built slowly
_LIMITS = threading.local()  # this thread's rendering: ``deadline`` (monotonic), ``max_chars``


class _RenderLimit(Exception):
    """A rendering went past a limit: raised inside the template's code, reported by
    :func:`render_chat_template` as a TokenizerError naming the template's file."""


def _check_clock() -> None:
    if time.monotonic() > _LIMITS.deadline:
        raise _RenderLimit(f"it ran past {_LIMITS.seconds:g} s")


def _check_sizes(values: Iterable[Any]) -> None:
    """Refuse an integer argument that would build a string or list past the output limit
    (``'x'.ljust(10**10)``, ``'x'|center(10**10)``) before it is built, and check the clock."""
    _check_clock()
    for value in values:
        if isinstance(value, int) and value > _LIMITS.max_chars:
            raise _RenderLimit(
                f"an argument of {value:,} would build more than {_LIMITS.max_chars:,} characters"
            )


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple) else 0


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox transformers renders with, plus the limits of :func:`render_chat_template`:
    every call, filter and ``* + **`` checks the clock and never builds a string or list past
    ``max_chars`` (the operators are intercepted, so never folded at compile time either)."""

    intercepted_binops = frozenset(["*", "+", "**"])

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_sizes([*args, *kwargs.values()])
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_clock()
        if operator == "*" and isinstance(right, int) and _sized(left) * right > _LIMITS.max_chars:
            raise _RenderLimit(f"'*' would build more than {_LIMITS.max_chars:,} characters")
        if operator == "*" and isinstance(left, int) and _sized(right) * left > _LIMITS.max_chars:
            raise _RenderLimit(f"'*' would build more than {_LIMITS.max_chars:,} characters")
        if operator == "+" and _sized(left) + _sized(right) > _LIMITS.max_chars:
            raise _RenderLimit(f"'+' would build more than {_LIMITS.max_chars:,} characters")
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_POWER:
            raise _RenderLimit(f"'**' with an exponent over {_MAX_POWER}")
        return super().call_binop(context, operator, left, right)


def _limited_filter(f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marks
    def limited(*args: Any, **kwargs: Any) -> Any:
        _check_sizes([*args, *kwargs.values()])
        return f(*args, **kwargs)

    return limited


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """The template compiled as transformers does: a sandbox (no file or attribute access beyond
    the data), trim_blocks/lstrip_blocks, loop controls, ``raise_exception`` and ``tojson``. No
    ``strftime_now``: a rendering never depends on the date (templates fall back to a fixed one).
    Compiled under the caller's limits (constant folding runs filters)."""
    env = _LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _limited_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


@contextlib.contextmanager
def _limits(seconds: float, max_chars: int) -> Iterator[None]:
    """Limits for the rendering inside. On the main thread a SIGALRM also stops a loop that makes
    neither output nor calls (``{% for a in s %}{% for b in s %}...``); elsewhere (no signals) the
    checks at every call, operator and output chunk do. An ITIMER_REAL someone else armed is left
    alone (and then so is the alarm)."""
    _LIMITS.seconds, _LIMITS.max_chars = seconds, max_chars
    _LIMITS.deadline = time.monotonic() + seconds
    alarm = (
        threading.current_thread() is threading.main_thread() and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )
    if not alarm:
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise _RenderLimit(f"it ran past {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _template_source(tok: Tokenizer) -> str:
    """Where ``tok``'s chat template was read from: tokenizer_config.json's key, or the .jinja file."""
    cfg, jinja = tok.path.parent / TOKENIZER_CONFIG_FILE, tok.path.parent / CHAT_TEMPLATE_FILE
    try:
        inline = "chat_template" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        inline = False
    return str(jinja) if not inline and jinja.is_file() else f"{cfg} key 'chat_template'"


def render_chat_template(
    tok: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    time_limit_s: float = RENDER_TIME_LIMIT_S,
    max_chars: int = RENDER_MAX_CHARS,
) -> str:
    """``messages`` rendered with ``tok.chat_template``; the template sees ``messages``,
    ``add_generation_prompt`` and ``bos_token``/``eos_token``/``pad_token``/``mask_token``.

    The rendering stops with a TokenizerError naming the template's file and the limit if it runs
    past ``time_limit_s`` or its output past ``max_chars`` characters (the output is streamed
    and counted, never built first)."""
    assert tok.chat_template is not None
    parts: list[str] = []
    size = 0
    try:
        with _limits(time_limit_s, max_chars):
            for chunk in _compiled(tok.chat_template).generate(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **{f"{name}_token": token for name, token in tok.special_tokens.items()},
            ):
                size += len(chunk)
                if size > max_chars:
                    raise _RenderLimit(f"its output passed {max_chars:,} characters")
                _check_clock()
                parts.append(chunk)
    except _RenderLimit as exc:
        raise TokenizerError(
            f"{_template_source(tok)}: chat_template stopped: {exc} (limits per conversation: "
            f"{time_limit_s:g} s, {max_chars:,} characters of output)"
        ) from None
    except Exception as exc:  # whatever the template's own code raised: its failure, not ours
        why = str(exc) if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {exc}"
        raise TokenizerError(f"{_template_source(tok)}: chat_template failed: {why}") from None
    return "".join(parts)
