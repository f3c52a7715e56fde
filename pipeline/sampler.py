"""Iterative denoising sampler for exported checkpoints, with optional inference-time memory.

    sampler, tok, info = load_sampler("runs/local/export")
    out = sampler.generate([tok.encode("In the beginning")], SamplerConfig(gen_length=64, steps=64))

(the command line is launch/sample.py: ``make sample CHECKPOINT=... PROMPT="..."``)

The response starts fully masked right after the prompt. It is produced block by block
(semi-autoregressive; one block = the whole response by default); within a block, each of its
``steps / blocks`` steps predicts every still-masked position of the block and commits a fixed
number of them (an even split of the block, remainder to the first steps, as LLaDA does):

* ``low_confidence`` remasking keeps the committed tokens the model is most sure of
  (probability of the chosen token) and leaves the rest masked;
* ``random`` remasking commits a uniformly random subset.

With a ``threshold`` (LLaDA2's confidence-threshold decoding) a step commits every masked
position of the block whose confidence is above it, and at least the schedule's share (the most
confident ones): so ``steps / blocks`` becomes a cap per block, a block often finishes in fewer
steps and each row moves on to its next block as soon as its own is full. ``hide_later_blocks``
hides the keys after the current block (LLaDA2 runs only the prompt and the blocks up to the
current one); unlike LLaDA2's block-causal mask, the earlier positions still see the current
block (the model's ``key_mask`` is one mask of keys shared by every query).

``temperature > 0`` picks tokens by the Gumbel-max trick, ``argmax(logits / T + Gumbel)``,
i.e. a draw from ``softmax(logits / T)``; 0 is greedy. Committed tokens never change.

Batched: prompts of different lengths share a batch (right-padded; padding keys are hidden
from attention) and every random draw of a row comes from that row's own generator, seeded
from ``seed`` and the prompt's tokens; so a prompt gets the same output alone or in any batch.
With ``adapt`` each prompt first writes itself into its own fresh memory
(pipeline/memory/adapt.py), which then stays fixed while generating.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.config import ConfigError
from pipeline.dataset.seeding import seed_of
from pipeline.dataset.tokenizer import load_tokenizer
from pipeline.engine.export import load_exported
from pipeline.memory.adapt import adapt_to_context
from pipeline.memory.config import MemoryConfig
from pipeline.memory.fast_weights import FastWeights


@dataclass
class SamplerConfig:
    gen_length: int = 64  # response tokens
    steps: int = 64  # denoising steps over the whole response
    block_length: int = 0  # semi-autoregressive block size; 0 = one block (the whole response)
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    temperature: float = 0.0  # Gumbel-max temperature; 0 = greedy
    # LLaDA2: commit every masked position of the block with confidence > threshold (at least the
    # schedule's share); steps / blocks is then a cap per block. None: the fixed schedule.
    threshold: float | None = None
    hide_later_blocks: bool = False  # keys end with the current block (LLaDA2 sees no later block)
    adapt: bool = False  # inference-time adaptation on the prompt (spec section 5)
    anchor_ratio: float = 0.2
    pre_anchor_ratio: float = 0.3
    seed: int = 0
    bf16: bool = False  # autocast the forward passes to bf16 (faster on CPUs with AMX)

    @property
    def block(self) -> int:
        return self.block_length or self.gen_length

    def validate(self) -> None:
        if self.gen_length < 1:
            raise ConfigError(f"key 'gen_length': got {self.gen_length}, expected >= 1")
        if self.gen_length % self.block:
            raise ConfigError(
                f"key 'block_length': {self.block_length} does not divide gen_length={self.gen_length}"
            )
        blocks = self.gen_length // self.block
        if self.steps < blocks or self.steps % blocks:
            raise ConfigError(
                f"key 'steps': got {self.steps}, expected a multiple of the {blocks} block(s) "
                f"(gen_length {self.gen_length} / block_length {self.block})"
            )
        if self.steps // blocks > self.block:
            raise ConfigError(
                f"key 'steps': {self.steps // blocks} steps per block exceed the block's {self.block} tokens "
                "(a step would commit nothing)"
            )
        if self.temperature < 0:
            raise ConfigError(f"key 'temperature': got {self.temperature}, expected >= 0")
        if self.threshold is not None:
            if not 0.0 <= self.threshold <= 1.0:  # also refuses NaN
                raise ConfigError(
                    f"key 'threshold': got {self.threshold}, expected a probability in [0, 1] "
                    "(or none: the fixed schedule)"
                )
            if self.remasking != "low_confidence":
                raise ConfigError(
                    f"key 'threshold': needs remasking 'low_confidence' (it bounds the model's "
                    f"confidence), got remasking '{self.remasking}'"
                )


def commit_schedule(block: int, steps: int) -> list[int]:
    """Tokens committed at each of ``steps`` steps of one block: an even split, remainder first."""
    base, extra = divmod(block, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def prompt_seed(seed: int, prompt: list[int]) -> int:
    """A row's seed: stable across processes and batch compositions (no salted ``hash``)."""
    return seed_of(seed, list(prompt))


