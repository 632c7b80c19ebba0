-- Production-shaped traffic for bench/bench_http.py (wrk 4, LuaJIT).
--
--   wrk -t1 -c32 -d5s --latency -s bench/production.lua http://127.0.0.1:PORT/hello \
--       -- [seed] [ips] [keys] [users]          (defaults: 1 10000 1000 5000)
--
-- Every request is GET <the URL's path> and carries three headers:
--
--   X-Forwarded-For: one of `ips` client addresses, 198.18.<i // 256>.<i % 256>
--                    (198.18.0.0/15 is reserved for benchmarking, RFC 2544)
--   X-API-Key:       one of `keys` keys, bk_<10 digits><4 digits>
--   X-User:          one of `users` users, user-<5 digits>
--
-- bench_http.py builds the same values for its pre-flight (production_headers()): keep the
-- two in step.
--
-- Values are pseudo-random but deterministic: each pool is a deck, shuffled with LuaJIT's
-- seeded PRNG and dealt one value per request; when a deck runs out it is shuffled again. So
-- every `ips` requests use every address exactly once (every `keys` requests every key, ...),
-- in an order that changes from pass to pass, and which addresses, keys and users meet in one
-- request keeps changing too (the three decks have different sizes and are reshuffled on their
-- own). Each wrk thread seeds with seed + its number, and every wrk run with the same
-- arguments sends the same sequence.
--
-- Requests are built from pre-made header lines, and there is no response() function (wrk
-- then skips parsing responses), so the script costs wrk little.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("thread_number", #threads)
end

local function ip_of(i)
   return string.format("198.18.%d.%d", math.floor(i / 256), i % 256)
end

local function key_of(i)
   -- Knuth's multiplicative hash spreads the digits; the index keeps keys distinct.
   return string.format("bk_%010d%04d", (i * 2654435761) % 4294967296, i)
end

local function user_of(i)
   return string.format("user-%05d", i)
end

local function new_deck(name, size, make)
   local lines, order = {}, {}
   for i = 1, size do
      lines[i] = name .. ": " .. make(i - 1) .. "\r\n"
      order[i] = i
   end
   return { lines = lines, order = order, size = size, next = size + 1 }
end

local function shuffle(order, size)
   for i = size, 2, -1 do
      local j = math.random(i)
      order[i], order[j] = order[j], order[i]
   end
end

local function deal(deck)
   local n = deck.next
   if n > deck.size then
      shuffle(deck.order, deck.size)
      n = 1
   end
   deck.next = n + 1
   return deck.lines[deck.order[n]]
end

local function count(text, default)
   local n = tonumber(text)
   if n == nil then
      return default
   end
   return math.floor(n)
end

local ips, keys, users, prefix

function init(args)
   seed = count(args[1], 1)
   n_ips, n_keys, n_users = count(args[2], 10000), count(args[3], 1000), count(args[4], 5000)
   math.randomseed(seed + (thread_number or 1))
   ips = new_deck("X-Forwarded-For", n_ips, ip_of)
   keys = new_deck("X-API-Key", n_keys, key_of)
   users = new_deck("X-User", n_users, user_of)
   -- wrk.init has set the Host header (host:port) before calling this init.
   prefix = string.format("%s %s HTTP/1.1\r\nHost: %s\r\n", wrk.method, wrk.path, wrk.headers["Host"])
   requests = 0
end

function request()
   requests = requests + 1
   return prefix .. deal(ips) .. deal(keys) .. deal(users) .. "\r\n"
end

-- One line for bench_http.py: what was sent, and how many distinct values of each pool (every
-- request deals one value of each deck, so a thread has used min(requests, pool) of them).
function done(summary, latency, requests_done)
   local sent, least = 0, nil
   local n = { ips = 0, keys = 0, users = 0 }
   for _, thread in ipairs(threads) do
      local made = thread:get("requests") or 0
      sent = sent + made
      least = math.min(least or made, made)
      n.ips, n.keys, n.users = thread:get("n_ips"), thread:get("n_keys"), thread:get("n_users")
      n.seed = thread:get("seed")
   end
   least = least or 0
   io.write(string.format(
      "production.lua: %d requests made (seed %d); distinct per thread: %d/%d X-Forwarded-For, "
         .. "%d/%d X-API-Key, %d/%d X-User\n",
      sent, n.seed or 0, math.min(least, n.ips), n.ips, math.min(least, n.keys), n.keys,
      math.min(least, n.users), n.users))
end
