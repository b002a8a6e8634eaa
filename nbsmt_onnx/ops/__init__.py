"""The NB-SMT custom operators: schema (single source of truth) and NumPy reference."""
