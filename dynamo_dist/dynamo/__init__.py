"""Dynamo glue: the only package that names torch's or CPython's private internals.

``compat`` reads them; ``hook``, ``callback`` and ``intercept`` attach dynamo_dist to
Dynamo; ``events`` writes into torch's structured trace. Everything above this package
reaches torch's internals through these modules only (``tests/unit/test_rules.py``).
"""
