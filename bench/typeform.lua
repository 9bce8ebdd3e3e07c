-- wrk script: POST pre-signed Typeform deliveries, one unique body per request.
-- BENCH_REQUESTS names a file of lines "<signature>\t<body>"; each thread takes its own slice.
local lines = {}
local next_index = 1
local last_index = 0

function setup(thread)
  thread:set("slot", setup_slot or 0)
  setup_slot = (setup_slot or 0) + 1
end

function init(args)
  local path = os.getenv("BENCH_REQUESTS")
  local threads = tonumber(os.getenv("BENCH_THREADS") or "1")
  local all = {}
  for line in io.lines(path) do
    all[#all + 1] = line
  end
  local per = math.floor(#all / threads)
  local first = slot * per + 1
  for i = first, first + per - 1 do
    lines[#lines + 1] = all[i]
  end
  last_index = #lines
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  if next_index > last_index then
    -- Out of unique bodies: stop rather than send duplicates (a cheaper path).
    wrk.thread:stop()
  end
  local line = lines[math.min(next_index, last_index)]
  next_index = next_index + 1
  local tab = string.find(line, "\t", 1, true)
  local headers = { ["Typeform-Signature"] = string.sub(line, 1, tab - 1) }
  return wrk.format(nil, nil, headers, string.sub(line, tab + 1))
end

function done(summary, latency, requests)
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d non2xx=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout, summary.errors.status))
end
