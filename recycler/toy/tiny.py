"""Tiny Llama-style models and a character tokenizer, built locally (no hub) for demos and tests.

A real transformers config and tokenizer (with a chat template) make the outputs exercise the same
loading paths (`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer`) as real checkpoints.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = list(string.digits + string.ascii_letters + " +-*=?:.,!'\"()\n")

# Chat format: <s><|user|>PROMPT<|end|><|assistant|>RESPONSE<|end|></s>.  `{% generation %}` marks the
# response so that `return_assistant_tokens_mask` finds the tokens that carry loss.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(
    extra_tokens: Sequence[str] = (), *, with_chat_template: bool = True
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer; `extra_tokens` are appended (a newer base with a grown vocabulary)."""
    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *CHARS, *extra_tokens]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if with_chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(
    vocab_size: int, *, hidden: int = 32, layers: int = 2, tie: bool = False
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_tiny_model(
    out: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie: bool = False,
    hidden: int = 32,
    layers: int = 2,
    extra_tokens: Sequence[str] = (),
    max_shard_size: str | int = "5GB",
    with_chat_template: bool = True,
) -> Path:
    """Random-init a tiny Llama and save it (safetensors, HF layout) with its tokenizer into `out`."""
    tokenizer = char_tokenizer(extra_tokens, with_chat_template=with_chat_template)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden=hidden, layers=layers, tie=tie))
    model.to(dtype)
    # Generation stops at the end-of-turn marker as well as at </s>.
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|end|>"),
    ]
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return out


def perturb_model(
    src: Path, out: Path, *, scale: float = 1e-2, seed: int = 1, max_shard_size: str | int = "5GB"
) -> Path:
    """Load `src`, add seeded relative noise to every weight (a stand-in for fine-tuning), save to `out`."""
    model = LlamaForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen) * scale * p.float().abs().mean().clamp_min(1e-3)
            p.copy_((p.float() + noise).to(p.dtype))
    model.save_pretrained(out, max_shard_size=max_shard_size)
    PreTrainedTokenizerFast.from_pretrained(src).save_pretrained(out)
    return out


def llama_shapes(
    hidden: int, intermediate: int, layers: int, vocab: int, kv_heads_ratio: int = 4
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama checkpoint, as `LlamaForCausalLM` names them."""
    kv = hidden // kv_heads_ratio
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (kv, hidden),
            f"{p}.self_attn.v_proj.weight": (kv, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.mlp.gate_proj.weight": (intermediate, hidden),
            f"{p}.mlp.up_proj.weight": (intermediate, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, intermediate),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def build_synthetic_checkpoint(
    out: Path,
    shapes: dict[str, tuple[int, ...]],
    *,
    seed: int = 0,
    like: Path | None = None,
    noise: float = 1e-3,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 512 * 1024**2,
    config: dict | None = None,
) -> Path:
    """Write random weights of the given shapes as sharded safetensors without building a model.

    With `like`, each tensor is `like`'s plus seeded noise (a fine-tune or a next version of it).
    Used by benchmarks and memory tests that need checkpoints of gigabytes in seconds.
    """
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=False)
    gen = torch.Generator().manual_seed(seed)
    src_index = None
    if like is not None:
        idx = like / "model.safetensors.index.json"
        src_index = (
            json.loads(idx.read_text())["weight_map"]
            if idx.exists()
            else dict.fromkeys(shapes, "model.safetensors")
        )
    shard: dict[str, torch.Tensor] = {}
    shard_of: dict[str, int] = {}
    count, size = 0, 0
    for name, shape in shapes.items():
        if like is not None:
            with safe_open(str(like / src_index[name]), "pt") as f:
                base = f.get_tensor(name)
            t = (base.float() + noise * torch.randn(shape, generator=gen)).to(dtype)
        elif len(shape) == 1:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            count += 1
            save_file(shard, str(out / f"part-{count}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0
        shard[name], shard_of[name] = t, count + 1
        size += nbytes
    count += 1
    save_file(shard, str(out / f"part-{count}.safetensors"), metadata={"format": "pt"})
    names = {i: f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
    for i, final in names.items():
        (out / f"part-{i}.safetensors").rename(out / final)
    final = {k: names[i] for k, i in shard_of.items()}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": final}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(config or {"model_type": "llama"}, indent=1))
    return out
