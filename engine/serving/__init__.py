"""Serving many requests from one model: per-sequence generation state, OpenAI-shaped results
(``completion``) and the continuous-batching scheduler (``scheduler``) behind ``halfbyte serve``."""
