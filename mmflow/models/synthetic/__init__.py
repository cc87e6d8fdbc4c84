"""Models mmflow builds itself with the real architectures, preprocessing, prompts and vocabularies:
tiny and tiny-series models, shrunk replicas of real checkpoints, and toy-llava (trained here). Loading
real checkpoints is `mmflow.models.registry`'s."""
