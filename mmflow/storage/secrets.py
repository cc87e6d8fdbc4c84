"""Secrets never reach a file mmflow writes: redaction of configs, overrides and Hydra's saved files.

Values of environment variables (any `env_vars` mapping, e.g. `ray.runtime_env.env_vars`) and values
of keys named like secrets (`HF_TOKEN`, `WANDB_API_KEY`, `password`, ...) are replaced by `REDACTED`
in `cell.json`, W&B configs, `sweep.json`, `multirun.yaml` and Hydra's `.hydra/*.yaml`. The command
line is redacted in place once Hydra has parsed it (`redact_argv`), since W&B saves `sys.argv` in its
run files and Ray its driver's command line. The `runtime_env.env_vars` of a local Ray reach the
workers through the environment Ray inherits (`env_vars_to_environ`), not through Ray's runtime_env,
whose values Ray writes to its logs (docs/faults.md, "Secrets").
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REDACTED = "<redacted>"
ENV_VARS_KEY = "env_vars"
_SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "credential", "credentials", "apikey"})
_KEY_QUALIFIERS = frozenset({"api", "access", "private", "secret"})


def is_secret_name(name: str) -> bool:
    """True for names such as HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, db.password.

    Word-based, so `max_new_tokens` or `batch_key` are not secrets.
    """
    words = [w for w in re.split(r"[^a-z0-9]+", str(name).lower()) if w]
    if _SECRET_WORDS.intersection(words):
        return True
    return any(w == "key" and i > 0 and words[i - 1] in _KEY_QUALIFIERS for i, w in enumerate(words))


def redact(value: Any, _key: str = "") -> Any:
    """A copy of `value` (mappings, lists, strings) with every secret value replaced by `REDACTED`.

    Strings of the form `key=value` (Hydra overrides) are redacted when `key` holds a secret.
    """
    if isinstance(value, Mapping):
        if _key == ENV_VARS_KEY:
            return {k: REDACTED for k in value}
        return {k: _redact_item(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_override(value)
    return value


def _redact_item(key: str, value: Any) -> Any:
    if is_secret_name(key) and value not in (None, "", {}, []) and not isinstance(value, Mapping | list):
        return REDACTED
    return redact(value, key)


def redact_override(text: str) -> str:
    """`+ray.runtime_env.env_vars.HF_TOKEN=abc` -> `+ray.runtime_env.env_vars.HF_TOKEN=<redacted>`."""
    key, sep, value = text.partition("=")
    if not sep or not value or any(c in key for c in " \n{}[]"):
        return text
    parts = key.lstrip("+~").split(".")
    if ENV_VARS_KEY in parts[:-1] or is_secret_name(parts[-1]):
        return f"{key}={REDACTED}"
    if parts[-1] == ENV_VARS_KEY:  # a whole mapping given at once: `...env_vars={A: x}`
        return f"{key}={REDACTED}"
    return text


def redact_yaml_file(path: Path) -> bool:
    """Rewrite a saved YAML config (Hydra's config.yaml, overrides.yaml, multirun.yaml) redacted.

    Returns True when something was replaced. Interpolations are kept as written (not resolved).
    """
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        log.warning("cannot check %s for secrets: %s", path, exc)
        return False
    clean = redact(data)
    if clean == data:
        return False
    from mmflow.storage.files import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(clean, sort_keys=False, allow_unicode=True).encode())
    return True


def redact_hydra_files(folder: Path) -> list[Path]:
    """Redact `multirun.yaml` and every `.hydra/*.yaml` at or below `folder`; the files changed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates: Iterable[Path] = [*folder.glob("multirun.yaml"), *folder.glob("**/.hydra/*.yaml")]
    return [p for p in candidates if redact_yaml_file(p)]


def forwarded_env(names: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `ray.forward_env` to copy into a Ray runtime_env, secrets left out.

    Ray writes runtime_env values to its own logs, so secret-named variables (HF_TOKEN, ...) are never
    forwarded: export them where the Ray workers start (docs/running.md, "Secrets").
    """
    out = {}
    for name in names:
        if name not in environ:
            continue
        if is_secret_name(name):
            log.warning(
                "ray.forward_env: not forwarding %s (Ray would log its value); export it in the "
                "environment of the driver (local Ray) or of `ray start` on each node instead",
                name,
            )
            continue
        out[name] = environ[name]
    return out


def warn_runtime_env_secrets(runtime_env: Mapping[str, Any]) -> None:
    """Warn that values given in `ray.runtime_env.env_vars` are visible in Ray's own logs."""
    names = sorted((runtime_env or {}).get(ENV_VARS_KEY) or {})
    if names:
        log.warning(
            "ray.runtime_env.env_vars (%s): Ray prints runtime_env values in its agent logs; mmflow "
            "redacts them in its own files only. Pass secrets through the environment instead.",
            ", ".join(names),
        )


def redact_argv(argv: list[str] | None = None) -> list[str]:
    """Redact secret overrides in `argv` (default `sys.argv`) in place; call once Hydra has parsed it.

    W&B saves the program's arguments in its run files and Ray records its driver's command line.
    """
    argv = sys.argv if argv is None else argv
    argv[:] = [redact_override(a) for a in argv]
    return argv


@contextmanager
def redacted_argv() -> Iterator[None]:
    """`sys.argv` redacted for the duration (for `wandb.init`, which records it)."""
    saved = list(sys.argv)
    redact_argv()
    try:
        yield
    finally:
        sys.argv[:] = saved


@contextmanager
def env_vars_to_environ(runtime_env: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Move the `env_vars` of a *local* Ray's runtime_env into this process's environment.

    A local Ray (and every worker it starts) inherits the driver's environment, so the actors see the
    variables while Ray's runtime_env agent, which logs runtime_env values, never gets them (mmflow
    treats every `env_vars` value as a secret, as `redact` does). Yields the runtime_env without
    them; the environment is restored on exit.
    """
    moved = {str(k): str(v) for k, v in (runtime_env.get(ENV_VARS_KEY) or {}).items()}
    clean = {k: v for k, v in runtime_env.items() if k != ENV_VARS_KEY}
    saved = {k: os.environ.get(k) for k in moved}
    os.environ.update(moved)
    if moved:
        names = ", ".join(sorted(moved))
        log.info("Ray: %s passed to the local Ray through its environment, not runtime_env", names)
    try:
        yield clean
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