def row_generators(prompts: list[list[int]], seed: int, device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(prompt_seed(seed, p)) for p in prompts]


@dataclass
class Packed:
    """A batch laid out for generation: prompt, then the response, then padding."""

    tokens: torch.Tensor  # [B, T] prompt | [MASK] x gen_length | pad
    prompt: torch.Tensor  # [B, T] bool
    response: torch.Tensor  # [B, T] bool
    real: torch.Tensor  # [B, T] bool: prompt or response (attention keys)


def pack(
    prompts: list[list[int]], gen_length: int, mask_id: int, pad_id: int, device: torch.device
) -> Packed:
    """Right-pad ``prompts`` each followed by ``gen_length`` masks; shapes [B, max_len + gen_length]."""
    T = max(len(p) for p in prompts) + gen_length
    B = len(prompts)
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    pos = torch.arange(T, device=device)[None]
    prompt = pos < lens[:, None]
    response = (pos >= lens[:, None]) & (pos < lens[:, None] + gen_length)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    tokens[response] = mask_id
    return Packed(tokens, prompt, response, prompt | response)


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, gen_length] the response
    commit_step: torch.Tensor  # [B, gen_length] the step that committed each position
    fast: FastWeights | None  # the adapted memory (phi2), if any
    trace: list[torch.Tensor] | None  # [B, gen_length] response after each step (trace=True)
    steps: torch.Tensor  # [B] denoising steps each row took (cfg.steps without a threshold)


@dataclass
class Canvas:
    """A batch being denoised: its tokens and where each row stands in its blocks."""

    x: torch.Tensor  # [B, T] prompt | response | pad
    resp_idx: torch.Tensor  # [B, G] absolute positions of the response
    commit: torch.Tensor  # [B, G] the step that committed each response position (-1: not yet)
    block: torch.Tensor  # [B] each row's current block (== the number of blocks: finished)
    sub: torch.Tensor  # [B] the row's step within its current block (its commit-schedule index)
    used: torch.Tensor  # [B] the steps the row has taken

    @classmethod
    def start(cls, packed: Packed, gen_length: int) -> Canvas:
        B, device = packed.tokens.shape[0], packed.tokens.device
        start = packed.response.float().argmax(1)  # first response position per row
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        return cls(
            x=packed.tokens.clone(),
            resp_idx=start[:, None] + torch.arange(gen_length, device=device)[None],
            commit=torch.full((B, gen_length), -1, dtype=torch.long, device=device),
            block=zeros,
            sub=zeros.clone(),
            used=zeros.clone(),
        )

    def response(self) -> torch.Tensor:
        return self.x.gather(1, self.resp_idx)


