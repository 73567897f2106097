"""xmodal: cross-modal knowledge distillation toolkit."""

from xmodal.errors import CheckpointError, ConfigError, DataError, XmodalError
from xmodal.features import Features

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "Features", "XmodalError", "__version__"]
