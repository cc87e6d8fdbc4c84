"""Maps the top-level `conf/` and `sweeps/` into the package as `mmflow/conf` and `mmflow/sweeps`.

Everything else about the build is in pyproject.toml (their YAML files are its package-data);
setuptools cannot state this mapping there together with package discovery.
"""

from setuptools import find_namespace_packages, setup

MAPPED = {"mmflow.conf": "conf", "mmflow.sweeps": "sweeps"}

FOUND = find_namespace_packages(include=["mmflow*", "hydra_plugins*"], exclude=[q for p in MAPPED for q in (p, f"{p}.*")])

setup(packages=[*FOUND, *MAPPED], package_dir=MAPPED)
