-- An API key's record (a hash), read as a script so the lookup travels like every other
-- call on the hot path: through the breaker, and under gevent in a shared round trip.
-- KEYS[1] the record's key. Returns the flat field/value list (empty: no such key).
return redis.call('HGETALL', KEYS[1])
