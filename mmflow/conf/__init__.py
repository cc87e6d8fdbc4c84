"""mmflow's Hydra configs: `config.yaml` and its groups (found as `pkg://mmflow.conf`)."""

from mmflow.locks import register_resolvers

register_resolvers()  # `${mmflow.unique_dir:...}` in config.yaml and experiments, before Hydra resolves it
