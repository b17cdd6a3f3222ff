"""Tiny models whose greedy output is a script we choose, over a real tokenizer, so that CJK,
emoji and special tokens really come out of the server.

The model is a bigram machine: every transformer block's output projections are zero (the
residual stream is the token embedding), positions are zero, and the untied LM head maps the
embedding of script token i to script token i + 1. Any other token maps to the first script
token. The script's token ids must be distinct (each has its own state).
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig


def build_scripted(
    tokenizer_dir: Path,
    out: Path,
    script: str,
    *,
    arch: str = "gpt2",
    add_special: list[str] | None = None,
    end_id: int | None = None,
    chat_template: str | None = None,
) -> tuple[Path, list[int]]:
    """Save the model to `out`; return it and the script's token ids (then `end_id`, if given,
    which the model emits after the script and keeps emitting)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if add_special:
        tok.add_special_tokens({"additional_special_tokens": add_special})
    if chat_template:
        tok.chat_template = chat_template
    ids = tok(script, add_special_tokens=False)["input_ids"]
    if end_id is not None:
        ids = [*ids, end_id]
    if len(set(ids)) != len(ids):
        raise ValueError(f"script tokens must be distinct: {ids}")
    dim = 2 * (len(ids) // 2 + 1)  # state 0: any other token; even for RoPE
    vocab = len(tok)
    eos = tok.eos_token_id
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=vocab, n_positions=256, n_embd=dim, n_layer=1, n_head=1, tie_word_embeddings=False
        )
        config.bos_token_id = config.eos_token_id = eos
        model = GPT2LMHeadModel(config)
        block = model.transformer.h[0]
        projections = [block.attn.c_proj, block.mlp.c_proj]
        embed, head = model.transformer.wte.weight, model.lm_head.weight
        model.transformer.wpe.weight.data.zero_()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=dim,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=dim,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=eos,
        )
        model = LlamaForCausalLM(config)
        layer = model.model.layers[0]
        projections = [layer.self_attn.o_proj, layer.mlp.down_proj]
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        for proj in projections:
            proj.weight.zero_()
            if getattr(proj, "bias", None) is not None:
                proj.bias.zero_()
        embed.zero_()
        embed[:, 0] = 1.0
        head.zero_()
        head[ids[0], 0] = 10.0
        for i, token_id in enumerate(ids):
            embed[token_id].zero_()
            embed[token_id, i + 1] = 1.0
            nxt = ids[min(i + 1, len(ids) - 1)]
            head[nxt, i + 1] = 10.0
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, ids
