"""Error types whose messages a person can act on; the CLI prints them without a traceback."""


class XmodalError(Exception):
    """Base class for errors caused by input, configuration or files rather than by a bug."""


class ConfigError(XmodalError, ValueError):
    """A configuration value, key or name is wrong."""


class DataError(XmodalError, ValueError):
    """A data file, record or sample is missing or malformed."""


class CheckpointError(XmodalError, RuntimeError):
    """A checkpoint or cache is missing, corrupt or incompatible with the current run."""