class DiffusionSampler:
    """Generates with a TP=1 ``DLMTransformer`` (e.g. from ``load_exported``).

    ``vocab_size`` is the tokenizer's: the padded tail of the embedding, ``[MASK]`` and
    ``[PAD]`` are never produced. ``memory`` is the checkpoint's memory config (used only
    when adapting).
    """

    def __init__(self, model, *, vocab_size: int, mask_id: int, pad_id: int, memory: MemoryConfig):
        self.model = model
        self.vocab_size = vocab_size
        self.mask_id, self.pad_id = mask_id, pad_id
        self.memory = memory
        self.device = next(model.parameters()).device
        self.banned = self._banned()

    def _banned(self) -> torch.Tensor:
        V = self.model.cfg.padded_vocab_size
        banned = torch.arange(V, device=self.device) >= self.vocab_size
        banned[[self.mask_id, self.pad_id]] = True
        return banned

    def adapt(self, packed: Packed, cfg: SamplerConfig, gens: list[torch.Generator]) -> FastWeights:
        """Each row's memory, written from its prompt alone (spec section 5)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            return adapt_to_context(
                self.model,
                torch.where(packed.prompt, packed.tokens, self.pad_id),
                packed.prompt,
                self.memory,
                self.mask_id,
                generators=gens,
                init_generator=torch.Generator(device=self.device).manual_seed(cfg.seed),
                anchor_ratio=cfg.anchor_ratio,
                pre_anchor_ratio=cfg.pre_anchor_ratio,
            )

    def adapt_prompts(self, prompts: list[list[int]], *, seed: int = 0, bf16: bool = False) -> FastWeights:
        """One memory per prompt (rows in order), exactly as ``generate`` with ``adapt`` makes them."""
        cfg = SamplerConfig(gen_length=1, steps=1, adapt=True, seed=seed, bf16=bf16)
        packed = pack(prompts, 1, self.mask_id, self.pad_id, self.device)
        return self.adapt(packed, cfg, row_generators(prompts, seed, self.device))

    def generate(self, prompts: list[list[int]], cfg: SamplerConfig, *, trace: bool = False) -> Generation:
        """Responses [B, gen_length] for token-id ``prompts`` (each non-empty)."""
        cfg.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and every prompt needs a token")
        longest = max(len(p) for p in prompts) + cfg.gen_length
        if longest > self.model.cfg.seq_len:
            raise ValueError(
                f"prompt + gen_length = {longest} tokens exceeds the model's seq_len {self.model.cfg.seq_len}"
            )
        packed = pack(prompts, cfg.gen_length, self.mask_id, self.pad_id, self.device)
        gens = row_generators(prompts, cfg.seed, self.device)
        fast = self.adapt(packed, cfg, gens) if cfg.adapt else None
        canvas = Canvas.start(packed, cfg.gen_length)
        blocks = cfg.gen_length // cfg.block
        states: list[torch.Tensor] = []
        step = 0
        while bool((canvas.block < blocks).any()):
            self._step(canvas, packed, cfg, gens, fast, step)
            if trace:
                states.append(canvas.response())
            step += 1
        return Generation(
            tokens=canvas.response(),
            commit_step=canvas.commit,
            fast=fast,
            trace=states or None,
            steps=canvas.used,
        )

    def _logits(
        self, canvas: Canvas, active: torch.Tensor, packed: Packed, cfg: SamplerConfig, fast, live
    ) -> torch.Tensor:
        """float64 logits [N, V] (banned ids at -inf) of the ``active`` [B, G] response slots, row-major.

        Only the ``live`` rows (not finished) are run; with ``hide_later_blocks`` the keys of a row
        end with its current block and the batch is cut after the last visible position.
        """
        x, keys = canvas.x, packed.real
        positions = torch.zeros_like(x, dtype=torch.bool).scatter_(1, canvas.resp_idx, active)
        if cfg.hide_later_blocks:
            end = canvas.resp_idx[:, 0] + (canvas.block + 1) * cfg.block  # [B] past the current block
            keys = keys & (torch.arange(x.shape[1], device=x.device)[None] < end[:, None])
            width = int(end[live].max())
            x, keys, positions = x[:, :width], keys[:, :width], positions[:, :width]
        if not bool(live.all()):
            x, keys, positions = x[live], keys[live], positions[live]
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = self.model(
                tokens=x,
                fast=None if fast is None else _rows(fast, live),
                positions=positions,
                key_mask=keys,
            )
        return logits.double().masked_fill(self.banned, float("-inf"))

    def _step(
        self, canvas: Canvas, packed: Packed, cfg: SamplerConfig, gens: list[torch.Generator], fast, step: int
    ) -> None:
        """One denoising step of every unfinished row, in its own current block."""
        L, G = cfg.block, cfg.gen_length
        blocks = G // L
        offs = torch.arange(G, device=self.device)[None]
        lo = canvas.block[:, None] * L
        resp = canvas.response()
        active = (resp == self.mask_id) & (offs >= lo) & (offs < lo + L)  # [B, G]
        live = canvas.block < blocks  # such a row has a mask left in its block
        rows = live.nonzero()[:, 0]
        logits = self._logits(canvas, active, packed, cfg, fast, live)  # [N, V]
        m = active[rows].sum(1)  # [R] masked slots of each live row (all equal without a threshold)
        slots = torch.where(active[rows], offs, G).sort(1).values[:, : int(m.max())]  # [R, M]; G: none
        padded = logits.new_zeros(*slots.shape, logits.shape[-1])
        padded[slots < G] = logits
        x0, conf = _predict(padded, m.tolist(), cfg, [gens[b] for b in rows.tolist()])
        conf = conf.masked_fill(slots == G, float("-inf"))
        n = torch.tensor(commit_schedule(L, cfg.steps // blocks), device=self.device)[canvas.sub[rows]]
        if cfg.threshold is not None:  # all above the threshold, at least the schedule's share
            n = torch.minimum(torch.maximum(n, (conf > cfg.threshold).sum(1)), m)
        chosen = conf.topk(int(n.max()), dim=1).indices  # [R, k], most confident first
        keep = torch.arange(chosen.shape[1], device=self.device)[None] < n[:, None]
        picked = torch.where(keep, slots.gather(1, chosen), G)  # response offsets; G: not committed
        resp[rows] = _put(resp[rows], picked, x0.gather(1, chosen))
        canvas.commit[rows] = _put(canvas.commit[rows], picked, torch.full_like(picked, step))
        canvas.x.scatter_(1, canvas.resp_idx, resp)
        canvas.used += live
        canvas.sub += live
        full = live & ~((resp == self.mask_id) & (offs >= lo) & (offs < lo + L)).any(1)
        canvas.block += full  # these rows move on to their next block
        canvas.sub[full] = 0


def _put(t: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """t [R, G] with src [R, k] written at index [R, k]; an index of G writes nothing."""
    return torch.cat([t, t[:, :1]], 1).scatter(1, index, src)[:, :-1]


def _rows(fast: FastWeights, live: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """``fast.by_layer`` (one memory per row) for the ``live`` rows only; ``scale`` is shared."""
    if bool(live.all()):
        return fast.by_layer
    return {
        layer: {k: v if k == "scale" else v[live] for k, v in d.items()} for layer, d in fast.by_layer.items()
    }


def _uniform(g: torch.Generator, m: int, shape: tuple[int, ...], rows: int) -> torch.Tensor:
    """A row's uniform draws [m, *shape] from its generator, padded to ``rows`` (padding draws nothing)."""
    u = torch.rand(m, *shape, generator=g, device=g.device, dtype=torch.float64)
    return torch.cat([u, u.new_full((rows - m, *shape), 0.5)])


