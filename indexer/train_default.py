"""Train the shipped `clipbt-tiny` model contrastively on generated world images, then measure and report it.

The shipped weights come from two runs on a 2-core AMD EPYC CPU shared with other jobs (no GPU). First from random
weights, seed 0, 30 minutes (5007 steps of 128; the weights shipped before, sha256:5cc2f0c1...; report
benchmarks/results/default_model_base.json):

    python -m indexer.train_default --out indexer/default_model/clipbt-tiny.safetensors --minutes 30 --seed 0

then, from a copy of those (base.safetensors), a fine-tune on world seed 3 whose captions also name quality and
position and which reads the world's preference features off the embedding: 25 minutes, 2345 steps of 128, 25.9
minutes in all (report benchmarks/results/default_model.json):

    python -m indexer.train_default --out indexer/default_model/clipbt-tiny.safetensors --minutes 25 --seed 3 \
        --init base.safetensors --lr 1e-3 --p-quality 0.4 --p-position 0.4 --hard 0.4 --hard-shape 0.2 \
        --feature-weight 2

It generates a pool of world images once (world seed = --seed), then takes AdamW steps on open_clip's ClipLoss over
batches of pool images with freshly sampled captions. Half the batches hold a single colour, so that shape, the
hardest captioned attribute, decides the contrastive loss there (--hard-shape: a share of batches of one colour and
one shape, where quality, position, fill and size must decide). --p-quality and --p-position make captions name the
image quality ("a blurry ...") and the position ("... on the left") that often, and --p-shape-only and
--p-colour-only set the shares of captions that name only the shape or only the colour (indexer.world.caption).
--attribute-weight adds linear classifiers of the nameable attributes on the image embedding (AttributeHead), and
--feature-weight a read-out of the world's preference features along orthonormal directions at one spread
(FeatureHead); both train beside the contrastive loss and are dropped from the written weights. --init starts from
given weights instead of random. The learning rate warms up, then follows a cosine over the wall-time budget (or
over --steps when given, for a step count that does not depend on the machine). The weights are written as fp16
safetensors; the report (benchmarks/results/default_model.json) measures the written file on held-out images."""

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file

from indexer.default_model import DEFAULT_MODEL_NAME, register
from indexer.default_model.quality import HELD_OUT_SEED, measure
from indexer.world import (
    BACKGROUNDS,
    COLOURS,
    QUALITIES,
    SHAPES,
    SIZES,
    Attributes,
    WorldConfig,
    caption,
    feature_matrix,
    generate,
    third,
)

REPORT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "default_model.json"


def _pool(n: int, seed: int, config: WorldConfig) -> tuple[torch.Tensor, list]:
    """The first n world images of this seed as uint8 (n, H, W, 3), with their attributes."""
    world = generate(n, seed, config)
    return torch.from_numpy(np.stack([np.asarray(img) for img, _ in world])), [a for _, a in world]


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), as the model's preprocess does for images already at its size."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


ATTRIBUTE_CLASSES = {  # what a caption can name, as classes: the auxiliary head's targets
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "filled": (False, True),
    "count": (1, 2, 3),
    "background": tuple(BACKGROUNDS),
    "column": ("left", "middle", "right"),
    "row": ("top", "middle", "bottom"),
    "quality": QUALITIES,
}


def attribute_targets(attrs: list[Attributes]) -> torch.Tensor:
    """(n, len(ATTRIBUTE_CLASSES)) class indices of each image's nameable attributes (position as thirds)."""
    c = ATTRIBUTE_CLASSES
    return torch.tensor(
        [
            [
                c["shape"].index(a.shape),
                c["colour"].index(a.colour),
                c["size"].index(a.size),
                int(a.filled),
                a.count - 1,
                c["background"].index(a.background),
                third(a.x),
                third(a.y),
                c["quality"].index(a.quality),
            ]
            for a in attrs
        ]
    )


