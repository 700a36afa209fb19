-- GCRA token bucket, the usual Redis way: one key per bucket holding its TAT (microseconds).
-- KEYS[1] bucket, ARGV[1] emission interval (us), ARGV[2] burst.
local t, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = redis.call('TIME')
now = now[1] * 1000000 + now[2]
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + t
if new_tat - now > t * burst then return 0 end
redis.call('SET', KEYS[1], new_tat, 'PX', math.floor((new_tat - now) / 1000) + 1)
return 1
