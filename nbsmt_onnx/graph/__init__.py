"""Graph passes: rewrite, probe, fold. Passes never call each other; api.py orders them."""
