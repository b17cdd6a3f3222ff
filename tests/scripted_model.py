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


def _piece_ids(tok, script: str | list[str]) -> list[int]:
    if isinstance(script, str):
        return tok(script, add_special_tokens=False)["input_ids"]
    tok.add_tokens([p for p in script if len(tok(p, add_special_tokens=False)["input_ids"]) != 1])
    added = tok.get_added_vocab()
    return [added[p] if p in added else tok(p, add_special_tokens=False)["input_ids"][0] for p in script]


def build_scripted(
    tokenizer_dir: Path,
    out: Path,
    script: str | list[str],
    *,
    arch: str = "gpt2",
    add_special: list[str] | None = None,
    end_id: int | None = None,
    chat_template: str | None = None,
    fallbacks: list[list[str]] | None = None,
) -> tuple[Path, list[int]]:
    """Save the model to `out`; return it and the script's token ids (then `end_id`, if given,
    which the model emits after the script and keeps emitting).

    `script` is text, or a list of pieces that are each one token: a piece the tokenizer has no
    token for is added to it as a new (non-special) token, so a script can repeat text (JSON's
    `": "`) with distinct tokens. `fallbacks` are further scripts (lists of pieces, at most 4):
    after any token outside the scripts, the model prefers the first script's first token, then
    the first fallback's, and so on, so under a constraint that forbids the first script's start
    the first allowed fallback is written instead."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if add_special:
        tok.add_special_tokens({"additional_special_tokens": add_special})
    if chat_template:
        tok.chat_template = chat_template
    chains = [_piece_ids(tok, script)] + [_piece_ids(tok, f) for f in fallbacks or []]
    if len(chains) > 5:
        raise ValueError("at most 4 fallbacks")
    flat = [t for chain in chains for t in chain] + ([end_id] if end_id is not None else [])
    if len(set(flat)) != len(flat):
        raise ValueError(f"script tokens must be distinct: {flat}")
    ids = chains[0] + ([end_id] if end_id is not None else [])
    dim = 2 * (len(flat) // 2 + 1)  # state 0: any other token; even for RoPE
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
        for k, chain in enumerate(chains):
            head[chain[0], 0] = 10.0 - 2 * k
        state = 0
        for chain in chains:
            for i, token_id in enumerate(chain):
                state += 1
                embed[token_id].zero_()
                embed[token_id, state] = 1.0
                last = chain[-1] if end_id is None else end_id
                head[chain[i + 1] if i + 1 < len(chain) else last, state] = 10.0
        if end_id is not None:
            state += 1
            embed[end_id].zero_()
            embed[end_id, state] = 1.0
            head[end_id, state] = 10.0
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, ids
