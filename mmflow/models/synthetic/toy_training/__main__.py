"""`python -m mmflow.models.synthetic.toy_training train|eval` (`mmflow.models.synthetic.toy_training`)."""

from mmflow.models.synthetic.toy_training.train import main

main()
