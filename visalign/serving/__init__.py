"""``visalign serve``: scorers behind a small HTTP server (docs/serving.md)."""
