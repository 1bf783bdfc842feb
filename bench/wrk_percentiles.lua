-- wrk script: after the run, print the latency distribution (microseconds) as
-- "pct <percentile> <latency>" lines, for the report's latency plot.
done = function(summary, latency, requests)
  local points = {}
  for p = 1, 99 do points[#points + 1] = p end
  for _, p in ipairs({99.5, 99.9, 99.99}) do points[#points + 1] = p end
  for _, p in ipairs(points) do
    io.write(string.format("pct %g %d\n", p, latency:percentile(p)))
  end
end
