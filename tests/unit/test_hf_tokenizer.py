"""Hugging Face tokenizer.json tokenizers: special ids from the config, clear errors, a `make data`
build with one, the manifest's kind and hash, and SFT rendered with the tokenizer's chat template.

Every tokenizer is trained here (a tiny byte-level BPE): no hub access."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_prep.sft import SFTDataError, encode_pair, write_sft_dataset
from data_prep.shard import prepare_dataset
from pipeline.config import ConfigError, load_config
from pipeline.dataset.manifest import DatasetError, load_manifest, verify_manifest
from pipeline.dataset.prep_config import PrepConfig, TokenizerConfig
from pipeline.dataset.tokenizer import TokenizerError, load_tokenizer
from pipeline.loader.stream import DataConfig, TokenBatchLoader
from tests.conftest import make_text, prep_config

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [make_text(rng, rng.randint(3, 12)) for _ in range(n)]


def write_hf_tokenizer(
    directory: Path,
    *,
    config: dict | None = None,
    drop: tuple[str, ...] = (),
    vocab_size: int = 400,
    texts: list[str] | None = None,
) -> Path:
    """A byte-level BPE tokenizer.json trained on ``texts`` (default: seeded prose), with a
    tokenizer_config.json as transformers writes it (special tokens, added_tokens_decoder,
    chat_template) minus ``drop``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(60, 0) if texts is None else texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    cfg = {
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "mask_token": {"__type": "AddedToken", "content": "<|mask|>", "special": True},
        "added_tokens_decoder": {str(tok.token_to_id(s)): {"content": s, "special": True} for s in SPECIALS},
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **(config or {}),
    }
    for key in drop:
        del cfg[key]
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return directory / "tokenizer.json"


def _sentencepiece(path: Path) -> Path:
    from data_prep.tokenizer import sample_lines, train_tokenizer

    lines = sample_lines(_texts(20, 2), max_lines=1000, seed=0, progress=False)
    return train_tokenizer(lines, TokenizerConfig(vocab_size=400), path, progress=False).path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tok").parent


@pytest.fixture(scope="module")
def hf_dataset(hf_dir, tmp_path_factory) -> tuple[Path, list[str], PrepConfig]:
    """A `make data` build (prepare_dataset, two tokenising threads) with the tokenizer.json."""
    root = tmp_path_factory.mktemp("hfds")
    texts = _texts(30, 1)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = {"model": str(hf_dir / "tokenizer.json")}
    cfg = prep_config(
        root / "ds", [str(corpus)], train_shards=2, val_fraction=0.0, seq_len=16, tokenizer=tokenizer
    )
    prepare_dataset(cfg, progress=False)  # workers=2: two tokenising threads
    return root / "ds", texts, cfg


def test_special_ids_come_from_tokenizer_config_and_text_round_trips(hf_dir):
    tok = load_tokenizer(hf_dir)  # the directory: its tokenizer.json, with tokenizer_config.json
    assert tok.kind == "tokenizer.json" and tok.path == hf_dir / "tokenizer.json"
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)  # trainer order
    assert tok.vocab_size == 400 and tok.unk_id is None
    text = "Naïve café  owner,\nsaid 3.14!\n\n  Ünïcode ✓ 𝔘 end <|mask|>"
    ids = tok.encode(text)
    assert ids[-1] == tok.mask_id and tok.bos_id not in ids and tok.eos_id not in ids  # no BOS/EOS added
    assert tok.decode(ids) == text.removesuffix("<|mask|>")  # special tokens decode to nothing
    assert tok.encode_batch([text, "the river"]) == [ids, tok.encode("the river")]
    assert tok.newline_id is not None and tok.encode("\n") == [tok.newline_id]
    # the hash covers both files: sha256 of "tokenizer.json <sha>\ntokenizer_config.json <sha>\n"
    shas = [
        hashlib.sha256((hf_dir / n).read_bytes()).hexdigest()
        for n in ("tokenizer.json", "tokenizer_config.json")
    ]
    combined = f"tokenizer.json {shas[0]}\ntokenizer_config.json {shas[1]}\n"
    assert tok.sha256 == hashlib.sha256(combined.encode()).hexdigest()


