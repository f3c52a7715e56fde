"""The denoising sampler and inference-time adaptation on a tiny (random-weight) model."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.memory.adapt import adapt_to_context, context_masks
from pipeline.memory.config import MemoryConfig
from pipeline.sampler import DiffusionSampler, SamplerConfig, commit_schedule, cut_at_eos, pack
from tests._models import dense_model
from tests.conftest import tiny_model_config

MASK, PAD, VOCAB = 4, 0, 280  # tokenizer vocab below the model's (padded) 300/384


@pytest.fixture(scope="module")
def sampler(world1):
    torch.manual_seed(0)
    model = dense_model(tiny_model_config(seq_len=40)).eval()
    return DiffusionSampler(
        model, vocab_size=VOCAB, mask_id=MASK, pad_id=PAD, memory=MemoryConfig(enabled=True)
    )


def _prompts(n: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(6, VOCAB, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def test_commit_schedule_splits_a_block_evenly_remainder_first():
    assert commit_schedule(10, 4) == [3, 3, 2, 2]
    assert commit_schedule(8, 8) == [1] * 8
    assert sum(commit_schedule(17, 5)) == 17


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(gen_length=12, block_length=5), "block_length"),
        (dict(gen_length=12, block_length=4, steps=4), "multiple of the 3 block"),
        (dict(gen_length=8, steps=16), "exceed the block"),
        (dict(temperature=-1.0), "temperature"),
    ],
)
def test_bad_sampler_config_names_the_key(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        SamplerConfig(**kw).validate()


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_no_mask_left_and_committed_tokens_never_change(sampler, remasking, temperature):
    cfg = SamplerConfig(gen_length=12, steps=6, block_length=4, remasking=remasking, temperature=temperature)
    out = sampler.generate(_prompts(3), cfg, trace=True)
    assert out.tokens.shape == (3, 12)
    assert not (out.tokens == MASK).any() and not (out.tokens == PAD).any()
    assert int(out.tokens.max()) < VOCAB  # the padded vocabulary tail is never produced
    assert len(out.trace) == 6
    prev = torch.full_like(out.tokens, MASK)
    for k, state in enumerate(out.trace):
        committed = prev != MASK
        assert torch.equal(state[committed], prev[committed]), f"step {k} changed a committed token"
        assert int((state != MASK).sum(1)[0]) == 2 * (k + 1)  # 12 tokens / 6 steps, every row
        prev = state
    assert torch.equal(out.trace[-1], out.tokens)


def test_blocks_are_filled_in_order(sampler):
    cfg = SamplerConfig(gen_length=12, steps=6, block_length=4)
    out = sampler.generate(_prompts(2), cfg)
    block_of = torch.arange(12) // 4
    for b in range(3):
        steps = out.commit_step[:, block_of == b]
        assert int(steps.min()) == 2 * b and int(steps.max()) == 2 * b + 1  # 2 steps per block


def test_first_step_commits_the_most_confident_prediction(sampler):
    prompt = _prompts(1)[0]
    cfg = SamplerConfig(gen_length=8, steps=8)
    out = sampler.generate([prompt], cfg)
    x = torch.tensor([prompt + [MASK] * 8])
    with torch.no_grad():
        logits = sampler.model(tokens=x)[0, len(prompt) :].double()
    logits[:, VOCAB:] = float("-inf")
    logits[:, [MASK, PAD]] = float("-inf")
    p, tok = torch.softmax(logits, -1).max(-1)
    first = int(p.argmax())
    assert int(out.commit_step[0, first]) == 0
    assert int(out.tokens[0, first]) == int(tok[first])


@pytest.mark.parametrize("adapt", [False, True])
def test_a_batch_of_prompts_gives_the_same_outputs_as_one_by_one(sampler, adapt):
    prompts = _prompts(4)
    assert len({len(p) for p in prompts}) > 1  # different lengths: padding is exercised
    cfg = SamplerConfig(gen_length=8, steps=4, block_length=4, temperature=0.7, adapt=adapt)
    batch = sampler.generate(prompts, cfg)
    for i, p in enumerate(prompts):
        alone = sampler.generate([p], cfg)
        assert torch.equal(alone.tokens[0], batch.tokens[i]), f"prompt {i}"
        if adapt:
            for (layer, name), v in zip(batch.fast.names, batch.fast.leaves(), strict=True):
                w = alone.fast.by_layer[layer][name][0]
                torch.testing.assert_close(v[i], w, rtol=1e-5, atol=1e-6)


def test_adaptation_changes_the_memory_and_the_output_distribution(sampler):
    prompts = _prompts(2)
    off = sampler.generate(prompts, SamplerConfig(gen_length=8, steps=8))
    on = sampler.generate(prompts, SamplerConfig(gen_length=8, steps=8, adapt=True))
    assert off.fast is None
    b_norm = sum(
        float(v.norm()) for (_, n), v in zip(on.fast.names, on.fast.leaves(), strict=True) if n.endswith(".B")
    )
    assert b_norm > 0  # B starts at zero: the inner loop wrote something


def test_adaptation_sees_only_the_context(sampler):
    """Changing tokens outside the context must not change the adapted memory."""
    model = sampler.model
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(6, VOCAB, (2, 20), generator=g)
    context = torch.zeros(2, 20, dtype=torch.bool)
    context[0, :10], context[1, :14] = True, True
    other = tokens.clone()
    other[~context] = torch.randint(6, VOCAB, (int((~context).sum()),), generator=g)

    def run(t):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return adapt_to_context(
            model,
            t,
            context,
            MemoryConfig(enabled=True),
            MASK,
            generators=gens,
            init_generator=torch.Generator().manual_seed(0),
        )

    a, b = run(tokens), run(other)
    for x, y in zip(a.leaves(), b.leaves(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_context_masks_have_the_section_five_ratios():
    context = torch.zeros(2, 30, dtype=torch.bool)
    context[0, :20], context[1, 5:15] = True, True
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    anchor, pre = context_masks(context, (0.2, 0.3), gens)
    assert anchor.sum(1).tolist() == [4, 2] and pre.sum(1).tolist() == [6, 3]
    assert not (anchor & ~pre).any() and not (pre & ~context).any()


def test_pack_lays_out_prompt_response_padding():
    p = pack([[7, 8, 9], [10]], 2, MASK, PAD, torch.device("cpu"))
    assert p.tokens.tolist() == [[7, 8, 9, MASK, MASK], [10, MASK, MASK, PAD, PAD]]
    assert p.real.tolist() == [[True] * 5, [True, True, True, False, False]]


def test_prompt_too_long_for_the_model_is_a_clear_error(sampler):
    with pytest.raises(ValueError, match="exceeds the model's seq_len 40"):
        sampler.generate([[7] * 35], SamplerConfig(gen_length=8, steps=8))


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 3, 7, 3], 3) == [5, 6]
    assert cut_at_eos([5, 6], 3) == [5, 6]


def test_padding_keys_are_invisible_to_the_real_tokens(world1):
    torch.manual_seed(2)
    model = dense_model(tiny_model_config()).eval()
    x = torch.randint(6, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([x, torch.full((1, 6), PAD)], 1)
    key = torch.arange(16)[None] < 10
    with torch.no_grad():
        alone = model(tokens=x)
        masked = model(tokens=padded, key_mask=key)[:, :10]
        visible = model(tokens=padded)[:, :10]
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(visible, alone, atol=1e-3)  # without the mask the pads leak in


def test_make_sample_prints_memory_off_and_adapted_responses(tiny_export, capsys):
    from launch.sample import main

    assert main(["--checkpoint", str(tiny_export), "--prompt", "the river", "--gen-length", "6"]) == 0
    out = capsys.readouterr().out
    assert "method memdlm" in out and "memory off" in out and "memory on (adapted to the prompt)" in out
    assert (
        main(["--checkpoint", str(tiny_export), "--prompt", "x", "--gen-length", "6", "--block-length", "4"])
        == 2
    )
    assert "block_length" in capsys.readouterr().err
