"""What a store's failure looks like to everyone above stores/: one exception, raised from the
errors caught here."""

from __future__ import annotations

import redis
from redis.exceptions import RedisClusterException

# redis-py's Cluster client raises RedisClusterException, which is not a RedisError, when no
# node answers at all.
STORE_ERRORS_CAUGHT = (redis.RedisError, RedisClusterException)


class StoreUnavailable(Exception):
    """The store did not answer in time or at all; the layer's failure policy decides."""