def _predict(
    logits: torch.Tensor, counts: list[int], cfg: SamplerConfig, gens: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising step's proposal for the masked slots of the block in every row.

    logits [R, M, V] (float64, banned ids at -inf; row r's first ``counts[r]`` slots are real, the
    rest padding) -> (x0 [R, M]: the token each slot would take, conf [R, M]: how the slots rank
    for committing). Random draws come from the row generators, only for the real slots.
    """
    _, M, V = logits.shape
    if cfg.temperature > 0:  # Gumbel-max: argmax(logits / T + G) is a draw from softmax(logits / T)
        u = torch.stack([_uniform(g, m, (V,), M) for g, m in zip(gens, counts, strict=True)])
        gumbel = -torch.log((-torch.log(u.clamp_min(1e-300))).clamp_min(1e-300)).to(logits.device)
        x0 = (logits / cfg.temperature + gumbel).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    if cfg.remasking == "low_confidence":  # the model's probability of the token it would commit
        conf = torch.softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
    else:
        conf = torch.stack([_uniform(g, m, (), M) for g, m in zip(gens, counts, strict=True)])
        conf = conf.to(logits.device)
    return x0, conf


def cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """The response up to (not including) its first EOS."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def resolve_device(device: str = "auto") -> str:
    """``auto``: the GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_sampler(
    checkpoint: str | Path, device: str = "auto"
) -> tuple[DiffusionSampler, Any, dict[str, Any]]:
    """``(sampler, tokenizer, info)`` for an export directory (see pipeline/engine/export.py)."""
    device = resolve_device(device)

    model, info = load_exported(checkpoint, device=device)
    tok = load_tokenizer(checkpoint)  # its tokenizer.model or tokenizer.json
    mem = MemoryConfig(**info["memory"])
    sampler = DiffusionSampler(
        model, vocab_size=tok.vocab_size, mask_id=tok.mask_id, pad_id=tok.pad_id, memory=mem
    )
    return sampler, tok, info
