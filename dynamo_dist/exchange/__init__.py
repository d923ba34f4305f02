"""The guard exchange: every rank of a group learns every other rank's guard verdict.

The record format (``record``), AND-reducing one word over gloo (``allreduce``), the
gloo transport and its diagnostics (``collective``), shared memory within a host
(``shm``), what a mixed verdict does (``policy``), automatic-dynamic agreement
(``consensus``), the status board (``status``) and the counters (``stats``). This
package never imports the cache, nor the cache this one.
"""
