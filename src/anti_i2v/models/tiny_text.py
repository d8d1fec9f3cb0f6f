"""A real T5 tokenizer and a tiny random T5 encoder built in code (nothing downloaded).

Tiny model variants use these so that prompts go through the same tokenise ->
encode path as the released models, only with a small vocabulary and random weights.
"""

from __future__ import annotations

from transformers import T5Config, T5EncoderModel, T5Tokenizer

_WORDS = (
    "a an the of in on to with and at is are his her their "
    "person man woman child boy girl people face head hand hands eyes hair smile "
    "smiling talking speaking walking running dancing turning looking nodding waving laughing "
    "sitting standing moving slowly quickly gently camera video photo portrait close up "
    "astronaut suit flag background light day night outdoor indoor street room "
    "high quality natural motion realistic cinematic"
).split()


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A Unigram T5 tokenizer over a small English vocabulary, built in memory."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(dict.fromkeys(_WORDS))]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_encoder(vocab_size: int, d_model: int) -> T5EncoderModel:
    """A two-layer T5 encoder with random weights (seed the RNG before calling)."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        is_encoder_decoder=False,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()