def test_missing_mask_token_is_a_clear_error_and_the_option_is_saved_with_the_copy(tmp_path):
    path = write_hf_tokenizer(tmp_path / "src", drop=("mask_token",))
    with pytest.raises(
        TokenizerError,
        match=r"src/tokenizer\.json: no \[MASK\] token: not given, and no 'mask_token' in .*tokenizer_config\.json"
        r".*tokenizer\.mask_token=<token>",
    ):
        load_tokenizer(path)
    tok = load_tokenizer(path, special_tokens={"mask": "<|mask|>"})
    assert tok.mask_id == 3
    copy = load_tokenizer(tok.save(tmp_path / "copy"))  # self-describing: no option needed
    assert (copy.mask_id, copy.sha256) == (3, tok.sha256)
    assert json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())["mask_token"] == "<|mask|>"
    with pytest.raises(
        TokenizerError, match=r"given mask_token is 'Ġthe' \(id \d+\), but text holding it encodes to \[\d+"
    ):
        load_tokenizer(path, special_tokens={"mask": "Ġthe"})  # in the vocab, but not an added token
    with pytest.raises(TokenizerError, match=r"the \[MASK\] token '<\|eos\|>' is also the EOS token"):
        load_tokenizer(path, special_tokens={"mask": "<|eos|>"})
    with pytest.raises(ConfigError, match=r"key 'tokenizer\.mask_token'.*only for a tokenizer\.json"):
        load_config(PrepConfig, None, ["out_dir=x", "tokenizer.mask_token=<|mask|>"])


def test_pad_falls_back_to_eos_only_when_told_and_model_config_ids_are_checked(tmp_path):
    path = write_hf_tokenizer(tmp_path / "src", drop=("pad_token",))
    with pytest.raises(TokenizerError, match=r"no PAD token.*may use its EOS token as PAD only when told so"):
        load_tokenizer(path)
    with pytest.warns(UserWarning, match=r"PAD is the EOS token '<\|eos\|>'"):
        assert load_tokenizer(path, special_tokens={"pad": "<|eos|>"}).pad_id == 2
    # a model config.json beside it supplies what tokenizer_config.json lacks, and must agree with it
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "llama", "pad_token_id": 0}))
    assert load_tokenizer(path).pad_id == 0
    (tmp_path / "src" / "config.json").write_text(
        json.dumps({"model_type": "llama", "pad_token_id": 0, "eos_token_id": 1})
    )
    with pytest.raises(
        TokenizerError, match=r"eos_token '<\|eos\|>' is id 2, but .*config\.json says eos_token_id 1"
    ):
        load_tokenizer(path)


def test_make_data_with_a_tokenizer_json_writes_its_encoding_kind_and_hash(hf_dataset, hf_dir):
    ds, texts, _ = hf_dataset
    tok = load_tokenizer(ds)
    assert tok.sha256 == load_tokenizer(hf_dir).sha256  # copied as it is
    m = load_manifest(ds)
    assert (m.tokenizer_kind, m.tokenizer_file, m.tokenizer_sha256) == (
        "tokenizer.json",
        "tokenizer.json",
        tok.sha256,
    )
    assert m.special_ids == tok.special_ids() and m.dtype == "uint16"
    assert not (ds / "tokenizer.model").exists()
    stream = np.concatenate([np.array([*tok.encode(t), tok.eos_id]) for t in texts])  # docs joined by EOS
    L, seen = m.seq_len, 0
    for shard in m.splits["train"].shards:
        for sample in wds.WebDataset(str(ds / shard.path), shardshuffle=False).decode():
            i = int(sample["__key__"][1:])
            np.testing.assert_array_equal(sample["tokens.npy"], stream[i * L : (i + 1) * L])
            seen += 1
    assert seen == m.splits["train"].sequences > 0
    loader = TokenBatchLoader(
        DataConfig(path=str(ds), batch_size=2, num_workers=0), tokenizer_path=ds, shuffle=False, loop=False
    )  # the loader checks the tokenizer against the manifest
    assert next(iter(loader))["tokens"].shape == (2, L)


def test_a_changed_tokenizer_config_or_kind_is_a_hash_mismatch_and_make_data_repairs_it(
    hf_dataset, tmp_path, capsys
):
    ds = tmp_path / "ds"
    shutil.copytree(hf_dataset[0], ds)
    manifest = load_manifest(ds)
    cfg_file = ds / "tokenizer_config.json"
    original = cfg_file.read_bytes()
    cfg_file.write_text(json.dumps({**json.loads(original), "chat_template": "{{ 'x' }}"}))
    with pytest.raises(DatasetError, match=r"tokenizer mismatch: the dataset was tokenised with sha256"):
        verify_manifest(manifest, ds)
    prepare_dataset(replace(hf_dataset[2], out_dir=str(ds)), progress=False)  # `make data` again
    assert "repairing" in capsys.readouterr().out and cfg_file.read_bytes() == original
    verify_manifest(load_manifest(ds), ds)
    with pytest.raises(
        DatasetError, match=r"tokenised with a tokenizer\.json tokenizer, but .* sentencepiece"
    ):
        verify_manifest(manifest, ds, tokenizer_path=_sentencepiece(tmp_path / "sp.model"))


