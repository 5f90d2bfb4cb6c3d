"""Small seeded experiments behind the notebooks: each module exposes `run(seed=0, ...) -> dict`."""
