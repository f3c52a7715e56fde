"""The configuration reference (docs/configuration.md), generated from the typed configs.

    python -m pipeline.config_reference > docs/configuration.md      # what `make docs` runs

Every config file is a tree of dataclasses; this walks each tree (``typing.get_type_hints`` and
``dataclasses.fields``, recursing into sections and lists of sections) and prints one Markdown table
per section: every dotted key with its type (a ``Literal``'s choices listed), its default and its
description. The description is the source comment next to the field: the comment ending its line
and the comment lines directly above it (``inspect.getsource`` + ``tokenize``), so the reference
cannot drift from the code; tests/unit/test_docs.py fails when docs/configuration.md is stale.

The ``model`` section's class depends on ``model.family`` (pipeline/families): the reference lists
the keys of the dense family's config class, and names the registered families.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from launch.clusters import ClusterConfig
from launch.evaluate import EvalRunConfig
from pipeline.cli import run_main
from pipeline.dataset.prep_config import PrepConfig
from pipeline.families import families, get_family
from pipeline.model.config import ModelConfig
from pipeline.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
IGNORED_COMMENTS = ("noqa", "type:", "pragma", "fmt:")  # tool directives, not descriptions
_CODE_SPAN = re.compile(r"(``.*?``|`[^`]*`)")
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")  # what Markdown would read as the start of an HTML tag


@dataclass(frozen=True)
class ConfigFile:
    """One kind of config file: its title, where such files live and how they are used."""

    title: str
    root: type
    intro: str


CONFIG_FILES = (
    ConfigFile(
        "Training config",
        TrainConfig,
        "`configs/train/*.yaml`: `make pretrain CONFIG=<file>` (default `configs/train/local.yaml`, or the "
        "cluster config's `train`), `ARGS='key=value ...'` overrides any key. `model_preset: <name>` loads "
        "`configs/model/<name>.yaml` into the `model` section (keys given in `model` override it). The "
        "launcher writes the resolved tree, every default included, to `<run_dir>/config.json`; the job "
        "reads exactly that file. Its `runtime` section (precision, MFU peak and why) records what the "
        "trainer decided on its machine and is not an input.",
    ),
    ConfigFile(
        "Dataset build config",
        PrepConfig,
        "`configs/data/*.yaml`: `make data DATA_CONFIG=<file>` (default `configs/data/sample.yaml`); "
        "`CORPUS=` and `OUT=` set `corpus` and `out_dir`, `ARGS='key=value ...'` any other key.",
    ),
    ConfigFile(
        "Cluster config",
        ClusterConfig,
        "`configs/cluster/<name>.yaml` (or any YAML file by path): `make pretrain CLUSTER=<name>`, "
        "`make data CLUSTER=<name>`. An unknown name lists the known ones.",
    ),
    ConfigFile(
        "Evaluation config",
        EvalRunConfig,
        "`configs/eval/*.yaml`: `make eval EVAL_CONFIG=<file>` (default `configs/eval/local.yaml`); "
        "`ARGS='key=value ...'` overrides any key (`tasks[0].n=64`).",
    ),
)


# ------------------------------------------------------------------ descriptions from the source
def _comment_text(token: str) -> str:
    text = token.lstrip("#").strip()
    return "" if text.startswith(IGNORED_COMMENTS) else text


def _line_comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Comments by line number (1-based) and the lines holding nothing but a comment."""
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = _comment_text(tok.string)
        elif tok.type not in skip and tok.type != tokenize.ENDMARKER:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return comments, {line for line in comments if line not in code_lines}


def _own_field_comments(cls: type) -> dict[str, str]:
    """``{field: description}`` for the fields ``cls`` itself declares (not its bases')."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined where no source can be read: no descriptions
        return {}
    comments, comment_only = _line_comments(source)
    body = ast.parse(source).body[0]
    out: dict[str, str] = {}
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line in comment_only:  # the comment block directly above (no blank line between)
            above.insert(0, comments[line])
            line -= 1
        trailing = [
            comments[n]
            for n in range(node.lineno, node.end_lineno + 1)
            if n in comments and n not in comment_only
        ]
        out[node.target.id] = " ".join(t for t in [*above, *trailing] if t)
    return out


def field_comments(cls: type) -> dict[str, str]:
    """Descriptions of every field of dataclass ``cls``: a subclass's comment on a field it
    redeclares wins over its base's."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update({k: v for k, v in _own_field_comments(klass).items() if v or k not in out})
    return out


# ------------------------------------------------------------------ types and defaults as text
def _code(value: str) -> str:
    return f"`{value}`"