def test_sft_rendered_with_the_chat_template_scores_only_the_answer(hf_dir, tmp_path):
    tok = load_tokenizer(hf_dir)
    tokens, plen = encode_pair(tok, "Where is the lamp?", "garden", 32, chat_template="tokenizer")
    prompt = tok.encode("<|user|>Where is the lamp?<|assistant|>")
    answer = [*tok.encode("garden"), tok.eos_id]  # the template closes the turn with EOS
    assert plen == len(prompt) and tokens[:plen].tolist() == prompt
    assert (
        tokens[plen : plen + len(answer)].tolist() == answer
        and (tokens[plen + len(answer) :] == tok.eos_id).all()
    )
    pairs = {
        "train": [
            (f"p{i}", f"Where is the {w}?", w) for i, w in enumerate(["lamp", "river", "stone", "castle"])
        ]
    }
    m = write_sft_dataset(
        pairs,
        tokenizer=hf_dir,
        out_dir=tmp_path / "sft",
        seq_len=32,
        shards={"train": 2},
        chat_template="tokenizer",
    )
    assert (m.kind, m.tokenizer_kind, m.corpus["chat_template"]) == ("sft", "tokenizer.json", "tokenizer")
    assert load_tokenizer(tmp_path / "sft").sha256 == tok.sha256
    loader = TokenBatchLoader(
        DataConfig(path=str(tmp_path / "sft"), batch_size=2, num_workers=0),
        tokenizer_path=hf_dir,
        shuffle=False,
        loop=False,
    )
    for batch in loader:  # the prompt mask (never masked, never scored) is exactly the rendered prompt
        for row, idx, mask in zip(batch["tokens"], batch["index"], batch["prompt_mask"], strict=True):
            _, question, _ = pairs["train"][int(idx)]
            rendered = tok.encode(
                tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
            )
            assert int(mask.sum()) == len(rendered) and row[: len(rendered)].tolist() == rendered

    bad = write_hf_tokenizer(
        tmp_path / "bad", config={"chat_template": CHAT_TEMPLATE.replace("|>' }}", "|> ' }}")}
    )
    with pytest.raises(SFTDataError, match=r"rendered prompt \(\d+ tokens\) is not a prefix of the rendered"):
        encode_pair(load_tokenizer(bad), "Where is the lamp?", "garden", 32, chat_template="tokenizer")
    plain = write_hf_tokenizer(tmp_path / "plain", drop=("chat_template",))
    with pytest.raises(SFTDataError, match=r"chat template, but .*plain/tokenizer\.json has none"):
        write_sft_dataset(
            pairs,
            tokenizer=plain,
            out_dir=tmp_path / "x",
            seq_len=32,
            shards={"train": 1},
            chat_template="tokenizer",
        )


def test_an_import_hf_export_with_a_tokenizer_json_is_what_make_data_reads(tmp_path):
    from pipeline.hf.convert import import_hf
    from tests._hf_models import VOCAB, hf_checkpoint

    src = hf_checkpoint("llada", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    ids = {"mask_token_id": 3, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    (src / "config.json").write_text(json.dumps({**config, **ids}))
    write_hf_tokenizer(src, drop=("mask_token", "pad_token"), vocab_size=VOCAB)  # those: config.json only
    out = import_hf(src, tmp_path / "export")
    info = json.loads((out / "config.json").read_text())
    assert info["source"]["tokenizer"]["data_tokenizer"] == "hf_tokenizer/tokenizer.json"
    tok = load_tokenizer(out)  # finds hf_tokenizer/tokenizer.json; its config now names [MASK] and PAD
    assert {k: tok.special_ids()[k] for k in ("mask", "pad", "bos", "eos")} == {
        k: info["special_ids"][k] for k in ("mask", "pad", "bos", "eos")
    }
    saved = json.loads((out / "hf_tokenizer" / "tokenizer_config.json").read_text())
    assert (saved["mask_token"], saved["pad_token"]) == ("<|mask|>", "<|pad|>")
