"""Dynamo glue: the only package that names torch's or CPython's private internals.

``compat`` reads them; ``patches`` changes torch's state, restorably; ``pgo`` and
``pgo_pickle`` share Dynamo's automatic-dynamic profile, ``inductor`` owns inductor's
on-disk caches, ``ddp`` DDPOptimizer's pieces and ``artifacts`` precompiled artifacts;
``hook``, ``callback`` and ``intercept`` attach dynamo_dist to Dynamo; ``events``
writes into torch's structured trace. Everything above this package
reaches torch's internals through these modules only (``tests/unit/test_rules.py``).
"""
