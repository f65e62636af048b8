"""CNNs for 28x28 single-channel characters. Importing the package registers every model."""

from models import mobile, resnet, small_cnn, vgg  # noqa: F401  (registration side effect)
from models.registry import build_model, list_models, model_kwargs, register

__all__ = ["build_model", "list_models", "model_kwargs", "register"]
