"""The CLIP encoder: loads an open_clip model (name + tag, checkpoint file, or the shipped clipbt-tiny) and embeds text and images.

torch and open_clip are imported when a model is loaded, so that a search with the shipped model
(`TextEncoder`, numpy only) never imports them.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np

from indexer.errors import ModelUnavailableError

if TYPE_CHECKING:
    import torch

# What `clipbt index` embeds with when no --model is given: a general CLIP (ViT-B/32 trained on
# LAION-2B; 66.6% zero-shot ImageNet top-1 in open_clip's table), fetched once from the Hugging Face hub.
GENERAL_MODEL = ("ViT-B-32", "laion2b_s34b_b79k")
SHIPPED_MODEL = (
    "clipbt-tiny"  # the shipped model's name (indexer.default_model.DEFAULT_MODEL_NAME); offline, world only
)
RANDOM = "random"  # `pretrained` value for seeded random weights: for tests and speed benchmarks only
BUNDLED = "bundled"  # recorded `pretrained` of hf-hub:/local-dir: models, whose name fixes the weights
_SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip model names that carry their own weights
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _options(model: str | None) -> str:
    if model is None or model == SHIPPED_MODEL:
        return "Options: --model NAME with --pretrained TAG (cached) or --pretrained PATH (a checkpoint file)"
    import open_clip

    tags = ""
    if model and model in open_clip.list_models():
        tags = f" (tags for {model}: {', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'})"
    return (
        f"Options: --pretrained TAG for a tag already in the open_clip/Hugging Face cache{tags}; "
        f"--pretrained PATH to a checkpoint file; or --model {SHIPPED_MODEL}, the shipped model (offline)"
    )


def model_identity(model: str | None, pretrained: str | None) -> tuple[str, str]:
    """The (model, pretrained) pair recorded with a collection, resolved without loading weights.

    A checkpoint file is recorded by content, as "sha256:<hex>", so moving it keeps the identity and
    changing it does not. The shipped model (`model` None or "clipbt-tiny") is recorded the same
    way (its weights file).
    """
    if model is None or model == SHIPPED_MODEL:
        if pretrained is not None:
            raise ModelUnavailableError(
                f"pretrained {pretrained!r} given without a model (or with the shipped {SHIPPED_MODEL}, "
                "which has its own weights): name the model too"
            )
        default = _default_model_module()
        try:
            return default.DEFAULT_MODEL_NAME, "sha256:" + file_sha256(default.weights_path())
        except OSError as exc:
            raise ModelUnavailableError(
                f"the shipped default model's weights cannot be read ({exc}). {_options(None)}"
            ) from None
    if model.startswith(_SCHEMAS):
        if pretrained is not None:
            raise ModelUnavailableError(f"model {model!r} carries its own weights; drop pretrained {pretrained!r}")
        return model, BUNDLED
    import open_clip

    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelUnavailableError(
            f"unknown open_clip model {model!r}.{hint} See open_clip.list_models(), "
            f"or use hf-hub:ORG/REPO, local-dir:PATH, or {SHIPPED_MODEL} for the shipped model"
        )
    if pretrained is None:
        raise ModelUnavailableError(
            f"model {model!r} needs pretrained weights. {_options(model)}; or {RANDOM!r} (untrained)"
        )
    if pretrained == RANDOM:
        return model, RANDOM
    if os.path.isfile(pretrained):
        return model, "sha256:" + file_sha256(pretrained)
    if os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        raise ModelUnavailableError(f"checkpoint file {pretrained!r} not found. {_options(model)}")
    if not open_clip.pretrained.is_pretrained_cfg(model, pretrained):
        raise ModelUnavailableError(f"unknown pretrained tag {pretrained!r} for model {model!r}. {_options(model)}")
    return model, pretrained


def _default_model_module():
    try:
        from indexer import default_model
    except ImportError as exc:
        raise ModelUnavailableError(f"the shipped default model is not installed ({exc}). {_options(None)}") from None
    return default_model


def _auto_device(device: str | torch.device | None) -> torch.device:
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder:
    """A loaded CLIP model: l2-normalised float32 embeddings of texts and preprocessed image batches."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable,
        tokenizer: Callable,
        model_name: str,
        pretrained: str,
        device: torch.device,
        checkpoint_path: str | None = None,
    ):
        self.model_name = model_name  # as open_clip spells it, or the default model's name
        self.pretrained = pretrained  # tag, "sha256:<hex>" of a checkpoint file, "random" or "bundled"
        self.checkpoint_path = checkpoint_path  # absolute path of the checkpoint file it was loaded from, if any
        self.device = device
        self.preprocess = preprocess  # PIL RGB image -> float tensor (3, H, W); picklable for workers
        self.dtype = next(model.parameters()).dtype  # float16 on CUDA, float32 on CPU
        self._model = model.eval()
        self._tokenizer = tokenizer
        size = getattr(getattr(model, "visual", None), "image_size", 224)
        self.image_size = min(size) if isinstance(size, (tuple, list)) else int(size)  # input side, pixels
        self.dim = int(self.encode_text([""]).shape[1])

    @classmethod
    def load(
        cls, model: str | None = None, pretrained: str | None = None, device: str | torch.device | None = None
    ) -> Encoder:
        """Load `model` with `pretrained` weights (see `model_identity`) on `device` (default: CUDA in
        float16 when present, else CPU in float32). Raises ModelUnavailableError, never a download traceback.

        A hub tag is taken from the local Hugging Face cache without any request when it is there;
        otherwise the hub must answer within `hub.PROBE_TIMEOUT_S`, or the error says how to get it."""
        import open_clip
        import torch

        from indexer import hub

        name, recorded = model_identity(model, pretrained)
        device = _auto_device(device)
        precision = "fp16" if device.type == "cuda" else "fp32"
        if model is None or model == SHIPPED_MODEL:
            net, preprocess, tokenizer = _default_model_module().load_default_model(device)
            if precision == "fp16":
                open_clip.convert_weights_to_lp(net, torch.float16)
            return cls(net, preprocess, tokenizer, name, recorded, device)
        weights = None if recorded != pretrained else hub.hub_weights(model, pretrained)
        from_cache = weights is not None and hub.cached_file(weights) is not None
        if weights is not None and not from_cache:
            reason = hub.unreachable_reason()
            if reason is not None:
                raise ModelUnavailableError(hub.offline_message(weights, reason))
        try:
            with torch.random.fork_rng(devices=[]), hub.offline() if from_cache else nullcontext():
                torch.manual_seed(0)  # makes "random" weights one fixed model, so its identity means something
                net, _, preprocess = open_clip.create_model_and_transforms(
                    model,
                    pretrained=None if recorded == RANDOM else pretrained,
                    precision=precision,
                    device=device,
                    require_pretrained=recorded != RANDOM,
                )
            tokenizer = open_clip.get_tokenizer(model)
        except Exception as exc:  # open_clip raises RuntimeError/OSError/ValueError for missing weights
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelUnavailableError(
                f"cannot load weights for model {model!r} pretrained {pretrained!r}: {reason}. {_options(model)}"
            ) from None
        checkpoint_path = os.path.abspath(pretrained) if recorded.startswith("sha256:") else None
        return cls(net, preprocess, tokenizer, name, recorded, device, checkpoint_path)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts: float32 (n, dim), rows of unit norm."""
        import torch

        tokens = self._tokenizer(list(texts)).to(self.device)
        with torch.inference_mode():
            return self._normalised(self._model.encode_text(tokens))

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed a preprocessed batch (n, 3, H, W): float32 (n, dim), rows of unit norm."""
        import torch

        with torch.inference_mode():
            x = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
            return self._normalised(self._model.encode_image(x))

    @staticmethod
    def _normalised(features: torch.Tensor) -> np.ndarray:
        import torch.nn.functional as F

        return F.normalize(features.float(), dim=-1).cpu().numpy()


class TextEncoder:
    """The shipped model's text half in numpy (`indexer.default_model.text`): what a search with it
    needs (`model_name`, `pretrained`, `dim`, `encode_text`), without importing torch or open_clip."""

    def __init__(self):
        default = _default_model_module()
        self.model_name, self.pretrained = model_identity(None, None)
        self._text = default.load_text_encoder()
        self.dim = self._text.dim

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts: float32 (n, dim), rows of unit norm (equal to `Encoder.encode_text` up to float rounding)."""
        features = self._text.encode_text(list(texts))
        return features / np.linalg.norm(features, axis=1, keepdims=True)
