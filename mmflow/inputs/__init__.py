"""From a sample to what the model reads: the prompt, the processor, the encoded inputs, the token
groups (and their parity modes), the object patches of the question's boxes, images of every mode,
and the hooks that record what decoder layers see."""
