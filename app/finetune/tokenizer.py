"""Train a byte-level BPE tokenizer (GPT-2 style) on local text, for from-scratch models."""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A GPT-2-style tokenizer: byte-level, so any input text round-trips, with one special token
    that serves as bos, eos and unk, as GPT-2's `<|endoftext|>` does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=1024
    )


def python_docs_corpus() -> list[str]:
    """The Python reference docs that every CPython install ships: offline English-like text."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]
