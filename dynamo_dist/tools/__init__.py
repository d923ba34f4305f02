"""Command-line tools: ``dynamo-dist`` (``cli``, ``cache_cli``, ``report``), ``dynamo-dist-run``
(``launch``)."""
