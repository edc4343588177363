"""Where model weights come from, and one clear error when they cannot be had.

Order: ``Config.weights_dir`` (a local folder, e.g. copied onto a GPU node without internet),
then the Hugging Face cache / hub (``HF_HOME``, ``HF_HUB_OFFLINE`` are honoured by the libraries).
"""

from __future__ import annotations

from pathlib import Path


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights for a component are neither local nor downloadable."""

    def __init__(self, component: str, name: str, cause: BaseException | None = None) -> None:
        self.component = component
        self.name = name
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        super().__init__(
            f"weights for the {component} {name!r} are not available{detail}. "
            f"Download them on a machine with internet: `lregions download --preset <preset>` "
            f"(fills the Hugging Face cache; copy HF_HOME to this machine), or put them in a "
            f"folder and pass `--set weights_dir=/path` (looked up as <weights_dir>/{safe_dirname(name)}). "
            f"To run without weights, use `--preset tiny` (random weights) or `--preset oracle`."
        )


def safe_dirname(name: str) -> str:
    """``org/model`` -> ``org--model``: one folder per model under ``weights_dir``."""
    return name.replace("/", "--").replace(":", "--")


def local_path(weights_dir: str | None, name: str) -> Path | None:
    """The local folder or file for model ``name`` under ``weights_dir``, if it exists."""
    if not weights_dir:
        return None
    candidate = Path(weights_dir).expanduser() / safe_dirname(name)
    return candidate if candidate.exists() else None
