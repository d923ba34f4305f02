"""The one version of dynamo_dist.

Read by packaging (``[tool.setuptools.dynamic]``, statically, without importing the
package), compiled into the extension by setup.py (so a stale in-tree ``_C`` is
caught at import), and part of every shared-cache key.
"""

__version__ = "0.4.0"
