"""The stores wing: where values live. :class:`~kvgevent.stores.base.KVStore` is the interface;
:class:`~kvgevent.stores.memory.MemoryStore` the default; :mod:`~kvgevent.stores.durable` adds
the append-only file (:mod:`~kvgevent.stores.aof`, :mod:`~kvgevent.stores.aof_log`,
:mod:`~kvgevent.stores.rewrite`); :mod:`~kvgevent.stores.redis_store` keeps the data in Redis
(:mod:`~kvgevent.stores.resp`, :mod:`~kvgevent.stores.redis_health`). Stores know nothing of
sockets or of the protocol's text."""
