"""A third-party jepa plugin for 1-D signals: npy source, signal patch tokenizer, span masker."""
