-- wrk script: each connection waits `PACE_MS` (environment) between its requests, so a
-- run holds a chosen rate instead of the most the server can take; prints the latency
-- distribution like wrk_percentiles.lua.
local pace = tonumber(os.getenv("PACE_MS") or "0")
delay = function()
  return pace
end
done = function(summary, latency, requests)
  for _, p in ipairs({50, 90, 99, 99.9}) do
    io.write(string.format("pct %g %d\n", p, latency:percentile(p)))
  end
  io.write(string.format("errors connect %d read %d write %d timeout %d status %d\n",
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout, summary.errors.status))
end
