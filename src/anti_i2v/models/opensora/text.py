"""T5 text conditioning of Open-Sora 1.2 (``DeepFloyd/t5-v1_1-xxl`` through transformers).

The released inference (the original release) turns a prompt into STDiT3's caption input as:

1. **Score suffixes** (:func:`append_scores`): ``" aesthetic score: 6.5."`` (``aes``), and optionally
   ``" motion score: <flow>."`` and ``" camera motion: <text>."``, each only when the prompt does not
   already carry that field.
2. **Caption cleaning** (:func:`clean_caption`), applied twice like the original. The original uses
   PixArt's ``clean_caption``; this module implements its common core, which is what changes ordinary
   prompts: URL un-quoting (``+`` becomes a space), **lower-casing** (T5's vocabulary is cased, so this
   matters), HTML entity unescaping, removal of URLs and ``@handles``, and whitespace collapsing.
   **Omitted** (documented, not reproduced): ftfy mojibake repair, BeautifulSoup tag stripping, the CJK
   character ranges, and PixArt's long list of punctuation / number / file-name / IP-address rules.
   For plain English prompts we expect the same string, but this was not checked against the original.
3. **Tokenisation** with the T5 tokenizer: ``max_length = model_max_length`` (300), padding to that
   length, truncation, ``</s>`` appended; the attention mask is kept.
4. **Encoding**: ``T5EncoderModel(input_ids, attention_mask).last_hidden_state`` in float32 (the
   original insists on fp32 T5), returned as ``y [B, 1, L, 4096]`` with ``mask [B, L]`` (int64).

The unconditional caption is *not* produced here: it is STDiT3's learned ``y_embedder.y_embedding``
(see :func:`null_caption`), and the sampler reuses the prompt's mask for it.

:meth:`T5TextEncoder.tiny` builds the same pipeline from an in-memory T5 tokenizer and a random two-layer
T5 encoder (:mod:`anti_i2v.models.tiny_text`), so tests never download anything.
"""

from __future__ import annotations

import gc
import html
import os
import re
import urllib.parse as ul
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from anti_i2v.errors import ModelError

__all__ = [
    "T5TextEncoder",
    "TextConditioning",
    "append_scores",
    "clean_caption",
    "null_caption",
    "text_preprocessing",
]

DEFAULT_T5 = "DeepFloyd/t5-v1_1-xxl"
DEFAULT_MAX_LENGTH = 300
DEFAULT_AES = 6.5


class TextConditioning(NamedTuple):
    """Caption features ``y [B, 1, L, D]`` and T5 attention ``mask [B, L]`` (int64, 1 = token)."""

    y: torch.Tensor
    mask: torch.Tensor


# ---------------------------------------------------------------------------------------------------
# prompt processing
# ---------------------------------------------------------------------------------------------------


def append_scores(
    prompt: str,
    aes: float | None = DEFAULT_AES,
    flow: float | None = None,
    camera_motion: str | None = None,
) -> str:
    """Append Open-Sora's score fields: ``"<prompt> aesthetic score: 6.5."`` etc.

    Each field is added only when it is given and the prompt does not already contain it
    (``"aesthetic score:"``, ``"motion score:"``, ``"camera motion:"``). Numbers use one decimal.
    """
    out = prompt
    if aes is not None and "aesthetic score:" not in prompt:
        out = f"{out} aesthetic score: {aes:.1f}."
    if flow is not None and "motion score:" not in prompt:
        out = f"{out} motion score: {flow:.1f}."
    if camera_motion is not None and "camera motion:" not in prompt:
        out = f"{out} camera motion: {camera_motion}."
    return out


_URL = re.compile(r"\b(?:https?:\S+|www\.\S+)", re.IGNORECASE)
_HANDLE = re.compile(r"@[\w\d]+\b")
_SPACES = re.compile(r"\s+")


def clean_caption(caption: str) -> str:
    """The core of PixArt's ``clean_caption`` (see the module docstring for what is omitted)."""
    text = ul.unquote_plus(str(caption))
    text = text.strip().lower()
    text = html.unescape(html.unescape(text))
    text = _URL.sub("", text)
    text = _HANDLE.sub("", text)
    text = _SPACES.sub(" ", text)
    return text.strip()


def text_preprocessing(text: str, use_text_preprocessing: bool = True) -> str:
    """Open-Sora's prompt clean-up: :func:`clean_caption` twice, or only ``lower().strip()``."""
    if use_text_preprocessing:
        return clean_caption(clean_caption(text))
    return text.lower().strip()


def null_caption(y_embedding: torch.Tensor, batch_size: int) -> torch.Tensor:
    """STDiT3's learned null caption ``y_embedding [L, D]`` as ``[batch_size, 1, L, D]``."""
    return y_embedding[None, None].expand(batch_size, 1, *y_embedding.shape)


# ---------------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    if flag.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


