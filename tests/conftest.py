"""Shared fixtures: the tiny models (built once into the user's cache) and small synthetic samples."""

from __future__ import annotations

import os

# Every Ray these tests start (test clusters, `ray start`, sweeps in subprocesses) listens on 127.0.0.1:
# Ray's single-machine mode, which must be chosen before Ray is imported (mmflow.sweep.ray_session).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from functools import cache
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from mmflow.data.sample import Box, Sample

ROOT = Path(__file__).resolve().parents[1]


def model_config(name: str, resolve: bool = True) -> dict:
    """conf/model/<name>.yaml as plain data (interpolations left as written with resolve=False)."""
    path = ROOT / "conf" / "model" / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=resolve)


def tiny_tokenizer(name: str):
    """The tokenizer `mmflow.models.synthetic.tiny` builds for the tiny model `name` (corpus built once)."""
    from mmflow.models.synthetic import tiny

    spec = tiny.TINY_SPECS[name]
    return tiny.build_tokenizer(spec.tokenizer_style, spec.vocab_size, list(_tiny_corpus()))


@cache
def _tiny_corpus() -> tuple[str, ...]:
    from mmflow.models.synthetic.tiny import tokenizer_corpus

    return tuple(tokenizer_corpus())


def cell_config(folder: Path, model: str = "tiny-llava", **changes) -> dict:
    """A resolved knockout cell config on shapes data, results and data cache under `folder`."""
    config = {
        "model": model_config(model),
        "data": {"name": "shapes", "seed": 0, "cache_dir": str(folder / "shapes")},
        "knockout": {"name": "image_to_question", "source": "image", "target": "question"},
        "engine": {"name": "reference", "attention": "sdpa"},
        "task": "ChooseAttr",
        "window": 3,
        "n_samples": 2,
        "seed": 0,
        "require_correct": False,
        "max_new_tokens": 2,
        "analysis": "knockout",
        "results_dir": str(folder),
        "logger": {"name": "none"},
    }
    config.update(changes)
    return config


@pytest.fixture(scope="session")
def tiny_llava():
    from mmflow.config.spec import ModelSpec
    from mmflow.models.registry import load_model

    return load_model(ModelSpec.from_mapping(model_config("tiny-llava")))


@pytest.fixture(scope="session")
def tiny_llava_next():
    from mmflow.config.spec import ModelSpec
    from mmflow.models.registry import load_model

    return load_model(ModelSpec.from_mapping(model_config("tiny-llava-next")))


def noise_sample(
    folder: Path,
    rng: np.random.Generator,
    size: tuple[int, int] = (500, 375),
    question: str = "Is the jar full or empty?",
    options: tuple[str, str] | None = ("empty", "full"),
    box: Box | None = None,
) -> Sample:
    """A sample with a random-noise JPEG of `size` and a random box unless one is given."""
    width, height = size
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path = folder / f"noise-{rng.integers(1 << 30)}.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    if box is None:
        w, h = int(rng.integers(20, width // 2)), int(rng.integers(20, height // 2))
        box = Box(float(rng.integers(0, width - w)), float(rng.integers(0, height - h)), float(w), float(h))
    true, false = options if options else (None, None)
    return Sample(
        question_id=path.stem,
        task="ChooseAttr",
        image_path=path,
        question=question,
        answer=true or "yes",
        image_size=size,
        object_names=("jar",),
        object_boxes=(box,),
        true_option=true,
        false_option=false,
    )


LOOPBACK = "127.0.0.1"


def ray_sweep_cmd(results: Path, sweep_dir: Path, address: str, *overrides: str) -> list[str]:
    """`python launch.py -m …` joining the Ray cluster at `address`, logging progress every 2 s."""
    import sys

    return [
        sys.executable,
        "launch.py",
        "-m",
        f"results_dir={results}",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.launcher.ray.init.address={address}",
        "hydra.launcher.progress=log",
        "hydra.launcher.log_every_s=2",
        "logger=none",
        *overrides,
    ]


def add_loopback_node(cluster, **node_args):
    """A worker node of a test cluster, on loopback like its head."""
    return cluster.add_node(**node_args)


@pytest.fixture(scope="module")
def ray_cluster():
    """One Ray cluster per test module (starting one costs seconds); tests may add nodes to it. Per
    module, so that what one module's sweeps leave on it (nodes, actors of a killed driver) cannot
    starve the next module's actors.

    A `ray.cluster_utils.Cluster` on 127.0.0.1 whose head offers 2 logical CPUs; drivers (e.g.
    `launch.py -m` in a subprocess) join it with `hydra.launcher.ray.init.address=<cluster.address>`; add
    nodes with `add_loopback_node`. Shut down at the end.
    """
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(autouse=True)
def _no_hydra_config_left_behind():
    """Each test starts without a Hydra run config: one left by an in-process launch would make
    `to_absolute_path` resolve against that run's working directory in later tests."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
