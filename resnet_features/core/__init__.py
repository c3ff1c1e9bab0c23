"""Core: configuration, errors, storage, model specs and weights, heads; no Ray, no job stages."""
