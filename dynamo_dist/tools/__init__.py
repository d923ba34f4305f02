"""Command-line tools: ``dynamo-dist`` (``cli``, ``report``; ``cache_cli`` with ``cache_dir``,
``cache_remove`` and ``cache_init``), ``dynamo-dist-run`` (``launch``)."""
