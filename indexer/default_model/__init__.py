"""The model clipbt ships: `clipbt-tiny`, an open_clip config and weights trained on the generated world."""

from pathlib import Path

DEFAULT_MODEL_NAME = "clipbt-tiny"  # also indexer.encoder.SHIPPED_MODEL
_HERE = Path(__file__).resolve().parent


def config_path() -> Path:
    """The open_clip model config JSON of the default model."""
    return _HERE / f"{DEFAULT_MODEL_NAME}.json"


def weights_path() -> Path:
    """The committed safetensors weights of the default model."""
    return _HERE / f"{DEFAULT_MODEL_NAME}.safetensors"


def register() -> None:
    """Make `clipbt-tiny` known to open_clip by name (create_model_and_transforms, get_tokenizer); idempotent."""
    import open_clip

    if DEFAULT_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(config_path())


def load_default_model(device: str = "cpu"):
    """(model, preprocess, tokenizer) of the shipped model, in eval mode, loaded from disk only."""
    import open_clip

    register()
    model, _, preprocess = open_clip.create_model_and_transforms(
        DEFAULT_MODEL_NAME, pretrained=str(weights_path()), device=device
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(DEFAULT_MODEL_NAME)


def load_text_encoder():
    """The shipped model's text tower in numpy (`text.NumpyTextEncoder`): no torch, no open_clip import."""
    from indexer.default_model.text import NumpyTextEncoder

    return NumpyTextEncoder(config_path(), weights_path())
