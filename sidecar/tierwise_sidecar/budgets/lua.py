"""The server-side script of the Redis budget store (see redis_store.py)."""

# One script runs a whole flush: its settles and its reservations, in the order they were issued
# (KEYS and ARGV consumed op after op). A flush is one command however many requests it carries,
# which is what redis-py's per-command work makes worth it. A settle carries this sidecar's
# instance and a sequence number, kept in a bitmap, so one sent again counts once; a reservation
# holds its budgets' amounts all or nothing.
BATCH = """
local ki, ai = 0, 1
local function key() ki = ki + 1 return KEYS[ki] end
local function arg() ai = ai + 1 return ARGV[ai] end

local function release(held, leases, lease, id)
  local amt = redis.call('HGET', lease, id)
  if amt then
    local u, t = string.match(amt, '^(%d+) (%d+)$')
    if u ~= '0' then redis.call('HINCRBY', held, 'u', '-' .. u) end
    if t ~= '0' then redis.call('HINCRBY', held, 't', '-' .. t) end
    redis.call('HDEL', lease, id)
  end
  redis.call('ZREM', leases, id)
end

local function sweep(held, leases, lease, now)
  for _, lid in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 256)) do
    release(held, leases, lease, lid)
  end
end

local function spent(key, rolling, first)
  if rolling == 0 then
    local v = redis.call('HMGET', key, 'u', 't')
    return tonumber(v[1]) or 0, tonumber(v[2]) or 0
  end
  local all = redis.call('HGETALL', key)
  local u, t = 0, 0
  for i = 1, #all, 2 do
    local b, unit = string.match(all[i], '^(%-?%d+):([ut])$')
    if tonumber(b) < first then
      redis.call('HDEL', key, all[i])
    elseif unit == 'u' then
      u = u + tonumber(all[i + 1])
    else
      t = t + tonumber(all[i + 1])
    end
  end
  return u, t
end

local function rate_at(spec, cu, ct)
  local rate = 0
  for su, st, r in string.gmatch(spec, '(%-?%d+),(%-?%d+),([%d%.]+)') do
    su, st = tonumber(su), tonumber(st)
    if (su >= 0 and cu >= su) or (st >= 0 and ct >= st) then rate = tonumber(r) end
  end
  return rate
end

-- ARGS: now id expires n, then per budget: rolling first cap_u cap_t ask_u ask_t dry throttles
-- KEYS: per budget: spend held leases lease bucket
local function reserve()
  local now, id, expires, n = tonumber(arg()), arg(), arg(), tonumber(arg())
  local out, plans, refused = {1}, {}, false
  for i = 1, n do
    local spend, held, leases, lease, bucket = key(), key(), key(), key(), key()
    local rolling, first = tonumber(arg()), tonumber(arg())
    local cap_u, cap_t = tonumber(arg()), tonumber(arg())
    local ask_u, ask_t, dry, spec = arg(), arg(), arg(), arg()
    sweep(held, leases, lease, now)
    local su, st = spent(spend, rolling, first)
    local h = redis.call('HMGET', held, 'u', 't')
    local cu, ct = su + (tonumber(h[1]) or 0), st + (tonumber(h[2]) or 0)
    local code, wait, tokens = 0, 0, nil
    if (cap_u >= 0 and cu + tonumber(ask_u) > cap_u) or (cap_t >= 0 and ct + tonumber(ask_t) > cap_t) then
      code = 1
    else
      local rate = rate_at(spec, cu, ct)
      if rate > 0 then
        local burst = math.max(1, rate)
        local b = redis.call('HMGET', bucket, 'tokens', 'at')
        local have = burst
        if b[1] then have = math.min(burst, tonumber(b[1]) + math.max(now - tonumber(b[2]), 0) * rate) end
        if have >= 1 then tokens = have - 1 else code, wait, tokens = 2, (1 - have) / rate, have end
      end
    end
    if code ~= 0 and dry ~= '1' then refused = true end
    plans[i] = {held, leases, lease, bucket, ask_u, ask_t, tokens, code}
    for _, v in ipairs({code, su, st, cu - su, ct - st, tostring(wait)}) do out[#out + 1] = v end
  end
  if refused then
    out[1] = 0
    return out
  end
  for i = 1, n do
    local p = plans[i]
    if p[5] ~= '0' then redis.call('HINCRBY', p[1], 'u', p[5]) end
    if p[6] ~= '0' then redis.call('HINCRBY', p[1], 't', p[6]) end
    redis.call('ZADD', p[2], expires, id)
    redis.call('HSET', p[3], id, p[5] .. ' ' .. p[6])
    if p[7] and p[8] == 0 then
      redis.call('HSET', p[4], 'tokens', tostring(p[7]), 'at', tostring(now))
      redis.call('EXPIRE', p[4], 3600)
    end
  end
  return out
end

-- ARGS: seq applied_ttl id n actual_u actual_t, then per budget: field_prefix spend_ttl
-- KEYS: applied, then per budget: spend held leases lease
local function settle()
  local applied = key()
  local seq, ttl, id, n, act_u, act_t = arg(), arg(), arg(), tonumber(arg()), arg(), arg()
  local dup = redis.call('SETBIT', applied, seq, 1) == 1
  redis.call('EXPIRE', applied, ttl)
  for i = 1, n do
    local spend, held, leases, lease = key(), key(), key(), key()
    local prefix, spend_ttl = arg(), arg()
    if not dup then
      if redis.call('ZSCORE', leases, id) then release(held, leases, lease, id) end
      if act_u ~= '0' then redis.call('HINCRBY', spend, prefix .. 'u', act_u) end
      if act_t ~= '0' then redis.call('HINCRBY', spend, prefix .. 't', act_t) end
      redis.call('EXPIRE', spend, spend_ttl)
    end
  end
  if dup then return 0 end
  return 1
end

local results = {}
for op = 1, tonumber(ARGV[1]) do
  if arg() == 'R' then results[op] = reserve() else results[op] = settle() end
end
return results
"""
