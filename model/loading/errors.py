"""The one error every loader raises for a file it cannot trust."""

from __future__ import annotations

from pathlib import Path

from model.config import ConfigError


class ModelFileError(ValueError):
    """A model file (or checkpoint directory) that is malformed or does not fit the model.

    ``path`` is the offending file; ``key`` the metadata key or tensor name at
    fault, when there is one. Both appear in the message.
    """

    def __init__(self, path: str | Path, message: str, key: str | None = None) -> None:
        self.path = Path(path)
        self.key = key
        where = f"{self.path}" if key is None else f"{self.path} [{key}]"
        super().__init__(f"{where}: {message}")


class ModelConfigFileError(ModelFileError, ConfigError):
    """A file whose configuration (config.json, GGUF metadata) describes no valid model.

    Both a ``ModelFileError`` (the file is at fault) and a ``ConfigError``.
    """
