"""Pretrained open_clip weights from the Hugging Face hub: the local cache first, a bounded reachability check, one clear error offline."""

import os
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 5.0  # how long the hub may take to answer before it counts as unreachable


@dataclass(frozen=True)
class HubWeights:
    """Where open_clip looks for one (model, tag)'s weights on the hub."""

    model: str
    tag: str
    repo_id: str  # e.g. laion/CLIP-ViT-B-32-laion2B-s34B-b79K
    filenames: tuple[str, ...]  # the files open_clip tries, safetensors first


def hub_weights(model: str, tag: str) -> HubWeights | None:
    """The hub repository and files of an open_clip pretrained tag; None when the tag is not on the hub."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg or not cfg.get("hf_hub") or not open_clip.pretrained.has_hf_hub():
        return None
    repo_id, filename = os.path.split(cfg["hf_hub"])
    filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
    alternatives = tuple(open_clip.pretrained._get_safe_alternatives(filename))
    return HubWeights(model, tag, repo_id, (*alternatives, filename))


def cached_file(weights: HubWeights) -> str | None:
    """The path of the weights in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in weights.filenames:
        found = try_to_load_from_cache(weights.repo_id, filename)
        if isinstance(found, str):
            return found
    return None


def cache_folder() -> str:
    """The Hugging Face hub cache folder ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def unreachable_reason(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used now (offline mode set, or no answer within `timeout_s`), or None if it answers.

    Any HTTP answer counts as reachable. The probe runs in a daemon thread so that a name lookup
    that hangs cannot hold the caller past the bound.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    outcome: list[str | None] = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # the server answered
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            outcome.append(f"{urlsplit(endpoint).netloc or endpoint} did not answer ({reason})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return outcome[0] if outcome else f"{urlsplit(endpoint).netloc} did not answer within {timeout_s:.0f} s"


def offline_message(weights: HubWeights, reason: str) -> str:
    """The one message for weights that are neither cached nor downloadable: what, where, and the ways out."""
    return (
        f"cannot load weights for model {weights.model!r} pretrained {weights.tag!r}: they are not in the "
        f"local cache ({cache_folder()}) and the hub cannot be used: {reason}. On a machine with network, "
        f'fetch them with `python -c "import open_clip; open_clip.create_model_and_transforms('
        f"'{weights.model}', pretrained='{weights.tag}')\"` (repository {weights.repo_id}) and copy that "
        "cache folder here (or point HF_HUB_CACHE at it); HF_HUB_OFFLINE=1 makes clipbt use the cache "
        "without trying the network. Offline right now: --pretrained PATH to a checkpoint file you have, or "
        "--model clipbt-tiny, the shipped model (it knows only clipbt's generated world of shapes, not photos)"
    )


@contextmanager
def offline():
    """Within the block, huggingface_hub answers from its cache without any request (the weights are there)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
