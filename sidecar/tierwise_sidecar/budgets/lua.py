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

-- A lease is two fields of the lease hash, <id>:u and <id>:t: what it holds now. A sidecar's
-- allowance slice is one lease that grants add to and settles take from; a lease is also the
-- only thing a sidecar that died leaves held, and it expires.
-- Amounts reach Redis formatted as integers: Lua's own number formatting (%.14g) would write a
-- large one in exponent notation, which HINCRBY refuses.
local function int(x) return string.format('%d', x) end

local function release(held, leases, lease, id)
  local amt = redis.call('HMGET', lease, id .. ':u', id .. ':t')
  local u, t = tonumber(amt[1]) or 0, tonumber(amt[2]) or 0
  if u ~= 0 then redis.call('HINCRBY', held, 'u', int(-u)) end
  if t ~= 0 then redis.call('HINCRBY', held, 't', int(-t)) end
  redis.call('HDEL', lease, id .. ':u', id .. ':t')
  redis.call('ZREM', leases, id)
end

-- Takes up to (u, t) out of a lease and what the budget holds; a lease emptied is dropped.
local function take_back(held, leases, lease, id, u, t)
  if id == '' then return end
  local amt = redis.call('HMGET', lease, id .. ':u', id .. ':t')
  if not amt[1] and not amt[2] then return end
  local cu, ct = tonumber(amt[1]) or 0, tonumber(amt[2]) or 0
  local du, dt = math.min(tonumber(u), cu), math.min(tonumber(t), ct)
  if du == cu and dt == ct then
    release(held, leases, lease, id)
    return
  end
  if du ~= 0 then
    redis.call('HINCRBY', held, 'u', int(-du))
    redis.call('HINCRBY', lease, id .. ':u', int(-du))
  end
  if dt ~= 0 then
    redis.call('HINCRBY', held, 't', int(-dt))
    redis.call('HINCRBY', lease, id .. ':t', int(-dt))
  end
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

-- A slice may take at most this share of what a budget has left after the request that asks:
-- near the limit slices shrink to nothing and every request is its own round trip.
local SHARE = 8

local function extra(want, cap, committed, ask)
  want = tonumber(want)
  if cap < 0 then return want end
  return math.max(0, math.min(want, math.floor((cap - committed - ask) / SHARE)))
end

