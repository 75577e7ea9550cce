-- wrk script for the router-overhead benchmark: non-streaming POST /v1/chat/completions.
-- Prints one machine-readable line, "WRK_JSON {...}", that benchmarks/router_overhead.py reads.
-- Latencies are in microseconds, duration in microseconds.

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"fast-backend","messages":[{"role":"user","content":"Say hello."}],'
    .. '"max_tokens":16,"stream":false}'

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
            .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
            .. '"latency_us":{"min":%d,"mean":%.2f,"stdev":%.2f,"max":%d,'
            .. '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
        summary.requests, summary.duration, summary.bytes,
        e.connect, e.read, e.write, e.status, e.timeout,
        latency.min, latency.mean, latency.stdev, latency.max,
        latency:percentile(50), latency:percentile(90), latency:percentile(99),
        latency:percentile(99.9)))
end
