"""Trained reference models (procedural data, configs, fp16 weights, pipeline, training) and ``tokenmerge demo``."""