-- ARGS: now expires n, then per budget: rolling first cap_u cap_t ask_u ask_t want_u want_t dry
--       throttles lease_id
-- KEYS: per budget: spend held leases lease bucket
-- Holds ask (and, when the budget is not throttled, up to `want` more for the sidecar's slice)
-- under the lease, all budgets or none. Per budget out: code, spent u/t, held u/t, wait, extra u/t.
local function reserve()
  local now, expires, n = tonumber(arg()), arg(), tonumber(arg())
  local out, plans, refused = {1}, {}, false
  for i = 1, n do
    local spend, held, leases, lease, bucket = key(), key(), key(), key(), key()
    local rolling, first = tonumber(arg()), tonumber(arg())
    local cap_u, cap_t = tonumber(arg()), tonumber(arg())
    local ask_u, ask_t, want_u, want_t, dry, spec, id = arg(), arg(), arg(), arg(), arg(), arg(), arg()
    sweep(held, leases, lease, now)
    local su, st = spent(spend, rolling, first)
    local h = redis.call('HMGET', held, 'u', 't')
    local cu, ct = su + (tonumber(h[1]) or 0), st + (tonumber(h[2]) or 0)
    local code, wait, tokens, xu, xt = 0, 0, nil, 0, 0
    if (cap_u >= 0 and cu + tonumber(ask_u) > cap_u) or (cap_t >= 0 and ct + tonumber(ask_t) > cap_t) then
      code = 1
    else
      local rate = rate_at(spec, cu, ct)
      -- A slice's top-up asks nothing for a request of its own: it takes no token.
      local topup = ask_u == '0' and ask_t == '0'
      if rate > 0 and not topup then
        local burst = math.max(1, rate)
        local b = redis.call('HMGET', bucket, 'tokens', 'at')
        local have = burst
        if b[1] then have = math.min(burst, tonumber(b[1]) + math.max(now - tonumber(b[2]), 0) * rate) end
        if have >= 1 then tokens = have - 1 else code, wait, tokens = 2, (1 - have) / rate, have end
      elseif rate == 0 then
        -- A throttled budget's requests each take a token: no slice past its first throttle.
        xu, xt = extra(want_u, cap_u, cu, tonumber(ask_u)), extra(want_t, cap_t, ct, tonumber(ask_t))
      end
    end
    if code ~= 0 then
      if dry ~= '1' then refused = true end
      xu, xt = 0, 0
    end
    plans[i] = {held, leases, lease, bucket, tonumber(ask_u) + xu, tonumber(ask_t) + xt, tokens, code, id}
    for _, v in ipairs({code, su, st, cu - su, ct - st, tostring(wait), xu, xt}) do out[#out + 1] = v end
  end
  if refused then
    out[1] = 0
    return out
  end
  for i = 1, n do
    local p = plans[i]
    local id = p[9]
    if p[5] ~= 0 then
      redis.call('HINCRBY', p[1], 'u', int(p[5]))
      redis.call('HINCRBY', p[3], id .. ':u', int(p[5]))
    end
    if p[6] ~= 0 then
      redis.call('HINCRBY', p[1], 't', int(p[6]))
      redis.call('HINCRBY', p[3], id .. ':t', int(p[6]))
    end
    -- GT: a grant only ever lengthens a slice's lease.
    if p[5] ~= 0 or p[6] ~= 0 then redis.call('ZADD', p[2], 'GT', expires, id) end
    if p[7] and p[8] == 0 then
      redis.call('HSET', p[4], 'tokens', tostring(p[7]), 'at', tostring(now))
      redis.call('EXPIRE', p[4], 3600)
    end
  end
  return out
end

-- ARGS: seq applied_ttl n actual_u actual_t, then per budget: field_prefix spend_ttl lease_id ask_u ask_t
-- KEYS: applied, then per budget: spend held leases lease
-- Counts the actual cost once (a settle sent again is found in the applied bitmap) and gives back
-- what the request held (from its lease: its own, or its sidecar's slice).
local function settle()
  local applied = key()
  local seq, ttl, n, act_u, act_t = arg(), arg(), tonumber(arg()), arg(), arg()
  local dup = redis.call('SETBIT', applied, seq, 1) == 1
  redis.call('EXPIRE', applied, ttl)
  for i = 1, n do
    local spend, held, leases, lease = key(), key(), key(), key()
    local prefix, spend_ttl, id, ask_u, ask_t = arg(), arg(), arg(), arg(), arg()
    if not dup then
      take_back(held, leases, lease, id, ask_u, ask_t)
      if act_u ~= '0' then redis.call('HINCRBY', spend, prefix .. 'u', act_u) end
      if act_t ~= '0' then redis.call('HINCRBY', spend, prefix .. 't', act_t) end
      redis.call('EXPIRE', spend, spend_ttl)
    end
  end
  if dup then return 0 end
  return 1
end

-- ARGS: lease_id amount_u amount_t  KEYS: held leases lease
-- A slice's unused part given back to the budget.
local function give_back()
  local held, leases, lease = key(), key(), key()
  take_back(held, leases, lease, arg(), arg(), arg())
  return 1
end

-- ARGS: n, then per lease: lease_id expires  KEYS: leases (one per lease)
-- Slices in use live on: their leases are lengthened, never shortened; one gone stays gone (XX).
local function renew()
  for i = 1, tonumber(arg()) do
    local leases, id = key(), arg()
    redis.call('ZADD', leases, 'XX', 'GT', arg(), id)
  end
  return 1
end

local OPS = {R = reserve, S = settle, F = give_back, E = renew}
local results = {}
for op = 1, tonumber(ARGV[1]) do
  results[op] = OPS[arg()]()
end
return results
"""
