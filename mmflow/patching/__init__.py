"""Activation patching: corrupted runs and restoring clean states (`analysis=patching`)."""
