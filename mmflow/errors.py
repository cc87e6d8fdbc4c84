"""mmflow's error types, in one place.

Two kinds matter to a sweep (docs/faults.md): a per-sample skip (`SampleSkip`: the row's own content
cannot be scored; recorded with its reason, final) and everything else (an error: code, config or
environment; the cell is not done and is computed again on the next run).
"""

from __future__ import annotations

from typing import Any

UNSUPPORTED_IMAGE_MODE = "unsupported_image_mode"


class SampleSkip(ValueError):
    """One sample cannot be scored for one cell because of its own content; `reason` is the recorded
    skip reason (`samples.parquet` `skip_reason`), `detail` the human-readable why (`skip_detail`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class GroupError(SampleSkip):
    """A token group could not be built for a sample (e.g. `empty_group`): a `SampleSkip`."""


class ImageModeError(ValueError):
    """An image whose mode mmflow cannot turn into RGB faithfully (the sample's skip reason)."""

    reason = UNSUPPORTED_IMAGE_MODE


class CellConfigError(ValueError):
    """A cell config that cannot compute anything meaningful; the message names the key and what it
    allows, never a secret's value."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        from mmflow.storage.secrets import redact

        name = key.rsplit(".", 1)[-1]
        shown = redact({name: value})[name]  # never echo a token, nor one inside a mapping
        super().__init__(f"{key}={shown!r}: {allowed}")
        self.key = key


class PathConfigError(ValueError):
    """A path key that names an environment variable that is not set."""


class DataError(ValueError):
    """A whole-file or configuration problem of a data source: nothing in the file can be used."""


class TokenizationError(ValueError):
    """The checkpoint's tokenizer cannot give the token ids the original code gives (a config problem)."""


class ConfigError(SystemExit):
    """A config the run cannot start with: `cli.run_hydra` prints `message` and exits with 2.

    A SystemExit, so that neither OmegaConf nor Hydra wraps it into a long traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message
