-- bench.onboarding (a) driven by wrk (Debian's, LuaJIT): POST /v1/onboardings on an
-- open-loop schedule, each request with its own body (a unique email and tenant name)
-- and a fresh Idempotency-Key, latency counted from the request's DUE time.
--
-- wrk is closed loop: each connection sends, waits for the answer, asks delay(), sends
-- again.  Here delay() turns it into a schedule: request i is due at start + i / rate,
-- and a connection that asks for work claims the next unclaimed index and sleeps until
-- that index is due.  A connection claims only once it is free, so when every
-- connection is busy (a stalled service) the next index is claimed late and sent at
-- once: the lateness is in the latency (measured from the due time, not from the send),
-- so a stall cannot hide its queueing (no coordinated omission).
--
-- The answer is matched to its request by X-Request-ID (the service returns the one it
-- is given): the request's index is its last part.
--
-- Set by bench.onboarding through the environment: BENCH_RATE (requests per second),
-- BENCH_COUNT (requests in all, warm-up first), BENCH_WARMUP_COUNT (the first ones, not
-- counted), BENCH_TAG (in every email, key and request id of the run), BENCH_THREADS
-- (wrk's -t).  done() prints one line, "BENCH_JSON {...}", for bench.onboarding.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("bench_timespec")

-- Seconds on the monotonic clock, which all of wrk's threads share.
local function now()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
    return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end

-- --- setup and done: wrk's main environment --------------------------------------------

local threads = {}
local first_due = nil

function setup(thread)
    -- One start time for every thread, far enough ahead for the connections to open.
    -- (The threads' globals thread_index and start_at are set here.)
    first_due = first_due or now() + 0.5
    table.insert(threads, thread)
    thread:set("thread_index", #threads - 1)
    thread:set("start_at", first_due)
end

local function json_numbers(values)
    local out = {}
    for k = 1, #values do
        out[k] = string.format("%.1f", values[k])
    end
    return "[" .. table.concat(out, ",") .. "]"
end

local function json_counts(counts)
    local out = {}
    for name, n in pairs(counts) do
        out[#out + 1] = string.format("%q:%d", name, n)
    end
    return "{" .. table.concat(out, ",") .. "}"
end

function done(summary, latency, requests)
    local latency_us, lag_us, outcomes, warmup_outcomes = {}, {}, {}, {}
    local sent, warmup_sent, last_done, measured_start = 0, 0, 0, 0
    for _, thread in ipairs(threads) do
        for _, v in ipairs(thread:get("latency_us")) do latency_us[#latency_us + 1] = v end
        for _, v in ipairs(thread:get("lag_us")) do lag_us[#lag_us + 1] = v end
        for name, n in pairs(thread:get("outcomes")) do
            outcomes[name] = (outcomes[name] or 0) + n
        end
        for name, n in pairs(thread:get("warmup_outcomes")) do
            warmup_outcomes[name] = (warmup_outcomes[name] or 0) + n
        end
        sent = sent + thread:get("sent")
        warmup_sent = warmup_sent + thread:get("warmup_sent")
        last_done = math.max(last_done, thread:get("last_done"))
        measured_start = thread:get("measured_start")
    end
    local e = summary.errors
    io.write("BENCH_JSON {",
        string.format('"sent":%d,"warmup_sent":%d,', sent, warmup_sent),
        '"outcomes":', json_counts(outcomes), ",",
        '"warmup_outcomes":', json_counts(warmup_outcomes), ",",
        '"latency_us":', json_numbers(latency_us), ",",
        '"send_lag_us":', json_numbers(lag_us), ",",
        string.format('"window_s":%.6f,', math.max(last_done - measured_start, 0)),
        string.format('"wrk_requests":%d,', summary.requests),
        string.format('"wrk_errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},',
            e.connect, e.read, e.write, e.status, e.timeout),
        -- wrk's own latency: from the request's write, warm-up included (for comparison).
        string.format('"wrk_latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d}',
            latency:percentile(50), latency:percentile(90), latency:percentile(99),
            latency.max),
        "}\n")
end

-- --- the running phase: each thread's own environment -----------------------------------

local rate, count, warmup_count, tag, thread_count
local next_index
local claimed, claimed_head, claimed_tail = {}, 1, 0
local content_type = "application/json"

function init(args)
    rate = tonumber(os.getenv("BENCH_RATE"))
    count = tonumber(os.getenv("BENCH_COUNT"))
    warmup_count = tonumber(os.getenv("BENCH_WARMUP_COUNT"))
    tag = os.getenv("BENCH_TAG")
    thread_count = tonumber(os.getenv("BENCH_THREADS"))
    -- The threads take turns: thread t sends indices t, t + threads, ...
    next_index = thread_index
    -- Read by done() (thread:get): globals.
    latency_us, lag_us, outcomes, warmup_outcomes = {}, {}, {}, {}
    sent, warmup_sent, last_done = 0, 0, 0
    measured_start = start_at + warmup_count / rate
end

local function due(i)
    return start_at + i / rate
end

local function claim()
    local i = next_index
    next_index = i + thread_count
    claimed_tail = claimed_tail + 1
    claimed[claimed_tail] = i
    return i
end

function delay()
    if next_index >= count then
        return 3600000 -- the schedule is over: this connection sends nothing more
    end
    local wait = due(claim()) - now()
    -- Whole milliseconds, rounded up: never early (wrk's timers take milliseconds).
    return wait > 0 and math.ceil(wait * 1000) or 0
end

local function sign_up(id, name)
    local body = string.format(
        '{"email":"%s@example.com","tenant_name":"Bench %s","plan":"free"}', id, name)
    return wrk.format("POST", "/v1/onboardings", {
        ["Content-Type"] = content_type,
        ["Idempotency-Key"] = "key-" .. id,
        ["X-Request-ID"] = id,
    }, body)
end

function request()
    if claimed_head > claimed_tail then
        -- Nothing claimed: wrk's own check of the script, right after init() (it
        -- counts the requests a call returns), which sends nothing.  Were it ever sent,
        -- its answer would show as "no request id".
        return sign_up(tag .. "-check", tag .. " check")
    end
    -- Timers fire in due order (to the millisecond): the oldest claim is this one.
    local i = claimed[claimed_head]
    claimed[claimed_head] = nil
    claimed_head = claimed_head + 1
    if i >= warmup_count then
        sent = sent + 1
        lag_us[#lag_us + 1] = (now() - due(i)) * 1e6
    else
        warmup_sent = warmup_sent + 1
    end
    return sign_up(tag .. "-" .. i, tag .. " " .. i)
end

function response(status, headers, body)
    local t = now()
    local rid = headers["X-Request-ID"] or headers["x-request-id"] or ""
    local i = tonumber(rid:match("%-(%d+)$"))
    if i == nil then
        outcomes["no request id"] = (outcomes["no request id"] or 0) + 1
        return
    end
    local name = tostring(status)
    if i < warmup_count then
        warmup_outcomes[name] = (warmup_outcomes[name] or 0) + 1
        return
    end
    outcomes[name] = (outcomes[name] or 0) + 1
    if status == 202 then
        latency_us[#latency_us + 1] = (t - due(i)) * 1e6
        last_done = math.max(last_done, t)
    end
end
