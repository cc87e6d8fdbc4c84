"""Training toy-llava (`mmflow.models.synthetic.toy`) on the synthetic shapes VQA.

Training, in two stages (deterministic for a seed, data-parallel over 2 processes):
1. the vision tower and projector learn per-patch colour, shape, size and column (a stand-in for
   the pretrained CLIP that real LLaVA starts from);
2. everything learns to answer, with cross-entropy on the answer tokens + EOS. Each training image
   carries 12 single-turn questions of the six families, packed into one sequence: every segment
   sees the shared prefix (system prompt, image) and itself only, at the positions a single-turn
   prompt has, so each segment is exactly the analysis's prompt while the image and prefix are
   computed once. Two training-only probes (`GroundingHead`) ask every shape and colour word to carry
   the colour, shape, size and position of the object it names, and the last prompt position to
   collect those of the first and last shape named: they build an image -> question -> last route
   into the toy on purpose.
The patch loss stays on in stage 2. Held-out evaluation uses other data seeds (unseen images and
questions), and the analysis's own generation and answer normalisation.

Modules: `data` (scenes, packed training sequences, probe targets), `probes` (the training-only heads
and the losses), `train` (schedule, data-parallel loop, training record, held-out evaluation, CLI).

    python -m mmflow.models.synthetic.toy_training train [--steps N --out DIR --seed S]  # a folder
    python -m mmflow.models.synthetic.toy_training eval [--path DIR --n N]               # accuracy
"""
