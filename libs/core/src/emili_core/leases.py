"""Redis leases held by one owner at a time (the loop's instance lease, the gateway's canary-monitor lock): Lua
scripts, so that each check and its write are one atomic step."""

from __future__ import annotations

# Take a free lease or renew one's own (KEYS[1]; ARGV: owner, TTL in ms), atomically: between a separate read and
# renewal the lease could lapse and go to another owner, whose lease the renewal would then extend. 1 when held.
TAKE_OR_RENEW = """
local holder = redis.call('GET', KEYS[1])
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
# Delete the lease only when its holder is the caller (ARGV[1]), atomically: a lapsed lease may have a new holder.
RELEASE_IF_HELD = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
