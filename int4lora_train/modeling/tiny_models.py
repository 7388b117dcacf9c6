"""Tiny transformers models and a byte-level tokenizer, built locally (no hub), for the demo and the tests.

Sizes are multiples of 32 so vLLM's CPU W4A16 kernel accepts them (partition sizes must divide by 32) and group
size 32 / 64 / 128 divide every input dimension.
"""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
BYTE_VOCAB = 256

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '</s>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)
"""Each turn is ``<s>role\\ncontent</s>\\n``; the assistant's content and ``</s>`` are marked for
``return_assistant_tokens_mask`` so that loss can be restricted to assistant turns."""

# Architecture name -> (config class name, extra config kwargs). Dimensions are filled in by build_tiny_config.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "gemma2": ("Gemma2Config", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64}),
    # Mixture-of-experts (tests/moe): 4 experts, 2 active, expert width 64.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            "head_dim": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
}


def build_tokenizer(model_max_length: int = 2048) -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer: every UTF-8 byte is one token (ids 0..255), plus ``<pad>``, ``<s>``, ``</s>``.

    Deterministic and dependency-free (no training, no download); carries a chat template.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_unicode = _bytes_to_unicode()
    vocab = {byte_to_unicode[b]: b for b in range(BYTE_VOCAB)}
    assert set(vocab) == set(alphabet)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_config(
    architecture: str = "llama",
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 320,
    max_position_embeddings: int = 512,
    **overrides,
) -> transformers.PretrainedConfig:
    """A config for a tiny model of ``architecture`` (one of :data:`ARCHITECTURES`)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    class_name, extra = ARCHITECTURES[architecture]
    kwargs = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=BYTE_VOCAB,
        bos_token_id=BYTE_VOCAB + 1,
        eos_token_id=BYTE_VOCAB + 2,
        tie_word_embeddings=False,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    return getattr(transformers, class_name)(**kwargs)


def build_tiny_model(
    architecture: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides
) -> transformers.PreTrainedModel:
    """A randomly initialised tiny causal LM (deterministic for a given ``seed``)."""
    config = build_tiny_config(architecture, **config_overrides)
    with _seeded(seed):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(dtype).eval()
    return model


class _seeded:
    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.state)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the alphabet of the ByteLevel pre-tokenizer)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
