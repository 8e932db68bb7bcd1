-- wrk script: POST one multipart request with N copies of an image to the predict endpoint.
--
--   wrk -c8 -d10s -s bench/predict.lua http://127.0.0.1:8080/api/v1/model/predict -- digit.png 16
--
-- Each copy is a part named image_file, its file name the image's with the copy's number
-- (digit-1.png, digit-2.png, ...) and its type from the extension (PNG, or JPEG for .jpg/.jpeg).
--
-- Prints one JSON line at the end (prefixed "bench-result ") for bench/run.py to read.

local boundary = "----prediction-bench-7d1c3f0a9b"
local threads = {}
non_2xx = 0

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local path, count = args[1], tonumber(args[2] or "1")
   local file = assert(io.open(path, "rb"), "cannot open " .. tostring(path))
   local image = file:read("*a")
   file:close()
   local stem, extension = path:match("([^/]-)%.(%w+)$")
   if not stem then
      stem, extension = path:match("([^/]*)$"), "png"
   end
   local jpeg = extension:lower() == "jpg" or extension:lower() == "jpeg"
   local content_type = jpeg and "image/jpeg" or "image/png"
   local parts = {}
   for i = 1, count do
      parts[#parts + 1] = "--" .. boundary .. "\r\n"
         .. 'Content-Disposition: form-data; name="image_file"; filename="' .. stem .. "-" .. i .. "." .. extension
         .. '"\r\n'
         .. "Content-Type: " .. content_type .. "\r\n\r\n" .. image .. "\r\n"
   end
   parts[#parts + 1] = "--" .. boundary .. "--\r\n"
   wrk.method = "POST"
   wrk.body = table.concat(parts)
   wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non_2xx = non_2xx + 1
   end
end

function done(summary, latency, requests)
   local non2xx = 0
   for _, thread in ipairs(threads) do
      non2xx = non2xx + thread:get("non_2xx")
   end
   local e = summary.errors
   io.write(string.format(
      'bench-result {"requests": %d, "duration_us": %d, "bytes": %d, "non_2xx": %d, '
         .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, '
         .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
      summary.requests, summary.duration, summary.bytes, non2xx,
      e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
