-- POST /api/betting/bet, every bet on one event (BETTING_EVENT_ID), 10.00 each; the token
-- rotates per request over BETTING_TOKENS (comma-separated, one user each), as 16 users would.
local tokens = {}
for token in string.gmatch(os.getenv("BETTING_TOKENS") or "", "[^,]+") do
  tokens[#tokens + 1] = "Token " .. token
end
assert(#tokens > 0, "BETTING_TOKENS is empty")
local body = string.format('{"event_id": "%s", "amount": "10.00"}', os.getenv("BETTING_EVENT_ID"))
local counter = 0

request = function()
  counter = counter + 1
  local headers = {
    ["Authorization"] = tokens[counter % #tokens + 1],
    ["Content-Type"] = "application/json",
  }
  return wrk.format("POST", "/api/betting/bet", headers, body)
end
