"""A seeded procedural world: images of shapes with ground-truth attributes, captions, and simulated users."""

import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from storage.errors import ClipbtError
from storage.numeric import logistic

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
COLOURS = {  # name -> base RGB; each image jitters it a little
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 220),
    "blue": (40, 70, 225),
    "purple": (140, 50, 200),
    "pink": (245, 125, 195),
}
SIZES = ("small", "medium", "large")
BACKGROUNDS = {"dark": 35, "gray": 125, "light": 220}  # name -> base grey level
QUALITIES = ("clean", "blur", "noise", "jpeg")  # image degradation kind; captioned only when caption() is asked to
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

_PLURALS = {"cross": "crosses"}
_RADIUS = {"small": (0.12, 0.15), "medium": (0.16, 0.21), "large": (0.26, 0.32)}  # fraction of image side


class WorldError(ClipbtError):
    """A world parameter or labels file is invalid."""


@dataclass(frozen=True)
class WorldConfig:
    """How world images are drawn."""

    image_size: int = 64  # side in pixels, at least 64
    supersample: int = 2  # draw at this multiple of the size, then downsample (anti-aliasing)
    max_count: int = 3  # half the images hold one shape, the rest 2..max_count copies (small or medium only)
    p_degraded: float = 0.5  # probability that an image is blurred, noisy or JPEG-compressed

    def __post_init__(self):
        if self.image_size < 64:
            raise WorldError(f"image_size must be at least 64, got {self.image_size}")
        if not 1 <= self.max_count <= 3:
            raise WorldError(f"max_count must be 1, 2 or 3, got {self.max_count}")


@dataclass(frozen=True)
class Attributes:
    """The ground truth of one world image."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    count: int  # how many copies of the shape (1..3)
    filled: bool  # filled, or drawn as an outline
    background: str  # one of BACKGROUNDS
    x: float  # horizontal centre of the shapes, 0 (left) .. 1 (right)
    y: float  # vertical centre of the shapes, 0 (top) .. 1 (bottom)
    quality: str  # one of QUALITIES
    quality_level: float  # degradation strength 0..1 (0 when clean); never captioned

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Attributes":
        return cls(**d)


def _sample_layout(
    rng: np.random.Generator, config: WorldConfig
) -> tuple[Attributes, list[tuple[float, float, float]]]:
    """Draw attributes and the (cx, cy, radius) of every shape, in pixels of the final image."""
    side = config.image_size
    single = rng.random() < 0.5 or config.max_count == 1
    count = 1 if single else int(rng.integers(2, config.max_count + 1))
    size = SIZES[int(rng.integers(0, 3 if count == 1 else 2))]
    lo, hi = _RADIUS[size]
    radius = float(rng.uniform(lo, hi)) * side
    centres: list[tuple[float, float]] = []
    for _ in range(60 * count):
        if len(centres) == count:
            break
        c = (float(rng.uniform(radius + 1, side - radius - 1)), float(rng.uniform(radius + 1, side - radius - 1)))
        if all(math.hypot(c[0] - o[0], c[1] - o[1]) > 2.1 * radius for o in centres):
            centres.append(c)
    count = len(centres)  # a crowded draw may place fewer shapes; the label says what was drawn
    quality = "clean" if rng.random() >= config.p_degraded else QUALITIES[int(rng.integers(1, len(QUALITIES)))]
    attrs = Attributes(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
        size=size,
        count=count,
        filled=bool(rng.random() < 0.6),
        background=list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
        x=round(sum(c[0] for c in centres) / count / side, 4),
        y=round(sum(c[1] for c in centres) / count / side, 4),
        quality=quality,
        quality_level=0.0 if quality == "clean" else round(float(rng.uniform(0.2, 1.0)), 4),
    )
    return attrs, [(cx, cy, radius) for cx, cy in centres]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius r, rotated by angle (radians)."""
    if shape == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "hexagon":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    elif shape == "star":
        pts = [
            ((r if k % 2 == 0 else 0.42 * r) * math.cos(a), (r if k % 2 == 0 else 0.42 * r) * math.sin(a))
            for k, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))
        ]
    elif shape == "cross":
        t = 0.33 * r
        pts = [
            (t, -r),
            (t, -t),
            (r, -t),
            (r, t),
            (t, t),
            (t, r),
            (-t, r),
            (-t, t),
            (-r, t),
            (-r, -t),
            (-t, -t),
            (-t, -r),
        ]
    else:
        raise WorldError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + px * ca - py * sa, cy + px * sa + py * ca) for px, py in pts]


