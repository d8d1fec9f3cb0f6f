"""DynamiCrafter's two conditioning encoders: the OpenCLIP ViT-H/14 text and image towers.

Both are built from transformers' CLIP classes and load the official OpenCLIP weights through the
key rules below (the original release). Every size comes from keyword arguments, so
the same classes build the full ViT-H/14 towers and tiny test towers.

**Text** (:class:`OpenCLIPTextEncoder`, the port of ``FrozenOpenCLIPEmbedder(layer="penultimate")``,
checkpoint prefix ``cond_stage_model.``). OpenCLIP runs token embedding + positional embedding, then
all resblocks but the last, then ``ln_final``; the output is the ``[B, 77, width]`` sequence (the
SD-2.x text conditioning). Here that is a ``CLIPTextModel`` with ``layers - 1`` encoder layers: its
``last_hidden_state`` is the output of layer ``layers - 1`` passed through ``final_layer_norm``, i.e.
exactly ``hidden_states[-2]`` of a full ``layers``-deep model followed by the final layer norm. The
last resblock is therefore never built and its weights are on the ignore list. The attention is causal
and has no padding mask, as in OpenCLIP (padding tokens are attended under the causal mask).

**Tokenizer**. OpenCLIP's ``tokenize`` lower-cases and cleans the text, BPE-encodes it, writes
``[<start_of_text>, tokens..., <end_of_text>]``, truncates to 77 keeping ``<end_of_text>`` last and
pads with **0** (the id of ``"!"``), not with the end-of-text id. :func:`tokenize` reproduces that with
transformers' ``CLIPTokenizer`` (same BPE vocabulary as OpenCLIP's bundled ``bpe_simple_vocab_16e6``):
it encodes *without* padding (truncating to ``context_length`` with the special tokens, which keeps
the end-of-text token last) and then pads every row with 0 itself, whatever the tokenizer's own
``pad_token`` is (the laion ViT-H tokenizer pads with ``<|endoftext|>``, SD-2.x's with ``"!"``).
Known difference: OpenCLIP applies ``ftfy.fix_text`` and HTML unescaping before BPE; the
``tokenizers`` backend only NFC-normalises, collapses whitespace and lower-cases, so mojibake or HTML
entities in a prompt may tokenise differently. Plain prompts give identical ids.

**Image** (:class:`OpenCLIPImageEncoder`, the port of ``FrozenOpenCLIPImageEmbedderV2``, checkpoint
prefix ``embedder.``). Input: images in ``[-1, 1]``, ``[B, 3, H, W]``, any size. Pre-processing is
differentiable and matches the original: kornia ``resize`` to ``image_size x image_size`` (bicubic,
``align_corners=True``, ``antialias=True``: a Gaussian blur with ``sigma = (scale - 1) / 2`` per axis
before ``F.interpolate`` when downscaling; no aspect-preserving crop), then ``(x + 1) / 2`` and the CLIP
mean/std normalisation. The tower is a ``CLIPVisionModel``: patch conv (no bias) + class token +
positional embedding, ``pre_layrnorm`` (OpenCLIP ``ln_pre``), the resblocks. The result is
``last_hidden_state``, **all** ``1 + (image_size / patch_size) ** 2`` tokens (257 for ViT-H/14) of the
last layer, taken before ``post_layernorm`` (OpenCLIP ``ln_post``) and before the ``proj`` projection,
which is what the original returns. (transformers applies ``post_layernorm`` only to ``pooler_output``.)
``ln_post`` is loaded into ``post_layernorm`` to keep the load strict, but does not touch the output.

**Key maps**: :func:`text_key_rules` / :func:`image_key_rules` map official OpenCLIP names (relative to
the component prefix) to names relative to the encoder module; :func:`text_ignored_keys` /
:func:`image_ignored_keys` list, with a reason, the official keys that are present in the checkpoint but
not used by the port.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

from anti_i2v.errors import ModelError
from anti_i2v.models.dynamicrafter.checkpoint import KeyRule

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_TOKENIZER_REPO",
    "OpenCLIPImageEncoder",
    "OpenCLIPTextEncoder",
    "image_ignored_keys",
    "image_key_rules",
    "load_clip_tokenizer",
    "openclip_resblock_rules",
    "text_ignored_keys",
    "text_key_rules",
    "tiny_clip_tokenizer",
    "tokenize",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Hugging Face repo with the tokenizer files of OpenCLIP ViT-H/14 (the BPE vocabulary SD-2.x uses too).
DEFAULT_TOKENIZER_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


# ---------------------------------------------------------------------------------------------------
# key rules
# ---------------------------------------------------------------------------------------------------


def openclip_resblock_rules(official: str, ours: str) -> list[KeyRule]:
    """One OpenCLIP ``ResidualAttentionBlock`` (``official`` prefix) -> one ``CLIPEncoderLayer`` (``ours``).

    ``attn.in_proj_*`` (``nn.MultiheadAttention``, rows ``[q; k; v]``) is split into ``q_proj``,
    ``k_proj`` and ``v_proj``; ``ln_1``/``ln_2`` -> ``layer_norm1``/``layer_norm2``; ``mlp.c_fc``/``mlp.c_proj``
    -> ``mlp.fc1``/``mlp.fc2``.
    """
    rules = []
    for p in ("weight", "bias"):
        rules += [
            KeyRule(f"{official}ln_1.{p}", (f"{ours}layer_norm1.{p}",)),
            KeyRule(
                f"{official}attn.in_proj_{p}",
                tuple(f"{ours}self_attn.{n}_proj.{p}" for n in ("q", "k", "v")),
                "split0",
            ),
            KeyRule(f"{official}attn.out_proj.{p}", (f"{ours}self_attn.out_proj.{p}",)),
            KeyRule(f"{official}ln_2.{p}", (f"{ours}layer_norm2.{p}",)),
            KeyRule(f"{official}mlp.c_fc.{p}", (f"{ours}mlp.fc1.{p}",)),
            KeyRule(f"{official}mlp.c_proj.{p}", (f"{ours}mlp.fc2.{p}",)),
        ]
    return rules


def _resblock_keys(official: str) -> list[str]:
    return [r.official for r in openclip_resblock_rules(official, "")]


def text_key_rules(layers: int, *, layer: str = "penultimate") -> list[KeyRule]:
    """Official ``model.*`` keys of ``cond_stage_model`` -> keys of :class:`OpenCLIPTextEncoder`."""
    used = _used_text_layers(layers, layer)
    t = "transformer."
    rules = [
        KeyRule("model.token_embedding.weight", (f"{t}embeddings.token_embedding.weight",)),
        KeyRule("model.positional_embedding", (f"{t}embeddings.position_embedding.weight",)),
        KeyRule("model.ln_final.weight", (f"{t}final_layer_norm.weight",)),
        KeyRule("model.ln_final.bias", (f"{t}final_layer_norm.bias",)),
    ]
    for i in range(used):
        rules += openclip_resblock_rules(f"model.transformer.resblocks.{i}.", f"{t}encoder.layers.{i}.")
    return rules


def text_ignored_keys(layers: int, *, layer: str = "penultimate") -> dict[str, str]:
    """Official ``cond_stage_model`` keys (relative, ``model.*``) that the port does not load, with why."""
    out = {
        "model.text_projection": "CLIP text projection: only the pooled CLIP embedding uses it; DynamiCrafter conditions on the token sequence",
        "model.logit_scale": "CLIP contrastive temperature, a training-only scalar",
    }
    for i in range(_used_text_layers(layers, layer), layers):
        for k in _resblock_keys(f"model.transformer.resblocks.{i}."):
            out[k] = "last text resblock: DynamiCrafter takes the penultimate layer, so it is never run"
    return out


def image_key_rules(layers: int) -> list[KeyRule]:
    """Official ``model.visual.*`` keys of ``embedder`` -> keys of :class:`OpenCLIPImageEncoder`."""
    v, o = "model.visual.", "vision."
    rules = [
        KeyRule(f"{v}conv1.weight", (f"{o}embeddings.patch_embedding.weight",)),
        KeyRule(f"{v}class_embedding", (f"{o}embeddings.class_embedding",)),
        KeyRule(f"{v}positional_embedding", (f"{o}embeddings.position_embedding.weight",)),
        KeyRule(f"{v}ln_pre.weight", (f"{o}pre_layrnorm.weight",)),
        KeyRule(f"{v}ln_pre.bias", (f"{o}pre_layrnorm.bias",)),
        # loaded for a strict load; the port's output (last_hidden_state) is taken before it
        KeyRule(f"{v}ln_post.weight", (f"{o}post_layernorm.weight",)),
        KeyRule(f"{v}ln_post.bias", (f"{o}post_layernorm.bias",)),
    ]
    for i in range(layers):
        rules += openclip_resblock_rules(f"{v}transformer.resblocks.{i}.", f"{o}encoder.layers.{i}.")
    return rules


def image_ignored_keys() -> dict[str, str]:
    """Official ``embedder`` keys (relative, ``model.*``) that the port does not load, with why."""
    leftover = (
        "text-tower leftover: the original deletes model.transformer but keeps the other text parts "
        "of the OpenCLIP model inside the image embedder; never used"
    )
    return {
        "model.visual.proj": "visual projection to the joint CLIP space: the original returns the tokens before it",
        "model.token_embedding.weight": leftover,
        "model.positional_embedding": leftover,
        "model.ln_final.weight": leftover,
        "model.ln_final.bias": leftover,
        "model.text_projection": leftover,
        "model.logit_scale": leftover,
    }


def _used_text_layers(layers: int, layer: str) -> int:
    if layer == "penultimate":
        if layers < 2:
            raise ValueError("the penultimate-layer text encoder needs at least 2 layers")
        return layers - 1
    if layer == "last":
        return layers
    raise ValueError(f"layer must be 'penultimate' or 'last', got {layer!r}")


# ---------------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------------


class OpenCLIPTextEncoder(nn.Module):
    """OpenCLIP text tower returning the penultimate layer after the final layer norm (SD-2.x style).

    Sizes use OpenCLIP's meaning: ``layers`` counts *all* resblocks of the checkpoint (24 for ViT-H/14);
    with ``layer="penultimate"`` the module holds ``layers - 1`` of them. ``forward(input_ids [B, L])``
    returns ``[B, L, width]``.
    """

    def __init__(
        self,
        *,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        intermediate_size: int = 4096,
        context_length: int = 77,
        vocab_size: int = 49408,
        layer_norm_eps: float = 1e-5,
        hidden_act: str = "gelu",
        layer: str = "penultimate",
        projection_dim: int = 1024,
    ) -> None:
        super().__init__()
        self.layers = int(layers)
        self.layer = layer
        self.context_length = int(context_length)
        self.vocab_size = int(vocab_size)
        self.width = int(width)
        self.projection_dim = int(projection_dim)  # only documents the ignored text_projection
        config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=intermediate_size,
            num_hidden_layers=_used_text_layers(self.layers, layer),
            num_attention_heads=heads,
            max_position_embeddings=context_length,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
            pad_token_id=0,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
        )
        self.transformer = CLIPTextModel(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] > self.context_length:
            raise ValueError(f"at most {self.context_length} tokens, got {input_ids.shape[-1]}")
        return self.transformer(input_ids=input_ids).last_hidden_state

    def key_rules(self) -> list[KeyRule]:
        return text_key_rules(self.layers, layer=self.layer)

    def ignored_keys(self) -> dict[str, str]:
        return text_ignored_keys(self.layers, layer=self.layer)


def load_clip_tokenizer(source: str = DEFAULT_TOKENIZER_REPO, *, subfolder: str | None = None) -> CLIPTokenizer:
    """The OpenCLIP ViT-H/14 BPE tokenizer from a hub repo or a local folder (``vocab.json`` + ``merges.txt``).

    Padding is handled by :func:`tokenize` (0, as OpenCLIP), so the tokenizer's own ``pad_token`` does
    not matter. ``stabilityai/stable-diffusion-2-1`` with ``subfolder="tokenizer"`` works as well.
    """
    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        return CLIPTokenizer.from_pretrained(source, **kwargs)
    except Exception as err:  # noqa: BLE001 - offline/missing files become one actionable message
        raise ModelError(
            f"cannot load the CLIP tokenizer from {source} ({type(err).__name__}); download it once online "
            "or pass a local folder with vocab.json and merges.txt"
        ) from None


def tokenize(tokenizer: CLIPTokenizer, prompts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
    """OpenCLIP-style token ids ``[B, context_length]``: start, BPE tokens, end, then zeros (see module doc)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = tokenizer(list(prompts), truncation=True, max_length=context_length, padding=False)["input_ids"]
    out = torch.zeros(len(ids), context_length, dtype=torch.long)
    for row, seq in enumerate(ids):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


