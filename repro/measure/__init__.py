"""Measurements taken on a model during a sequential editing run."""
