-- docbot webhook browse flow for wrk: every request POSTs one Telegram Update to the webhook
-- with the secret header, cycling each user through the three browse steps ("My documents"
-- typed, the type's button, a document's button). update_id = base + n * threads + thread, so
-- no two requests of a run (or of later runs: base is the start time in microseconds) share an
-- id and dedupe never short-circuits one.
-- Inputs (environment): DOCBOT_PLAN (file of "telegram_user_id type_id document_id" lines),
-- DOCBOT_SECRET, DOCBOT_UPDATE_BASE, DOCBOT_WRK_THREADS.

local next_thread = 0

function setup(thread)
  thread:set("thread_index", next_thread)
  next_thread = next_thread + 1
end

local plan = {}
for line in io.lines(os.getenv("DOCBOT_PLAN")) do
  local user, type_id, document = line:match("(%d+) (%d+) (%d+)")
  plan[#plan + 1] = { user, type_id, document }
end
local base = tonumber(os.getenv("DOCBOT_UPDATE_BASE"))
local threads = tonumber(os.getenv("DOCBOT_WRK_THREADS"))
local headers = {
  ["Content-Type"] = "application/json",
  ["X-Telegram-Bot-Api-Secret-Token"] = os.getenv("DOCBOT_SECRET"),
}
local n = 0

local BOT = '{"id":700000001,"is_bot":true,"first_name":"Docbot","username":"docbot_test_bot"}'

local function text_update(id, user, now)
  return string.format(
    '{"update_id":%.0f,"message":{"message_id":%d,"date":%d,' ..
    '"chat":{"id":%s,"type":"private"},"from":{"id":%s,"is_bot":false,"first_name":"U"},' ..
    '"text":"My documents"}}',
    id, n + 1, now, user, user)
end

local function callback_update(id, user, data, now)
  return string.format(
    '{"update_id":%.0f,"callback_query":{"id":"cb%.0f","from":{"id":%s,"is_bot":false,' ..
    '"first_name":"U"},"chat_instance":"%s","data":"%s","message":{"message_id":1,' ..
    '"date":%d,"chat":{"id":%s,"type":"private"},"from":' .. BOT .. ',"text":"menu"}}}',
    id, id, user, user, data, now, user)
end

function request()
  local id = base + n * threads + thread_index
  local step = n % 3
  local row = plan[((math.floor(n / 3) * threads + thread_index) % #plan) + 1]
  local now = os.time()
  n = n + 1
  local body
  if step == 0 then
    body = text_update(id, row[1], now)
  elseif step == 1 then
    body = callback_update(id, row[1], "bt:" .. row[2], now)
  else
    body = callback_update(id, row[1], "d:" .. row[3], now)
  end
  return wrk.format("POST", nil, headers, body)
end