_TINY_WORDS = (
    "a an the of in on to with and at is are his her their person man woman child boy girl people face "
    "head hand hands eyes hair smile smiling talking speaking walking running dancing turning looking "
    "nodding waving laughing sitting standing moving slowly quickly gently camera video photo portrait "
    "close up astronaut suit flag background light day night outdoor indoor street room high quality "
    "natural motion realistic cinematic"
).split()


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2 / CLIP convention), in byte order of the table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols = [chr(b) for b in keep]
    extra = 0
    for b in range(256):
        if b not in keep:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def tiny_clip_tokenizer(words: Sequence[str] = _TINY_WORDS) -> CLIPTokenizer:
    """A real byte-level BPE ``CLIPTokenizer`` with a small vocabulary, built in memory (nothing downloaded).

    Layout follows the CLIP vocabulary: byte symbols (``"!"`` is id 0), the same with ``</w>``, one merge
    chain per word in ``words``, then ``<|startoftext|>`` and ``<|endoftext|>``. Any text tokenises
    (unknown words fall back to byte symbols); ids stay below ``len(tokenizer)`` (< 1024 by default).
    """
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


# ---------------------------------------------------------------------------------------------------
# image
# ---------------------------------------------------------------------------------------------------


class OpenCLIPImageEncoder(nn.Module):
    """OpenCLIP image tower returning all last-layer tokens before ``ln_post``/``proj`` (see module doc).

    ``forward(images [B, 3, H, W] in [-1, 1])`` -> ``[B, 1 + (image_size // patch_size) ** 2, width]``.
    ``forward(pixels, preprocess=False)`` skips the resize/normalisation for already prepared input.
    """

    def __init__(
        self,
        *,
        width: int = 1280,
        layers: int = 32,
        heads: int = 16,
        patch_size: int = 14,
        image_size: int = 224,
        intermediate_size: int = 5120,
        layer_norm_eps: float = 1e-5,
        hidden_act: str = "gelu",
        antialias: bool = True,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        projection_dim: int = 1024,
    ) -> None:
        super().__init__()
        self.layers = int(layers)
        self.width = int(width)
        self.image_size = int(image_size)
        self.antialias = bool(antialias)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.projection_dim = int(projection_dim)  # only documents the ignored visual.proj
        config = CLIPVisionConfig(
            hidden_size=width,
            intermediate_size=intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_channels=3,
            image_size=image_size,
            patch_size=patch_size,
            hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps,
        )
        self.vision = CLIPVisionModel(config)

    @property
    def num_tokens(self) -> int:
        return 1 + (self.image_size // self.vision.config.patch_size) ** 2

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` images -> normalised ``image_size`` pixels (kornia bicubic, antialias, align_corners)."""
        from kornia.geometry.transform import resize

        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        x = resize(
            images,
            (self.image_size, self.image_size),
            interpolation="bicubic",
            align_corners=True,
            antialias=self.antialias,
        )
        x = (x + 1.0) / 2.0
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, images: torch.Tensor, *, preprocess: bool = True) -> torch.Tensor:
        pixels = self.preprocess(images) if preprocess else images
        return self.vision(pixel_values=pixels).last_hidden_state

    def key_rules(self) -> list[KeyRule]:
        return image_key_rules(self.layers)

    def ignored_keys(self) -> dict[str, str]:
        return image_ignored_keys()
