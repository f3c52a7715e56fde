"""The denoising sampler and inference-time adaptation on a tiny (random-weight) model."""

from __future__ import annotations

import dataclasses

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


@pytest.fixture(scope="module")
def sharp(world1):
    """A random model with large weights: its confidences spread over (0, 1), so thresholds split them
    (the ``sampler`` fixture's are all about 1 / vocab, the same at every masked position)."""
    torch.manual_seed(0)
    model = dense_model(tiny_model_config(seq_len=40, init_std=0.5)).eval()
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
        (dict(threshold=1.5), r"key 'threshold': got 1.5, expected a probability in \[0, 1\]"),
        (dict(threshold=float("nan")), "key 'threshold': got nan"),
        (dict(threshold=0.9, remasking="random"), "key 'threshold': needs remasking 'low_confidence'"),
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


# LLaDA2's confidence-threshold decoding (``threshold``) and its attention layout (``hide_later_blocks``)


def _first_step_confidence(sampler, prompt: list[int], gen_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy token and its probability at each response position before any is committed."""
    x = torch.tensor([prompt + [MASK] * gen_length])
    with torch.no_grad():
        logits = sampler.model(tokens=x)[0, len(prompt) :].double()
    logits[:, VOCAB:] = float("-inf")
    logits[:, [MASK, PAD]] = float("-inf")
    p, tok = torch.softmax(logits, -1).max(-1)
    return p, tok


@pytest.mark.parametrize("steps", [12, 6])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_threshold_never_met_commits_the_schedule_and_equals_the_fixed_schedule(sharp, steps, temperature):
    prompts = _prompts(3)
    cfg = SamplerConfig(gen_length=12, steps=steps, block_length=4, temperature=temperature)
    fixed = sharp.generate(prompts, cfg, trace=True)
    capped = sharp.generate(prompts, dataclasses.replace(cfg, threshold=1.0), trace=True)
    assert torch.equal(capped.tokens, fixed.tokens) and torch.equal(capped.commit_step, fixed.commit_step)
    assert capped.steps.tolist() == fixed.steps.tolist() == [steps] * 3
    per_step = 12 // steps
    for k, state in enumerate(capped.trace):  # one token per step (two with 6 steps), every row
        assert (state != MASK).sum(1).tolist() == [per_step * (k + 1)] * 3


def test_threshold_zero_commits_every_masked_position_of_a_block_in_its_first_step(sharp):
    cfg = SamplerConfig(gen_length=12, steps=12, block_length=4, threshold=0.0)
    out = sharp.generate(_prompts(3), cfg, trace=True)
    assert out.steps.tolist() == [3, 3, 3] and len(out.trace) == 3  # one step per block
    assert out.commit_step.tolist() == [(torch.arange(12) // 4).tolist()] * 3
    assert not (out.tokens == MASK).any()


def test_a_threshold_commits_exactly_the_positions_above_it(sharp):
    prompt = _prompts(1)[0]
    p, tok = _first_step_confidence(sharp, prompt, 8)
    top = p.sort(descending=True)
    threshold = float(top.values[2] + top.values[3]) / 2  # three positions above it
    out = sharp.generate([prompt], SamplerConfig(gen_length=8, steps=8, threshold=threshold))
    first = (out.commit_step[0] == 0).nonzero()[:, 0]
    assert sorted(first.tolist()) == sorted(top.indices[:3].tolist())
    assert torch.equal(out.tokens[0, first], tok[first])
    assert int(out.steps[0]) < 8


@pytest.mark.parametrize("adapt", [False, True])
def test_a_batch_gives_the_same_outputs_as_one_by_one_with_a_threshold(sharp, adapt):
    prompts = _prompts(4)
    cfg = SamplerConfig(
        gen_length=12,
        steps=12,
        block_length=4,
        temperature=0.7,
        threshold=0.5,
        hide_later_blocks=True,
        adapt=adapt,
    )
    batch = sharp.generate(prompts, cfg)
    assert len(set(batch.steps.tolist())) > 1  # rows finish their blocks at different steps
    for i, p in enumerate(prompts):
        alone = sharp.generate([p], cfg)
        assert torch.equal(alone.tokens[0], batch.tokens[i]), f"prompt {i}"
        assert torch.equal(alone.commit_step[0], batch.commit_step[i]), f"prompt {i}"
        assert int(alone.steps[0]) == int(batch.steps[i])


def test_the_steps_a_threshold_uses_are_reported_and_capped_per_block(sharp):
    cfg = SamplerConfig(gen_length=12, steps=6, block_length=4, threshold=0.5)  # at most 2 steps per block
    out = sharp.generate(_prompts(4), cfg, trace=True)
    assert out.steps.tolist() == (out.commit_step.max(1).values + 1).tolist()
    assert len(out.trace) == int(out.steps.max()) <= 6 and int(out.steps.min()) < 6  # the cap, and a saving
    for row in out.commit_step:
        used = sorted(set(row.tolist()))
        assert used == list(range(len(used)))  # a row takes consecutive steps, never idles
        for b in range(3):
            assert len(set(row[4 * b : 4 * b + 4].tolist())) <= 2, row


def test_hidden_later_blocks_make_each_block_independent_of_the_ones_after_it(sharp):
    prompts = _prompts(3)
    cfg = SamplerConfig(gen_length=12, steps=12, block_length=4, temperature=0.7, threshold=0.5)
    for hide in (True, False):
        full = sharp.generate(prompts, dataclasses.replace(cfg, hide_later_blocks=hide))
        same = []
        for n in (4, 8):  # the response cut after its first one, two blocks
            short = sharp.generate(
                prompts, dataclasses.replace(cfg, gen_length=n, steps=n, hide_later_blocks=hide)
            )
            same.append(torch.equal(full.tokens[:, :n], short.tokens))
        assert all(same) if hide else not all(same)  # visible later masks change the earlier blocks


def test_make_sample_takes_a_threshold_and_reports_the_steps(tiny_export, capsys):
    from launch.sample import main

    base = ["--checkpoint", str(tiny_export), "--prompt", "the river", "--gen-length", "8", "--adapt", "off"]
    assert main([*base, "--block-length", "4", "--threshold", "0.9", "--hide-later-blocks"]) == 0
    out = capsys.readouterr().out
    assert "memory off" in out and "denoising steps per prompt: [" in out and "(at most 8)" in out
    assert main([*base, "--threshold", "2"]) == 2
    assert "key 'threshold': got 2.0, expected a probability in [0, 1]" in capsys.readouterr().err
