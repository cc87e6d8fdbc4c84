"""`python -m mmflow.models.toy_training train|eval` (see `mmflow.models.toy_training`)."""

from mmflow.models.toy_training.train import main

main()
