-- wrk script: EMQX-style pipelined hook calls (EMQX's HTTP authn/authz pools pipeline up to
-- `enable_pipelining` requests per connection). Env: DEVICES (file of "username secret" lines),
-- MODE (authn | authz), DEPTH (requests pipelined per connection), TOKEN (hook token).
local devices = {}
denied, answered = 0, 0 -- globals: read per thread in done()
local threads = {}

local function load_devices()
  for line in io.lines(os.getenv("DEVICES")) do
    local username, secret = line:match("^(%S+) (%S+)$")
    devices[#devices + 1] = { username = username, secret = secret }
  end
end

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  load_devices()
  local mode, depth = os.getenv("MODE") or "authz", tonumber(os.getenv("DEPTH") or "16")
  local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. os.getenv("TOKEN") }
  local reqs = {}
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  for i = 1, depth do
    local d = devices[math.random(#devices)]
    local path, body
    if mode == "authn" then
      path = "/broker/emqx5/authn"
      body = string.format('{"clientid":"%s","username":"%s","password":"%s","peerhost":"10.0.0.1"}',
        d.username, d.username, d.secret)
    else
      path = "/broker/emqx5/authz"
      body = string.format('{"clientid":"%s","username":"%s","topic":"upload_data/%s/temperature/m%d","action":"publish","qos":"1","retain":"false"}',
        d.username, d.username, d.username, i)
    end
    reqs[i] = wrk.format("POST", path, headers, body)
  end
  req = table.concat(reqs)
end

function request()
  return req
end

function response(status, headers, body)
  answered = answered + 1
  if status ~= 200 or not body:find('"result":"allow"', 1, true) then
    denied = denied + 1
  end
end

function done(summary, latency, requests)
  local d, a = 0, 0
  for _, t in ipairs(threads) do
    d = d + t:get("denied")
    a = a + t:get("answered")
  end
  io.write(string.format("ANSWERED %d DENIED %d\n", a, d))
end
