"""Past one process: replicas behind Ray Serve (replicas.py), a model split into pipeline stages (pipeline.py)."""
