"""The shared precompile cache: one rank compiles each graph, the others load it.

Stages, each its own module: ``key`` (what ranks must agree on), ``fs`` (the one
filesystem layer), ``secret`` and ``store`` (signed, verified entries), ``lock``
(leader locks), ``agree`` (all-or-nothing across ranks), ``protocol`` (leader and
followers), ``rooms`` (clean rooms), ``profile`` (automatic-dynamic decisions kept
across restarts), ``artifact`` and ``precompiled`` (precompiled modules), ``backend``
(the Dynamo backend) and ``stats``. This package never imports the exchange.
"""
