"""Model hyper-parameters (``configs/model/<preset>.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 8000  # the tokenizer's; the embedding/head are padded to vocab_multiple
    seq_len: int = 256
    d_model: int = 384
    n_layers: int = 8
    n_heads: int = 6
    ffn_hidden: int = 1024  # SwiGLU inner size (gate/up output, down input)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # Padding is independent of the TP size, so TP=1 and TP=N see the same softmax.
    vocab_multiple: int = 128

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"key 'model.d_model': {self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"key 'model.n_heads': head size {self.d_model // self.n_heads} must be even (RoPE)"
            )
        for key in (
            "vocab_size",
            "seq_len",
            "d_model",
            "n_layers",
            "n_heads",
            "ffn_hidden",
            "vocab_multiple",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"key 'model.{key}': got {getattr(self, key)}, expected >= 1")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def check_tp(self, tp: int) -> None:
        """The dimensions tensor parallelism splits must divide by ``tp``."""
        for name, value in (
            ("n_heads", self.n_heads),
            ("ffn_hidden", self.ffn_hidden),
            ("padded vocab", self.padded_vocab_size),
        ):
            if value % tp:
                raise ConfigError(f"model {name}={value} is not divisible by tensor parallel size {tp}")

    def num_params(self) -> int:
        """Parameters of the unsharded model (embedding and head untied)."""
        d, f, v = self.d_model, self.ffn_hidden, self.padded_vocab_size
        per_layer = 4 * d * d + 3 * d * f + 2 * d  # qkv+out, gate/up/down, two RMSNorms
        return self.n_layers * per_layer + 2 * v * d + d
