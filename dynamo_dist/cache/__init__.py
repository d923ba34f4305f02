"""The shared precompile cache: one rank compiles each graph, the others load it.

Stages, each its own module: ``key`` (what ranks must agree on), ``fs`` (the one
filesystem layer; ``fs_tree`` walks and removes trees on it, ``fs_ops`` counts its
operations), ``secret``, ``entries`` (the entry format and signature), ``verify``
(reading an entry safely), ``archive`` (its tar), ``install`` (into the local inductor
cache), ``store`` (the directory: lookup, publish) and ``refused``, ``lock`` (leader
locks), ``agree`` (all-or-nothing across ranks), ``localdir`` (the private local
inductor directory), ``turn`` (one compile's ticket), ``wait`` (the one wait for a
graph), ``fanout`` (host-local copies), ``directory`` (the shared directory as this
rank finds it), ``lead`` and ``follow`` (a leader's and a follower's work), ``protocol``
(leader and followers), ``rooms`` (clean rooms), ``profile`` (automatic-dynamic
decisions kept across restarts), ``artifact`` and ``precompiled`` (precompiled
modules), ``backend`` (the Dynamo backend) and ``stats``. This package never imports
the exchange.
"""