def _render(
    attrs: Attributes, shapes: list[tuple[float, float, float]], rng: np.random.Generator, config: WorldConfig
) -> Image.Image:
    s = config.supersample
    side = config.image_size * s
    grey = BACKGROUNDS[attrs.background] + int(rng.integers(-15, 16))
    tint = rng.integers(-8, 9, size=3)
    bg = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    fg = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[attrs.colour], rng.integers(-20, 21, size=3)))
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    for cx, cy, r in shapes:
        cx, cy, r = cx * s, cy * s, r * s
        width = max(2 * s, int(r * 0.22))
        fill = fg if attrs.filled else None
        if attrs.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=fg, width=width)
        else:
            angle = float(rng.uniform(-0.25, 0.25))
            draw.polygon(_polygon(attrs.shape, cx, cy, r, angle), fill=fill, outline=fg, width=width)
    if s > 1:
        img = img.resize((config.image_size, config.image_size), Image.Resampling.BOX)
    return _degrade(img, attrs, rng)


def _degrade(img: Image.Image, attrs: Attributes, rng: np.random.Generator) -> Image.Image:
    level = attrs.quality_level
    if attrs.quality == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=0.4 + 1.2 * level))
    if attrs.quality == "noise":
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 5.0 + 25.0 * level, size=(img.height, img.width, 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if attrs.quality == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(round(45 - 40 * level)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def generate_one(index: int, seed: int = 0, config: WorldConfig = WorldConfig()) -> tuple[Image.Image, Attributes]:
    """Image `index` of the world with this seed; it depends only on (seed, index, config)."""
    rng = np.random.default_rng([seed, index])
    attrs, shapes = _sample_layout(rng, config)
    return _render(attrs, shapes, rng, config), attrs


def generate(
    n: int, seed: int = 0, config: WorldConfig = WorldConfig(), start: int = 0
) -> list[tuple[Image.Image, Attributes]]:
    """Images start..start+n-1 of the world with this seed, with their attributes."""
    if n < 0:
        raise WorldError(f"n must be non-negative, got {n}")
    return [generate_one(i, seed, config) for i in range(start, start + n)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


QUALITY_WORDS = {
    "blur": ("blurry", "blurred"),
    "noise": ("noisy", "grainy"),
    "jpeg": ("compressed", "pixelated"),
    "clean": ("sharp", "clean"),
}


def third(v: float) -> int:
    """Which third of the image side a centre coordinate (0..1) falls in: 0, 1 or 2."""
    return 0 if v < 1 / 3 else 2 if v > 2 / 3 else 1


def position_words(attrs: Attributes) -> str:
    """Where the shapes sit, e.g. "top left", "right", "centre": thirds of the image along each axis."""
    vertical = ("top", "", "bottom")[third(attrs.y)]
    horizontal = ("left", "", "right")[third(attrs.x)]
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


def _position_phrase(words: str) -> str:
    """ "on the left", "at the top", "in the top left", "in the centre"."""
    if words in ("left", "right"):
        return f"on the {words}"
    return f"at the {words}" if words in ("top", "bottom") else f"in the {words}"


def caption(
    attrs: Attributes,
    rng: np.random.Generator,
    p_quality: float = 0.0,
    p_position: float = 0.0,
    p_shape_only: float = 0.2,
    p_colour_only: float = 0.05,
) -> str:
    """A caption from varied templates, e.g. "a large red circle on a dark background", "two blue squares".

    Most name colour and shape; a share p_shape_only name only the shape ("a star") and p_colour_only only the
    colour ("a red shape").
    Size, fill, count and background are mentioned sometimes; the image quality ("a blurry ...", "a sharp ...") with
    probability p_quality and the position ("... in the top left") with probability p_position, as real captions
    sometimes do (both 0 by default: the draws of other words do not depend on them).
    """
    r = rng.random()
    colour = f"{attrs.colour} " if r >= p_shape_only else ""
    shape = "shape" if p_shape_only <= r < p_shape_only + p_colour_only else attrs.shape
    size = f"{attrs.size} " if rng.random() < 0.4 else ""
    fill = ("filled " if attrs.filled else str(rng.choice(["outlined ", "hollow "]))) if rng.random() < 0.35 else ""
    bg = f" on a {attrs.background} background" if rng.random() < 0.35 else ""
    quality = f"{rng.choice(QUALITY_WORDS[attrs.quality])} " if p_quality and rng.random() < p_quality else ""
    where = f" {_position_phrase(position_words(attrs))}" if p_position and rng.random() < p_position else ""
    if attrs.count > 1:
        words = f"{COUNT_WORDS[attrs.count]} {quality}{size}{fill}{colour}{_PLURALS.get(shape, shape + 's')}"
        templates = ["{h}{p}", "{h}{p}{bg}", "a picture of {h}{p}{bg}", "{h} together{p}{bg}"]
        head = words
    else:
        words = f"{quality}{size}{fill}{colour}{shape}"
        templates = [
            "{h}{p}",
            "{h}{p}",
            "{h}{p}{bg}",
            "a picture of {h}{p}{bg}",
            "a drawing of {h}{p}{bg}",
            "{w}{p}",
            "one {w}{p}{bg}",
        ]
        head = f"{_article(words)} {words}"
    return str(rng.choice(templates)).format(h=head, w=words, bg=bg, p=where)


LABELS_FILE = "labels.jsonl"


def write_collection(
    folder: str | Path, n: int, seed: int = 0, config: WorldConfig = WorldConfig()
) -> list[tuple[Path, Attributes]]:
    """Write n world images as PNG files into folder, with `labels.jsonl` (one {"file", ...attributes} per line)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with open(folder / LABELS_FILE, "w") as labels:
        for i, (img, attrs) in enumerate(generate(n, seed, config)):
            path = folder / f"world_{seed}_{i:06d}.png"
            img.save(path)
            labels.write(json.dumps({"file": path.name, **attrs.to_dict()}) + "\n")
            out.append((path, attrs))
    return out


def read_collection(folder: str | Path) -> list[tuple[Path, Attributes]]:
    """The (path, attributes) pairs that write_collection wrote into folder."""
    folder = Path(folder)
    labels = folder / LABELS_FILE
    if not labels.is_file():
        raise WorldError(f"no {LABELS_FILE} in {folder}; write one with write_collection")
    out = []
    for line in labels.read_text().splitlines():
        row = json.loads(line)
        out.append((folder / row.pop("file"), Attributes.from_dict(row)))
    return out


FEATURE_NAMES = (
    *(f"shape={s}" for s in SHAPES),
    *(f"colour={c}" for c in COLOURS),
    "size",  # small 0, medium 0.5, large 1
    "filled",
    "count",  # (count - 1) / 2
    *(f"background={b}" for b in BACKGROUNDS),
    "x",  # centred: -0.5 left .. 0.5 right
    "y",  # centred: -0.5 top .. 0.5 bottom
    *(f"degraded={q}" for q in QUALITIES[1:]),  # the degradation level when the image has that kind, else 0
)


def features(attrs: Attributes) -> np.ndarray:
    """The attribute feature vector (len(FEATURE_NAMES),) that simulated users' utilities are linear in."""
    v = np.zeros(len(FEATURE_NAMES))
    v[SHAPES.index(attrs.shape)] = 1.0
    v[len(SHAPES) + list(COLOURS).index(attrs.colour)] = 1.0
    k = len(SHAPES) + len(COLOURS)
    v[k] = SIZES.index(attrs.size) / 2
    v[k + 1] = float(attrs.filled)
    v[k + 2] = (attrs.count - 1) / 2
    v[k + 3 + list(BACKGROUNDS).index(attrs.background)] = 1.0
    k += 3 + len(BACKGROUNDS)
    v[k] = attrs.x - 0.5
    v[k + 1] = attrs.y - 0.5
    if attrs.quality != "clean":
        v[k + 2 + QUALITIES.index(attrs.quality) - 1] = attrs.quality_level
    return v


def feature_matrix(attrs: Sequence[Attributes]) -> np.ndarray:
    """Stacked feature vectors, shape (n, len(FEATURE_NAMES))."""
    return np.stack([features(a) for a in attrs]) if attrs else np.zeros((0, len(FEATURE_NAMES)))


@dataclass(frozen=True, eq=False)
class SimulatedUser:
    """A user with a hidden linear utility over attribute features who answers pairs by the Bradley-Terry model."""

    weights: np.ndarray  # (len(FEATURE_NAMES),) utility weights
    name: str = "user"

    def __post_init__(self):
        if np.shape(self.weights) != (len(FEATURE_NAMES),):
            raise WorldError(f"weights must have shape ({len(FEATURE_NAMES)},), got {np.shape(self.weights)}")

    def utility(self, attrs: Attributes) -> float:
        return float(features(attrs) @ self.weights)

    def utilities(self, attrs: Sequence[Attributes]) -> np.ndarray:
        """Utilities of many images, shape (n,)."""
        return feature_matrix(attrs) @ self.weights

    def probability(self, a: Attributes, b: Attributes) -> float:
        """P(a preferred over b) = sigmoid(u(a) - u(b))."""
        return float(logistic(self.utility(a) - self.utility(b)))

    def prefers(self, a: Attributes, b: Attributes, rng: np.random.Generator) -> bool:
        """A sampled answer to 'a or b?': True when a is preferred."""
        return bool(rng.random() < self.probability(a, b))

    def describe(self, top: int = 4) -> str:
        """The strongest likes and dislikes, e.g. 'likes filled, size; dislikes degraded=blur'."""
        order = np.argsort(-np.abs(self.weights))[:top]
        likes = [FEATURE_NAMES[i] for i in order if self.weights[i] > 0]
        dislikes = [FEATURE_NAMES[i] for i in order if self.weights[i] < 0]
        return "; ".join(
            p
            for p in (
                f"likes {', '.join(likes)}" if likes else "",
                f"dislikes {', '.join(dislikes)}" if dislikes else "",
            )
            if p
        )


def sample_users(n: int, seed: int = 0, strength: float = 3.0) -> list[SimulatedUser]:
    """n users, each caring strongly about 2-4 features (weights of magnitude ~strength) and weakly about the rest."""
    if n < 0:
        raise WorldError(f"n must be non-negative, got {n}")
    rng = np.random.default_rng(seed)
    users = []
    for i in range(n):
        w = rng.normal(0.0, 0.15 * strength, size=len(FEATURE_NAMES))
        strong = rng.choice(len(FEATURE_NAMES), size=int(rng.integers(2, 5)), replace=False)
        w[strong] = rng.choice([-1.0, 1.0], size=len(strong)) * rng.uniform(0.6, 1.0, size=len(strong)) * strength
        users.append(SimulatedUser(weights=w, name=f"user{i}"))
    return users


def bayes_optimal_accuracy(user: SimulatedUser, pairs: Sequence[tuple[Attributes, Attributes]]) -> float:
    """Best expected accuracy of any predictor on these pairs: mean over pairs of max(p, 1 - p), p the true BT probability."""
    if not pairs:
        raise WorldError("bayes_optimal_accuracy needs at least one pair, got 0")
    p = np.array([user.probability(a, b) for a, b in pairs])
    return float(np.mean(np.maximum(p, 1.0 - p)))
