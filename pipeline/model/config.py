"""Model hyper-parameters (``configs/model/<preset>.yaml``).

Every architecture option defaults to the original model (multi-head attention, no biases,
unscaled RoPE, untied head), so existing presets, checkpoints and exports keep their meaning.
The options exist to hold published dense checkpoints (LLaMA-, Qwen2/Dream- and LLaDA-style;
pipeline/hf/) without approximation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import ConfigError

ROPE_SCALINGS = ("none", "linear", "llama3")
QK_NORMS = ("none", "head", "full")


@dataclass
class ModelConfig:
    # The model family (pipeline/families): its builder, Hugging Face layouts, cost model and
    # parallel plan. A family may extend this section with keys of its own (its config class).
    family: str = "dense"
    vocab_size: int = 8000  # the tokenizer's; the embedding/head are padded to vocab_multiple
    seq_len: int = 256  # tokens per sequence (the dataset's seq_len); RoPE tables are this long
    d_model: int = 384  # hidden size
    n_layers: int = 8  # transformer blocks
    n_heads: int = 6  # query heads (head size d_model / n_heads unless head_dim is set)
    ffn_hidden: int = 1024  # SwiGLU inner size (gate/up output, down input)
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.02  # normal init of weights (outputs of residual branches scaled by 1/sqrt(2 L))
    # Padding is independent of the TP size, so TP=1 and TP=N see the same softmax. The padded
    # logits are masked to the dtype's minimum by the model: never sampled, never in a softmax.
    vocab_multiple: int = 128
    # Grouped-query attention: key/value heads shared by n_heads / n_kv_heads query heads each
    # (None = n_heads: plain multi-head attention).
    n_kv_heads: int | None = None
    qkv_bias: bool = False  # biases on Q, K, V only (Qwen2 / Dream); the output projection has none
    tie_embeddings: bool = False  # the LM head reuses the embedding matrix (no head parameter)
    # RoPE frequency scaling, as transformers defines it: "linear" divides every frequency by
    # rope_factor; "llama3" (Llama 3.1) divides only the low frequencies, smoothly.
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # RoPE scaling factor (linear, llama3)
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: the pre-training context length
    # An explicit head size (Qwen3, LLaDA2 set one); None = d_model / n_heads. Q/K/V have
    # heads * head_dim rows and the output projection n_heads * head_dim columns, whatever d_model is.
    head_dim: int | None = None
    # RMSNorm of queries and keys after the QKV projection, before RoPE: "head" = over each head's
    # head_dim, one weight [head_dim] shared by the heads (Qwen3, LLaDA2); "full" = over the whole
    # query (n_heads * head_dim) and key (n_kv_heads * head_dim) projection (OLMoE).
    qk_norm: Literal["none", "head", "full"] = "none"
    # RoPE rotates the first int(head_dim * f) dims of each head (frequencies over that width, as
    # transformers' partial_rotary_factor); the rest pass through unrotated (LLaDA2: 0.5).
    partial_rotary_factor: float = 1.0

    @classmethod
    def config_class_for(cls, data: Mapping[str, Any], source: str, key: str) -> type[ModelConfig]:
        """The config class of the family ``data`` names (``family``, default ``dense``); ``key`` is
        the section's dotted name (``model``) for the error."""
        name = data.get("family", "dense")
        if name not in _CONFIG_CLASSES:
            known = ", ".join(sorted(_CONFIG_CLASSES))
            dotted = f"{key}.family" if key else "family"
            raise ConfigError(
                f"{source}: key '{dotted}': '{name}' is not a registered model family (known: {known})"
            )
        return _CONFIG_CLASSES[name]

    def validate(self) -> None:
        if self.family not in _CONFIG_CLASSES or not isinstance(self, _CONFIG_CLASSES[self.family]):
            raise ConfigError(f"key 'model.family': '{self.family}' does not name this config's family")
        for key in (
            "vocab_size",
            "seq_len",
            "d_model",
            "n_layers",
            "n_heads",
            "ffn_hidden",
            "vocab_multiple",
            "rope_original_max_len",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"key 'model.{key}': got {getattr(self, key)}, expected >= 1")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ConfigError(
                f"key 'model.n_kv_heads': {self.n_kv_heads} must be >= 1 and divide n_heads={self.n_heads}"
            )
        for key in ("rope_theta", "norm_eps", "rope_factor"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"key 'model.{key}': got {getattr(self, key)}, expected > 0")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError(
                f"key 'model.rope_scaling': '{self.rope_scaling}' is not one of {', '.join(ROPE_SCALINGS)}"
            )
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ConfigError(
                "key 'model.rope_high_freq_factor': must exceed rope_low_freq_factor "
                f"({self.rope_high_freq_factor} vs {self.rope_low_freq_factor})"
            )
        self._validate_attention()

    def _validate_attention(self) -> None:
        """Head size, q/k norm and partial rotary (after n_heads was checked to be >= 1)."""
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError(f"key 'model.head_dim': got {self.head_dim}, expected >= 1 (or null)")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"key 'model.d_model': {self.d_model} is not divisible by n_heads={self.n_heads} "
                "(or set model.head_dim)"
            )
        if self.head_size % 2:
            key = "head_dim" if self.head_dim is not None else "n_heads"
            raise ConfigError(f"key 'model.{key}': head size {self.head_size} must be even (RoPE)")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"key 'model.qk_norm': '{self.qk_norm}' is not one of {', '.join(QK_NORMS)}")
        f = self.partial_rotary_factor
        if not 0 < f <= 1:
            raise ConfigError(f"key 'model.partial_rotary_factor': got {f}, expected 0 < f <= 1")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(
                f"key 'model.partial_rotary_factor': {f} rotates int({self.head_size} * {f}) = "
                f"{self.rotary_dim} dims of each head, expected an even number >= 2"
            )

    @property
    def head_size(self) -> int:
        """The size of one attention head: ``head_dim``, or d_model / n_heads when it is None."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head RoPE rotates: int(head_size * partial_rotary_factor)."""
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def qkv_size(self) -> int:
        """Output size of the fused QKV projection: n_heads query + 2 * kv_heads key/value heads."""
        return (self.n_heads + 2 * self.kv_heads) * self.head_size

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m


# family name -> its config class (pipeline/families/registry.py registers each family's)
_CONFIG_CLASSES: dict[str, type[ModelConfig]] = {"dense": ModelConfig}


def register_model_config(family: str, cls: type[ModelConfig]) -> None:
    """Make ``model.family: <family>`` load as ``cls`` (a ModelConfig subclass, or itself)."""
    if not (isinstance(cls, type) and issubclass(cls, ModelConfig)):
        raise TypeError(f"family {family!r}: its config class must subclass ModelConfig, got {cls!r}")
    _CONFIG_CLASSES[family] = cls


def unregister_model_config(family: str) -> None:
    """Forget ``family``'s config class (never the dense family's, which is ``ModelConfig`` itself)."""
    if family != "dense":
        _CONFIG_CLASSES.pop(family, None)
