"""Analyses: what is computed from a clean pass and an engine (knockout curves, answer tracking)."""
