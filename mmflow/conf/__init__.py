"""mmflow's Hydra configs: `config.yaml` and its groups (found as `pkg://mmflow.conf`)."""
