"""clipbt-tiny's text tower in numpy (CLIP's BPE tokenizer and its 3-layer transformer), so a search encodes text without torch or open_clip."""

import gzip
import html
import importlib.util
import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

_LN_EPS = 1e-5  # open_clip's LayerNorm


def _bpe_vocab_path() -> Path:
    """open_clip's bpe_simple_vocab_16e6.txt.gz, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """CLIP's BPE tokenizer as open_clip's SimpleTokenizer (clean 'lower', truncation) builds it, returning numpy ids."""

    def __init__(self, context_length: int):
        import regex

        self.context_length = context_length
        self.byte_encoder = _bytes_to_unicode()
        merges = gzip.open(_bpe_vocab_path()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<start_of_text>", "<end_of_text>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"]
        self.pattern = regex.compile(
            r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    @lru_cache(maxsize=4096)  # noqa: B019  (one tokenizer per process: the cache lives as long as it)
    def _bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            first, second = min(pairs, key=lambda p: self.bpe_ranks.get(p, math.inf))
            if (first, second) not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start and end tokens."""
        if not (text.isascii() and text.isprintable() and "&" not in text):
            # ftfy and HTML unescaping leave printable ASCII without entities as it is: skip importing ftfy then
            import ftfy

            text = html.unescape(html.unescape(ftfy.fix_text(text)))
        text = " ".join(text.strip().split()).lower()
        ids = []
        for token in self.pattern.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[piece] for piece in self._bpe(token)]
        return ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        """int64 (n, context_length): start, ids, end, zero padding; truncated texts end with the end token."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot, *self.encode(text), self.eot][: self.context_length]
            tokens[-1] = self.eot
            out[row, : len(tokens)] = tokens
        return out


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + _LN_EPS) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.2e-7 (Numerical Recipes' erfc Chebyshev fit), as torch's exact GELU needs."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = (
        -z * z
        - 1.26551223
        + t
        * (
            1.00002368
            + t
            * (
                0.37409196
                + t
                * (
                    0.09678418
                    + t
                    * (
                        -0.18628806
                        + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))
                    )
                )
            )
        )
    )
    return np.sign(x) * (1.0 - t * np.exp(poly))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


class NumpyTextEncoder:
    """The text half of an open_clip CLIP with a plain pre-LN text transformer (argmax pooling, linear
    projection, GELU), computed in float32 numpy from its safetensors weights."""

    def __init__(self, config_path: Path, weights_path: Path):
        from safetensors import safe_open

        text_cfg = json.loads(Path(config_path).read_text())["text_cfg"]
        self.heads = int(text_cfg["heads"])
        self.tokenizer = Tokenizer(int(text_cfg["context_length"]))
        with safe_open(str(weights_path), framework="numpy") as f:
            self._token_embedding = f.get_tensor("token_embedding.weight")  # kept float16; rows cast when used
            self._w = {
                key: f.get_tensor(key).astype(np.float32)
                for key in f.keys()
                if not key.startswith(("visual.", "token_embedding.", "logit_scale"))
            }
        self.layers = len({k.split(".")[2] for k in self._w if k.startswith("transformer.resblocks.")})
        n = self.tokenizer.context_length
        self._causal = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
        self.dim = int(self._w["text_projection"].shape[1])

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Unnormalised text features float32 (n, dim), as open_clip's `model.encode_text`."""
        w = self._w
        tokens = self.tokenizer(list(texts))
        x = self._token_embedding[tokens].astype(np.float32) + w["positional_embedding"]
        batch, n, width = x.shape
        head = width // self.heads
        for i in range(self.layers):
            p = f"transformer.resblocks.{i}."
            h = _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
            qkv = h @ w[p + "attn.in_proj_weight"].T + w[p + "attn.in_proj_bias"]
            q, k, v = (part.reshape(batch, n, self.heads, head).transpose(0, 2, 1, 3) for part in np.split(qkv, 3, -1))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head) + self._causal
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attended = (scores / scores.sum(-1, keepdims=True)) @ v
            attended = attended.transpose(0, 2, 1, 3).reshape(batch, n, width)
            x = x + attended @ w[p + "attn.out_proj.weight"].T + w[p + "attn.out_proj.bias"]
            h = _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
            h = _gelu(h @ w[p + "mlp.c_fc.weight"].T + w[p + "mlp.c_fc.bias"])
            x = x + h @ w[p + "mlp.c_proj.weight"].T + w[p + "mlp.c_proj.bias"]
        x = _layer_norm(x, w["ln_final.weight"], w["ln_final.bias"])
        pooled = x[np.arange(batch), tokens.argmax(-1)]
        return (pooled @ w["text_projection"]).astype(np.float32)
