"""The stores: one Redis server, a Cluster or Sentinel, or memory://, picked by the URL's scheme
(storage.py); Redis errors mapped to StoreUnavailable in one place (store.py); the scripts'
calls batched per round trip under gevent; the embedded Valkey for `make run`."""
