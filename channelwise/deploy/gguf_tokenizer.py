"""The tokenizer section of a GGUF export (:mod:`channelwise.deploy.gguf`): copied from the
source GGUF, or written from a Hugging Face fast tokenizer as llama.cpp's ``gpt2`` (byte-level
BPE) model."""

from __future__ import annotations

from channelwise.errors import ExportError


def add_tokenizer(writer, config, tokenizer, tokenizer_gguf) -> None:
    """The ``tokenizer.*`` section: copied field by field from ``tokenizer_gguf`` (the source
    GGUF) when given, else built from a fast ``tokenizer``; its size must be the vocabulary."""
    from gguf import GGUFReader, GGUFValueType

    if tokenizer_gguf is not None:
        reader = GGUFReader(str(tokenizer_gguf))
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                main = GGUFValueType(field.types[0])
                sub = GGUFValueType(field.types[-1]) if main == GGUFValueType.ARRAY else None
                writer.add_key_value(key, field.contents(), main, sub_type=sub)
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        n_tokens = 0 if tokens is None else len(tokens.data)
    elif tokenizer is not None:
        n_tokens = hf_tokenizer_section(writer, config, tokenizer)
    else:
        raise ExportError("GGUF needs a tokenizer: pass the source .gguf or a tokenizer")
    if n_tokens != config.vocab_size:
        raise ExportError(
            f"the tokenizer has {n_tokens} tokens, the model's vocabulary {config.vocab_size}"
        )


def hf_tokenizer_section(writer, config, tokenizer) -> int:
    """A ``gpt2`` (byte-level BPE) tokenizer section from a fast tokenizer; returns its size.

    The pre-tokenizer is written as ``default``: llama.cpp may split raw text differently from
    the original tokenizer (copy the section from the source GGUF to avoid that); token ids given
    to llama.cpp directly are unaffected."""
    import json

    from gguf import TokenType

    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ExportError(
            "GGUF export needs a fast (tokenizers) tokenizer, or the source .gguf to copy the "
            "tokenizer from"
        )
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(vocab) >= config.vocab_size:
        raise ExportError(
            f"the tokenizer has token id {max(vocab)}, beyond the model's vocabulary of "
            f"{config.vocab_size}"
        )
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(config.vocab_size):  # ids the tokenizer lacks become unused padding tokens
        tokens.append(vocab.get(i, f"[PAD{i}]"))
        unused = i not in vocab
        types.append(TokenType.UNUSED if unused else TokenType.CONTROL if i in special else 1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    # Not read by llama.cpp's BPE, but transformers' GGUF readers of some architectures (Qwen2,
    # Gemma) rebuild a tokenizer from scores: rank order, earlier ids first.
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend.get("merges", [])]
    writer.add_token_merges(merges)
    for what in ("bos", "eos", "unk", "pad"):  # the tokenizer's, else the model config's
        token_id = getattr(tokenizer, f"{what}_token_id", None)
        if token_id is None:
            token_id = getattr(config, f"{what}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < config.vocab_size:
            getattr(writer, f"add_{what}_token_id")(token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return len(tokens)
