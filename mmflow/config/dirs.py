"""Where mmflow's Hydra configs live: `conf/` (config groups) and `sweeps/` (named sweeps).

In a source checkout (or an editable install) they are the repository's top-level folders; an
installed wheel carries them inside the package (`mmflow/conf`, `mmflow/sweeps`, mapped there by
`setup.py`). Either way there is one copy of each file.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # mmflow/


def _located(name: str, marker: str) -> Path:
    """The packaged folder `mmflow/<name>` when it holds `marker`, else the checkout's `<name>/`."""
    packaged = PACKAGE / name
    return packaged if any(packaged.glob(marker)) else PACKAGE.parent / name


CONF_DIR = _located("conf", "config.yaml")
SWEEPS_DIR = _located("sweeps", "*.yaml")


def named_sweeps() -> list[str]:
    """The named sweeps mmflow ships (`mmflow run -cn NAME`)."""
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
