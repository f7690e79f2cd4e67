"""Architecture of a Llama-family dense decoder (Llama, Qwen2, Mistral shapes)."""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModel(ValueError):
    """The checkpoint uses something pdlb cannot run; the message names it."""


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections have biases
    # Llama 3 frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_position)
    rope_llama3: tuple[float, float, float, int] | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(
                f"{self.num_heads} attention heads are not a multiple of {self.num_kv_heads} KV heads"
            )
        if self.head_dim % 2:
            raise UnsupportedModel(f"head_dim {self.head_dim} is odd; rotary embeddings need an even one")