def type_text(tp: Any) -> str:
    """A type annotation in words: ``one of `a`, `b```, ``int or null``, ``list of str``."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(_code(str(a)) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_text(a) for a in get_args(tp))
    if origin is list:
        return f"list of {type_text(get_args(tp)[0])}"
    if origin is dict:
        key, value = get_args(tp)
        return f"mapping of {type_text(key)} to {type_text(value)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) + "}"
    return repr(value)


def default_text(f: dataclasses.Field) -> str:
    """A field's default as YAML would write it; ``required`` when it has none."""
    if f.default is not dataclasses.MISSING:
        return _code(_scalar(f.default))
    if f.default_factory is not dataclasses.MISSING:
        return _code(_scalar(f.default_factory()))
    return "required"


# ------------------------------------------------------------------ the walk
def _section_type(tp: Any) -> tuple[type | None, bool]:
    """``(dataclass, is_list)`` when ``tp`` is a section or a list of sections, else ``(None, False)``."""
    if get_origin(tp) is list:
        (item,) = get_args(tp)
        return (item, True) if dataclasses.is_dataclass(item) else (None, False)
    return (tp, False) if dataclasses.is_dataclass(tp) else (None, False)


def _concrete(cls: type) -> type:
    """The class whose keys the reference lists: the dense family's config for ``model``."""
    if isinstance(cls, type) and issubclass(cls, ModelConfig):
        return get_family("dense").config_class
    return cls


def _where(cls: type) -> str:
    try:
        path = Path(inspect.getsourcefile(cls) or "").resolve().relative_to(ROOT).as_posix()
    except (TypeError, ValueError):
        path = cls.__module__
    return f"`{cls.__name__}` in `{path}`"


def _prose(text: str) -> str:
    """``text`` with the characters Markdown would read as markup (``*``, ``<``) escaped outside its
    code spans: a comment's ``runs/<run>`` must not render as an HTML tag."""
    parts = _CODE_SPAN.split(text)
    return "".join(p if i % 2 else _TAG_START.sub(r"\\<", p.replace("*", "\\*")) for i, p in enumerate(parts))


def _cell(text: str) -> str:
    """A table cell: one line, pipes escaped (GFM needs that inside code spans too)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _section(cls: type, prefix: str, note: str) -> tuple[list[str], list[tuple[type, str, str]]]:
    """The Markdown of one section (heading, notes, table) and the sub-sections it holds."""
    cls = _concrete(cls)
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    title = f"`{prefix}`" if prefix else "top level"
    lines = [f"### {title}", "", f"{_where(cls)}."]
    doc = inspect.getdoc(cls) or ""
    is_generated_doc = doc.startswith(f"{cls.__name__}(")  # dataclass's signature, not prose
    for text in (note, "" if is_generated_doc else doc.split("\n\n")[0]):
        if text:
            lines += ["", _prose(" ".join(text.split()))]
    if cls is get_family("dense").config_class and prefix.endswith("model"):
        names = ", ".join(_code(f.name) for f in families())
        lines += [
            "",
            f"`{prefix}.family` selects the model family's config class (registered: {names}); a family "
            "may add keys of its own. The keys below are the `dense` family's.",
        ]
    lines += ["", "| key | type | default | description |", "|---|---|---|---|"]
    subsections = []
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        sub, is_list = _section_type(hints[f.name])
        if sub is not None:
            subsections.append((sub, f"{dotted}[]" if is_list else dotted, comments.get(f.name, "")))
            continue
        row = (_code(dotted), type_text(hints[f.name]), default_text(f), _prose(comments.get(f.name, "")))
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return [*lines, ""], subsections


def render_config(config: ConfigFile) -> list[str]:
    """Every section of one config file, depth first in field order."""
    lines = [f"## {config.title}", "", config.intro, ""]
    pending: list[tuple[type, str, str]] = [(config.root, "", "")]
    while pending:
        cls, prefix, note = pending.pop(0)
        body, subsections = _section(cls, prefix, note)
        lines += body
        pending[0:0] = subsections  # a section's sub-sections come right after it
    return lines


def render() -> str:
    """docs/configuration.md as it should read now."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the typed config by `make docs` (pipeline/config_reference.py); do not edit. -->",
        "",
        "Every config file is a tree of typed sections (dataclasses). Loading walks the YAML against it,",
        "so an unknown key is an error with a did-you-mean and the allowed keys, a value of the wrong type",
        "names the file, the dotted key and what was expected, and each section's `validate()` checks",
        "ranges (`key 'parallel.tp': got 0, expected >= 1`). `key=value` overrides use the same dotted",
        "keys (`optim.lr=1e-3`, `tasks[0].n=64`). The descriptions below are the source comments next to",
        "each field; an empty one means the key's name is all the code says about it.",
        "",
        "Contents: "
        + ", ".join(f"[{c.title}](#{c.title.lower().replace(' ', '-')})" for c in CONFIG_FILES)
        + ".",
        "",
    ]
    for config in CONFIG_FILES:
        lines += render_config(config)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the configuration reference (Markdown) to stdout."""
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
