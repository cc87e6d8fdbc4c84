"""Models: config -> loaded model (`registry`), the paper's prompts, the project's tiny models."""
