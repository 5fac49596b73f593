"""A byte-level tokenizer built in code, so the tiny presets need no download.

Every UTF-8 byte is one token (ids 0-255 through the GPT-2 byte-to-unicode table), followed by
three special tokens: ``<pad>`` (256), ``<s>`` (257, prepended to every text) and ``</s>`` (258).
No merges: the vocabulary stays at 259 ids, which keeps a tiny model's step time off the embedding matrix.
"""

from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def byte_tokenizer():
    """Return a new ``PreTrainedTokenizerFast`` over raw bytes (a few ms to build)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_to_char = _bytes_to_unicode()  # the same 256 stand-ins ByteLevel uses, ordered by byte
    vocab = {byte_to_char[b]: b for b in range(256)}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    # Like Llama's tokenizer: <s> starts every encoded text (add_special_tokens=False skips it).
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 257)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=4096,
        padding_side="right",
    )
    tok.name_or_path = "ftlab/byte-level"
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