class T5TextEncoder:
    """Prompt -> ``TextConditioning(y [B, 1, L, D], mask [B, L])`` as Open-Sora 1.2's inference.

    Args:
        tokenizer: a transformers T5 tokenizer.
        model: a ``T5EncoderModel`` (``None`` once :meth:`free` was called).
        model_max_length: the padded length ``L`` (300 for the released model; must equal STDiT3's
            ``model_max_length``).
        aes: the default aesthetic score appended by :meth:`encode` (6.5; ``None``: no suffix).
        use_text_preprocessing: run :func:`text_preprocessing` (True, as the released inference).
    """

    def __init__(
        self,
        tokenizer: Any,
        model: torch.nn.Module | None,
        *,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        aes: float | None = DEFAULT_AES,
        use_text_preprocessing: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.model_max_length = int(model_max_length)
        self.aes = aes
        self.use_text_preprocessing = use_text_preprocessing
        if model is not None:
            model.eval()
            model.requires_grad_(False)

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike[str] = DEFAULT_T5,
        *,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        offline: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> T5TextEncoder:
        """Load the tokenizer and ``T5EncoderModel`` from a hub id or a local folder (float32 by default).

        ``offline`` (default: ``HF_HUB_OFFLINE``) restricts hub ids to the local cache. Failures become a
        one-line :class:`~anti_i2v.errors.ModelError`.
        """
        from transformers import AutoTokenizer, T5EncoderModel

        offline = _hub_offline() if offline is None else offline
        source = str(path_or_hub_id)
        local = Path(source).expanduser()
        where = str(local) if local.is_dir() else source
        common: dict[str, Any] = {"local_files_only": offline or local.is_dir()}
        if cache_dir is not None:
            common["cache_dir"] = str(cache_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, model_max_length=model_max_length, **common)
        except Exception as err:  # noqa: BLE001 - every loading failure becomes one actionable message
            raise ModelError(_load_message("T5 tokenizer", where, offline, err)) from None
        try:
            model = T5EncoderModel.from_pretrained(where, dtype=dtype, **common, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise ModelError(_load_message("T5 encoder", where, offline, err)) from None
        model.to(device)
        return cls(tokenizer, model, model_max_length=model_max_length)

    @classmethod
    def tiny(
        cls,
        *,
        seed: int = 0,
        d_model: int = 32,
        model_max_length: int = 20,
        device: torch.device | str = "cpu",
    ) -> T5TextEncoder:
        """The in-memory tiny variant: a real T5 tokenizer over a small vocabulary + a random 2-layer T5."""
        from anti_i2v.models.tiny_text import tiny_t5_encoder, tiny_t5_tokenizer

        tokenizer = tiny_t5_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = tiny_t5_encoder(len(tokenizer), d_model)
        return cls(tokenizer, model.to(device), model_max_length=model_max_length)

    # --- properties -------------------------------------------------------------------------------------

    @property
    def d_model(self) -> int:
        if self.model is None:
            raise ModelError("the T5 encoder was freed; reload it to encode new prompts")
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        if self.model is None:
            return torch.device("cpu")
        return next(self.model.parameters()).device

    # --- encoding -----------------------------------------------------------------------------------

    def preprocess(
        self,
        prompts: str | Sequence[str],
        *,
        aes: float | None | str = "default",
        flow: float | None = None,
        camera_motion: str | None = None,
    ) -> list[str]:
        """Score suffixes, then (optionally) caption cleaning; ``aes="default"`` uses ``self.aes``."""
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        score = self.aes if aes == "default" else aes
        out = [append_scores(p, score, flow, camera_motion) for p in items]  # type: ignore[arg-type]
        if self.use_text_preprocessing:
            out = [text_preprocessing(p) for p in out]
        return out

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both int64 ``[B, model_max_length]`` (padded, truncated)."""
        enc = self.tokenizer(
            list(texts),
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    def encode(
        self,
        prompts: str | Sequence[str],
        *,
        aes: float | None | str = "default",
        flow: float | None = None,
        camera_motion: str | None = None,
        preprocess: bool = True,
        free_encoder: bool = False,
    ) -> TextConditioning:
        """Encode prompts into ``y [B, 1, L, D]`` (float32) and ``mask [B, L]`` (int64) on the encoder's device.

        ``preprocess=False`` skips the suffixes and the cleaning (the strings are tokenised as given).
        ``free_encoder=True`` releases the T5 weights afterwards (see :meth:`free`).
        """
        if self.model is None:
            raise ModelError("the T5 encoder was freed; reload it (T5TextEncoder.from_pretrained) to encode new prompts")
        texts = (
            self.preprocess(prompts, aes=aes, flow=flow, camera_motion=camera_motion)
            if preprocess
            else ([prompts] if isinstance(prompts, str) else list(prompts))
        )
        input_ids, attention_mask = self.tokenize(texts)
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with torch.no_grad():
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        result = TextConditioning(hidden.float()[:, None], attention_mask)
        if free_encoder:
            self.free()
        return result

    __call__ = encode

    def free(self) -> None:
        """Drop the T5 encoder (about 19 GB in float32 for T5-XXL); the tokenizer stays."""
        model, self.model = self.model, None
        if model is not None:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _load_message(what: str, where: str, offline: bool, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    detail = f" ({type(err).__name__}: {first[:160]})" if first else f" ({type(err).__name__})"
    if offline:
        return (
            f"cannot load the {what} from {where}{detail}; HF_HUB_OFFLINE is set, so download "
            f"{DEFAULT_T5} once online or pass a local folder"
        )
    return f"cannot load the {what} from {where}{detail}; check the hub id / folder and the network"
