"""Groups and the per-process runtime: which ranks agree, and the state that joins them.

``group`` resolves ``group=``, ``local`` is ``dynamo_dist.local()``, ``store`` owns the
job's key-value store clients and what may be read back from them, ``runtime`` joins
the exchange and the cache for one process.
"""
