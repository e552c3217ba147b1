"""Zero-shot quality of a CLIP model on held-out world images: shape and colour accuracy, precision@10."""

from dataclasses import asdict, dataclass

import numpy as np
import torch

from indexer.world import COLOURS, QUALITIES, SHAPES, WorldConfig, generate

HELD_OUT_SEED = 777_001  # world seed of held-out images; training must use another


@dataclass(frozen=True)
class Quality:
    """Zero-shot figures on n_images held-out images."""

    n_images: int
    shape_accuracy: float  # argmax over the 6 shapes' prompt ensembles
    colour_accuracy: float  # argmax over the 8 colours' prompt ensembles
    precision_at_10: float  # mean over the 48 "a {colour} {shape}" queries of the share of the top 10 with both right
    by_quality: dict[str, dict[str, float]]  # degradation kind -> {"n", "shape_accuracy", "colour_accuracy"}

    def to_dict(self) -> dict:
        return asdict(self)


def shape_prompts(shape: str) -> list[str]:
    return [f"a {shape}"] + [f"a {c} {shape}" for c in COLOURS]


def colour_prompts(colour: str) -> list[str]:
    return [f"a {colour} shape", f"something {colour}"] + [f"a {colour} {s}" for s in SHAPES]


@torch.no_grad()
def _encode_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    return torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)


@torch.no_grad()
def _class_embeddings(model, tokenizer, prompt_sets: list[list[str]]) -> torch.Tensor:
    """One unit vector per class: the normalised mean of its prompts' embeddings, shape (classes, dim)."""
    return torch.nn.functional.normalize(
        torch.stack([_encode_texts(model, tokenizer, p).mean(0) for p in prompt_sets]), dim=-1
    )


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unit image embeddings (n, dim) of preprocessed images (n, 3, H, W)."""
    return torch.cat(
        [
            torch.nn.functional.normalize(model.encode_image(images[i : i + batch_size]), dim=-1)
            for i in range(0, len(images), batch_size)
        ]
    )


def measure(
    model, preprocess, tokenizer, n_images: int = 2000, seed: int = HELD_OUT_SEED, config: WorldConfig = WorldConfig()
) -> Quality:
    """Zero-shot figures of model on the first n_images of the world with this seed (images go through preprocess)."""
    model.eval()
    world = generate(n_images, seed, config)
    images = torch.stack([preprocess(img) for img, _ in world])
    img = encode_images(model, images)
    shapes = np.array([SHAPES.index(a.shape) for _, a in world])
    colours = np.array([list(COLOURS).index(a.colour) for _, a in world])
    shape_pred = (img @ _class_embeddings(model, tokenizer, [shape_prompts(s) for s in SHAPES]).T).argmax(1).numpy()
    colour_pred = (img @ _class_embeddings(model, tokenizer, [colour_prompts(c) for c in COLOURS]).T).argmax(1).numpy()
    queries = [(ci, si) for ci in range(len(COLOURS)) for si in range(len(SHAPES))]
    q = _encode_texts(model, tokenizer, [f"a {list(COLOURS)[ci]} {SHAPES[si]}" for ci, si in queries])
    top = (q @ img.T).topk(min(10, n_images), dim=1).indices.numpy()
    hits = [np.mean((colours[t] == ci) & (shapes[t] == si)) for (ci, si), t in zip(queries, top)]
    kinds = np.array([a.quality for _, a in world])
    by_quality = {
        k: {
            "n": int(np.sum(kinds == k)),
            "shape_accuracy": float(np.mean(shape_pred[kinds == k] == shapes[kinds == k])),
            "colour_accuracy": float(np.mean(colour_pred[kinds == k] == colours[kinds == k])),
        }
        for k in QUALITIES
        if np.any(kinds == k)
    }
    return Quality(
        n_images=n_images,
        shape_accuracy=float(np.mean(shape_pred == shapes)),
        colour_accuracy=float(np.mean(colour_pred == colours)),
        precision_at_10=float(np.mean(hits)),
        by_quality=by_quality,
    )