class AttributeHead(torch.nn.Module):
    """One linear classifier per attribute on the unit image embedding, trained beside the contrastive loss and
    then dropped: it asks each nameable attribute to be a linear direction of the embedding, which is what a
    user's Bradley-Terry adaptation can move along."""

    def __init__(self, dim: int, cosine_scale: float = 0.0):
        super().__init__()
        self.sizes = [len(v) for v in ATTRIBUTE_CLASSES.values()]
        self.linear = torch.nn.Linear(dim, sum(self.sizes))
        self.cosine_scale = cosine_scale  # > 0: unit class directions at this fixed scale, so the classes must
        # take up the embedding's length rather than a small corner of it

    def logits(self, unit_embeddings: torch.Tensor) -> torch.Tensor:
        if not self.cosine_scale:
            return self.linear(unit_embeddings)
        directions = torch.nn.functional.normalize(self.linear.weight, dim=1)
        return self.cosine_scale * unit_embeddings @ directions.T + self.linear.bias

    def loss(self, unit_embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(unit_embeddings).split(self.sizes, dim=1)
        return sum(torch.nn.functional.cross_entropy(z, targets[:, k]) for k, z in enumerate(logits)) / len(logits)


class FeatureHead(torch.nn.Module):
    """Reads the world's preference features (indexer.world.features, standardised on the training pool) off the
    image embedding along orthonormal directions at one fixed scale, trained beside the contrastive loss and then
    dropped: it asks every feature a simulated user's utility is linear in to be a direction of the embedding, each
    with the same spread, so that an isotropic prior on a user's direction favours none of them."""

    def __init__(self, dim: int, features: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("mean", features.mean(0))
        self.register_buffer("std", features.std(0, unbiased=False).clamp_min(1e-6))
        self.readout = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(dim, features.shape[1]))
        self.scale = scale

    def loss(self, unit_embeddings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the read-out in units of the target spread (0: exact, 1: no better than zero)."""
        standardised = (features - self.mean) / self.std
        return ((self.readout(unit_embeddings) - self.scale * standardised) ** 2).mean() / self.scale**2


def _lr(progress: float, base: float, warmup: float = 0.04) -> float:
    """Linear warm-up over the first `warmup` of training, then cosine decay to zero."""
    if progress < warmup:
        return base * progress / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / (1.0 - warmup))))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on gains, biases, norms, logit_scale), as open_clip's training does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (
            no_decay if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name else decay
        ).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The state dict as safetensors, floating tensors stored as fp16."""
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def train(
    out: Path,
    minutes: float,
    seed: int,
    steps: int | None,
    batch_size: int,
    lr: float,
    pool_size: int,
    hard: float,
    eval_every_s: float,
    p_quality: float = 0.0,
    p_position: float = 0.0,
    hard_shape: float = 0.0,
    init: Path | None = None,
    p_shape_only: float = 0.2,
    p_colour_only: float = 0.05,
    attribute_weight: float = 0.0,
    attribute_cosine_scale: float = 0.0,
    feature_weight: float = 0.0,
    feature_scale: float = 0.17,
) -> dict:
    if seed == HELD_OUT_SEED:
        raise SystemExit(f"--seed {seed} is the held-out world seed; pick another")
    torch.manual_seed(seed)
    register()
    model, _, preprocess = open_clip.create_model_and_transforms(
        DEFAULT_MODEL_NAME, pretrained=str(init) if init else None
    )
    tokenizer = open_clip.get_tokenizer(DEFAULT_MODEL_NAME)
    loss_fn = open_clip.ClipLoss()
    start = time.time()
    pool, attrs = _pool(pool_size, seed, WorldConfig())
    targets = attribute_targets(attrs)
    pool_features = torch.tensor(feature_matrix(attrs), dtype=torch.float32)
    dim = model.text_projection.shape[1]
    head = AttributeHead(dim, attribute_cosine_scale) if attribute_weight else None
    feature_head = FeatureHead(dim, pool_features, feature_scale) if feature_weight else None
    heads = [{"params": h.parameters(), "weight_decay": 0.0} for h in (head, feature_head) if h]
    optimizer = torch.optim.AdamW(_param_groups(model, 0.1) + heads, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    colours = np.array([a.colour for a in attrs])
    same_colour = [np.flatnonzero(colours == c) for c in np.unique(colours)]
    kinds = np.array([f"{a.colour} {a.shape}" for a in attrs])
    same_kind = [g for g in (np.flatnonzero(kinds == k) for k in np.unique(kinds)) if len(g) >= batch_size]
    print(f"pool of {pool_size} images in {time.time() - start:.0f} s", flush=True)
    rng = np.random.default_rng([seed, 1])
    budget = minutes * 60.0
    train_start = last_eval = time.time()
    step = 0
    model.train()
    while True:
        elapsed = time.time() - train_start
        progress = step / steps if steps else elapsed / budget
        if progress >= 1.0 or elapsed >= budget:
            break
        for group in optimizer.param_groups:
            group["lr"] = _lr(progress, lr)
        # A `hard` share of batches hold one colour only, so that captions must be told apart by shape and the rest.
        # A `hard_shape` share hold one colour and one shape, so that quality, position, fill and size must decide.
        r = rng.random()
        if r < hard_shape:
            choices = same_kind[rng.integers(len(same_kind))]
        else:
            choices = same_colour[rng.integers(len(same_colour))] if r < hard_shape + hard else pool_size
        batch = rng.choice(choices, size=batch_size, replace=False)
        texts = tokenizer([caption(attrs[i], rng, p_quality, p_position, p_shape_only, p_colour_only) for i in batch])
        image_features, text_features, logit_scale = model(_normalise(pool[batch]), texts)
        contrastive = loss_fn(image_features, text_features, logit_scale)
        attribute_loss = head.loss(image_features, targets[batch]) if head else torch.zeros(())
        feature_loss = feature_head.loss(image_features, pool_features[batch]) if feature_head else torch.zeros(())
        loss = contrastive + attribute_weight * attribute_loss + feature_weight * feature_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % 25 == 0:
            print(
                f"step {step} {elapsed / 60:5.1f} min loss {contrastive.item():.3f} attributes {attribute_loss.item():.3f} "
                f"features {feature_loss.item():.3f} "
                f"lr {optimizer.param_groups[0]['lr']:.2e} "
                f"scale {model.logit_scale.exp().item():.1f}",
                flush=True,
            )
        if time.time() - last_eval > eval_every_s:
            q = measure(model, preprocess, tokenizer, n_images=400)
            print(
                f"  held-out@400: shape {q.shape_accuracy:.3f} colour {q.colour_accuracy:.3f} p@10 {q.precision_at_10:.3f}",
                flush=True,
            )
            model.train()
            last_eval = time.time()
    train_s = time.time() - train_start
    save_weights(model, out)

    shipped, _, shipped_preprocess = open_clip.create_model_and_transforms(DEFAULT_MODEL_NAME, pretrained=str(out))
    quality = measure(shipped, shipped_preprocess, tokenizer, n_images=2000)
    return {
        "command": "python -m indexer.train_default " + " ".join(sys.argv[1:]),
        "seed": seed,
        "model": DEFAULT_MODEL_NAME,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_mb": round(out.stat().st_size / 1e6, 2),
        "train_wall_s": round(train_s, 1),
        "total_wall_s": round(time.time() - start, 1),
        "steps": step,
        "batch_size": batch_size,
        "images_seen": step * batch_size,
        "pool_size": pool_size,
        "same_colour_batches": hard,
        "same_colour_and_shape_batches": hard_shape,
        "p_quality_caption": p_quality,
        "p_position_caption": p_position,
        "p_shape_only_caption": p_shape_only,
        "p_colour_only_caption": p_colour_only,
        "attribute_weight": attribute_weight,
        "attribute_cosine_scale": attribute_cosine_scale,
        "feature_weight": feature_weight,
        "feature_scale": feature_scale,
        "init": str(init) if init else None,
        "lr": lr,
        "machine": f"CPU only, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, shared with other jobs",
        "held_out": {"world_seed": HELD_OUT_SEED, **quality.to_dict()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the safetensors weights")
    parser.add_argument("--minutes", type=float, default=25.0, help="training wall-time budget")
    parser.add_argument("--seed", type=int, default=0, help="torch seed and world seed of the training images")
    parser.add_argument(
        "--steps", type=int, default=None, help="fixed step count for the schedule (default: follow --minutes)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--pool", type=int, default=50_000, help="training images, generated once (uint8 in memory)")
    parser.add_argument("--hard", type=float, default=0.5, help="share of batches drawn from a single colour")
    parser.add_argument(
        "--hard-shape", type=float, default=0.0, help="share of batches drawn from a single colour and shape"
    )
    parser.add_argument(
        "--p-quality", type=float, default=0.0, help="probability that a caption names the image quality"
    )
    parser.add_argument("--p-position", type=float, default=0.0, help="probability that a caption names the position")
    parser.add_argument("--p-shape-only", type=float, default=0.2, help="share of captions that name only the shape")
    parser.add_argument("--p-colour-only", type=float, default=0.05, help="share of captions that name only the colour")
    parser.add_argument(
        "--attribute-weight",
        type=float,
        default=0.0,
        help="weight of the auxiliary loss of linear attribute classifiers on the image embedding (0: none)",
    )
    parser.add_argument(
        "--attribute-cosine-scale",
        type=float,
        default=0.0,
        help="> 0: the attribute classifiers use unit directions at this fixed scale (0: plain linear)",
    )
    parser.add_argument(
        "--feature-weight",
        type=float,
        default=0.0,
        help="weight of the auxiliary loss that reads the world's preference features off the embedding (0: none)",
    )
    parser.add_argument(
        "--feature-scale",
        type=float,
        default=0.17,
        help="spread of each standardised feature along its direction of the unit embedding",
    )
    parser.add_argument(
        "--init", type=Path, default=None, help="start from these weights (safetensors) instead of random"
    )
    parser.add_argument("--eval-every", type=float, default=300.0, help="seconds between held-out progress checks")
    parser.add_argument("--report", type=Path, default=REPORT, help="where to write the JSON report")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = train(
        args.out,
        args.minutes,
        args.seed,
        args.steps,
        args.batch_size,
        args.lr,
        args.pool,
        args.hard,
        args.eval_every,
        args.p_quality,
        args.p_position,
        args.hard_shape,
        args.init,
        args.p_shape_only,
        args.p_colour_only,
        args.attribute_weight,
        args.attribute_cosine_scale,
        args.feature_weight,
        args.feature_scale,
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
