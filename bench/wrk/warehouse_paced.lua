-- Paced GETs for wrk (which has no fixed-rate mode): each connection sends one request, waits
-- `delay()`, sends the next, aiming at WH_RATE_PER_CONNECTION requests per second. Each thread
-- counts the requests its connections start per wall-clock second (os.time) and resizes the
-- delay so that delay + the latency it saw equals the per-connection interval; latency spikes
-- therefore shorten the next delays instead of lowering the offered rate.
-- Inputs (environment): WH_PATHS (file of request paths, one a line; picked at random),
-- WH_RATE_PER_CONNECTION, WH_CONNECTIONS_PER_THREAD.

local paths = {}
for line in io.lines(os.getenv("WH_PATHS")) do
  paths[#paths + 1] = line
end
local interval = 1000 / tonumber(os.getenv("WH_RATE_PER_CONNECTION"))
local per_thread = tonumber(os.getenv("WH_CONNECTIONS_PER_THREAD"))
local wait = interval
local second = nil
local started = 0
local whole = false -- the first second is partial: not used to resize the delay

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 1000)
end

function request()
  return wrk.format("GET", paths[math.random(#paths)])
end

function delay()
  local now = os.time()
  if second == nil then
    second = now
  elseif now ~= second then
    if whole and now == second + 1 and started > 0 then
      -- started = per_thread * 1000 / (wait + latency): solve for the latency.
      local latency = per_thread * 1000 / started - wait
      wait = math.max(0, math.min(interval, interval - latency))
    end
    second, started, whole = now, 0, true
  end
  started = started + 1
  return wait
end
