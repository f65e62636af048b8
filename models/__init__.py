"""CNNs for 28x28 single-channel characters. Importing the package registers every model."""

from models import mobile, resnet, small_cnn, vgg  # noqa: F401  (registration side effect)
from models.registry import (
    Range,
    build_model,
    builder,
    list_models,
    model_defaults,
    model_keywords,
    model_kwargs,
    register,
    size_ranges,
    unregister,
    widest_ranges,
)

__all__ = ["Range", "build_model", "builder", "list_models", "model_defaults", "model_keywords", "model_kwargs",
           "register", "size_ranges", "unregister", "widest_ranges"]
