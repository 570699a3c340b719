"""Shared primitives: paths, model loading and architecture specs, hooks, run storage, parameter checking, prompt batching."""
