//! Server-side Lua scripts. Each runs atomically in Redis.
//!
//! A channel's state is the hash `meta`: `e` epoch, `o` last offset, `g` generation (the first part of
//! its history entries' IDs, `<g>-<offset>`, one more for each epoch), `r` the replication ID of the
//! primary that assigned the last offset, `b` bytes of envelopes in history, and after a fence `pe`: the
//! epoch it replaced.
//!
//! **Fencing.** Both scripts compare `r` with the replication ID the node read on its connection (one
//! field of the hash they read anyway). A different ID means the data was written under another history
//! of the primary (it restarted, possibly from an older snapshot, or a replica that may have lagged took
//! over): positions after what survived may have been seen by clients with other contents, so they are
//! never reused. The channel moves to a new epoch, and clients of the old epoch get a reset
//! (`engine_rollback`): publications acknowledged after what survived are gone, and nothing tells which.
//! The new epoch records the old one (`pe`), so that a client returning with a position in it is told
//! why. The old epoch's entries stay in the stream (other generation) until trimmed or expired.
//!
//! In a Redis Cluster the node cannot know which server a script will run on (the cluster client
//! follows redirections), so it passes `*` instead of an ID and the script reads the ID of the server
//! it runs on (`INFO replication`, once per call): each shard's channels are fenced by their own
//! primary's history. Fan-out there uses sharded pub/sub (`SPUBLISH`), whose channel carries the same
//! hash tag as the channel's keys, so a publication passes only through its shard.

/// Shared by the scripts: moves a channel to a new epoch recording the old one. Returns the new epoch,
/// offset (0), generation and 1.
const FENCE: &str = r#"
-- '*': the replication ID of the server running this script (Redis Cluster), read once per call.
local running_replid = nil
local function own_replid(replid)
  if replid ~= '*' then return replid end
  if not running_replid then
    running_replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
  end
  return running_replid
end

local function fence(meta, stream, epoch, gen, fresh, replid)
  if gen == nil then
    -- History written before generations existed cannot be continued.
    redis.call('DEL', stream)
    redis.call('HDEL', meta, 'pe')
    redis.call('HSET', meta, 'e', fresh, 'o', 0, 'g', 0, 'r', replid, 'b', 0)
    return fresh, 0, 0, 1
  end
  redis.call('HSET', meta, 'e', fresh, 'o', 0, 'g', gen + 1, 'r', replid, 'pe', epoch)
  return fresh, 0, gen + 1, 1
end

-- Returns epoch, offset, generation, bytes, fenced, and when the keys' expiry was last pushed back
-- (`x`, ms; nil for a channel just made).
local function state(meta, stream, fresh, replid)
  replid = own_replid(replid)
  local m = redis.call('HMGET', meta, 'e', 'o', 'g', 'r', 'b', 'x')
  local epoch, offset, gen, bytes = m[1], tonumber(m[2]), tonumber(m[3]), tonumber(m[5]) or 0
  if not epoch then
    redis.call('DEL', stream)
    redis.call('HDEL', meta, 'pe')
    redis.call('HSET', meta, 'e', fresh, 'o', 0, 'g', 0, 'r', replid, 'b', 0)
    return fresh, 0, 0, 0, 0, nil
  end
  if m[4] ~= replid or replid == '' then
    -- What was acknowledged after the surviving data may be gone, and nothing here says what: no
    -- position of the old epoch continues, so its clients get a reset.
    local e, o, g, fenced = fence(meta, stream, epoch, gen, fresh, replid)
    if gen == nil then bytes = 0 end
    return e, o, g, bytes, fenced, tonumber(m[6])
  end
  return epoch, offset or 0, gen or 0, bytes, 0, tonumber(m[6])
end
"#;

/// Publish. KEYS: meta, stream, [dedup]. ARGV: 1 pub/sub channel, 2 channel, 3 event, 4 data (compact
/// JSON), 5 correlation ID, 6 published_at (RFC 3339), 7 now (ms), 8 history size, 9 history age (ms),
/// 10 dedup window (s), 11 a fresh epoch (used if the channel has none or is fenced), 12 message header,
/// 13 the primary's replication ID, 14 history bytes (0: unbounded).
/// Channel, event and correlation ID are validated by Herald to contain no quote or backslash, so the
/// envelope can be assembled by concatenation; `data` is already JSON.
/// History keeps at most `size` entries and `bytes` bytes of envelopes, dropping the oldest (the newest
/// entry always stays).
/// Returns one string: `d:<epoch>:<offset>:<correlation>` for a duplicate,
/// `p:<epoch>:<offset>:<receivers>:<fenced>` otherwise, where receivers is how many pub/sub
/// connections (nodes) got the message and fenced is 1 when the channel moved to a new epoch first
/// (one string rather than a list of five: a node parses it in a fraction of the time).
const PUBLISH_ONE: &str = r#"
local function publish_one(meta, stream, dedup, ARGV)
if dedup then
  local seen = redis.call('GET', dedup)
  if seen then
    -- Written again (same value and expiry) so that a WAIT after this call also covers the first
    -- publication: replication is one ordered stream, wherever that publication was written from.
    redis.call('SET', dedup, seen, 'KEEPTTL')
    return 'd:' .. seen
  end
end
local epoch, offset, gen, bytes, fenced, extended = state(meta, stream, ARGV[11], ARGV[13])
offset = offset + 1
-- Expiry: both keys live at least the history age after the last publication. They are given the age
-- plus twice a slack of an eighth of it, and pushed back only once the last push (by the clock of the
-- node that pushed it) is older than the slack, instead of on every publication: two commands saved on
-- a busy channel. The second slack covers nodes whose clocks differ by up to a slack. History reads
-- drop entries older than the age by their stamp, so the longer life shows nowhere. A stream made anew
-- below gets its expiry at once.
local now, age = tonumber(ARGV[7]), tonumber(ARGV[9])
local slack = math.floor(age / 8)
local extend = extended == nil or now - extended >= slack or now < extended
local envelope = '{"channel":"' .. ARGV[2] .. '","epoch":"' .. epoch .. '","offset":' .. offset ..
  ',"event":"' .. ARGV[3] .. '","data":' .. ARGV[4] .. ',"correlation_id":"' .. ARGV[5] ..
  '","published_at":"' .. ARGV[6] .. '"}'
local size, max_bytes = tonumber(ARGV[8]), tonumber(ARGV[14])
if size > 0 then
  local count = redis.call('XLEN', stream)
  if count == 0 then bytes, extend = 0, true end
  local added = redis.pcall('XADD', stream, gen .. '-' .. offset, 't', ARGV[7], 'p', envelope)
  if type(added) == 'table' and added.err then
    -- The stream is ahead of the hash (one restored without the other, or written by another layout):
    -- its history cannot be continued; positions are still never reused (they come from the hash).
    redis.call('DEL', stream)
    count, bytes, extend = 0, 0, true
    redis.call('XADD', stream, gen .. '-' .. offset, 't', ARGV[7], 'p', envelope)
  end
  count = count + 1
  bytes = bytes + #envelope
  if count > size or (max_bytes > 0 and bytes > max_bytes) then
    local after, kept = '-', count
    while kept > 1 and (kept > size or (max_bytes > 0 and bytes > max_bytes)) do
      -- Read only as many of the oldest as the count bound drops (usually one), one more at a time
      -- for the bytes bound: reading entries is most of what trimming costs.
      local oldest = redis.call('XRANGE', stream, after, '+', 'COUNT', math.max(1, kept - size))
      if #oldest == 0 then break end
      for _, entry in ipairs(oldest) do
        if kept <= 1 or (kept <= size and (max_bytes <= 0 or bytes <= max_bytes)) then break end
        bytes = bytes - #(entry[2][4] or '')
        kept = kept - 1
        after = '(' .. entry[1]
      end
    end
    redis.call('XTRIM', stream, 'MAXLEN', kept)
  end
  if extend then redis.call('PEXPIRE', stream, age + 2 * slack) end
end
if extend then
  redis.call('HSET', meta, 'o', offset, 'b', bytes, 'x', now)
  redis.call('PEXPIRE', meta, age + 2 * slack)
else
  redis.call('HSET', meta, 'o', offset, 'b', bytes)
end
if dedup then
  redis.call('SET', dedup, epoch .. ':' .. offset .. ':' .. ARGV[5], 'EX', ARGV[10])
end
local receivers = redis.call('PUBLISH', ARGV[1], ARGV[12] .. envelope)
return 'p:' .. epoch .. ':' .. offset .. ':' .. receivers .. ':' .. fenced
end
"#;

/// One publication: KEYS and ARGV as above.
const PUBLISH_BODY: &str = r#"
return publish_one(KEYS[1], KEYS[2], KEYS[3], ARGV)
"#;

/// Several publications in one call, each exactly as [`PUBLISH_BODY`] would run it, in order. ARGV[1]
/// is how many; then per publication its number of keys (2, or 3 with an idempotency key) and its 14
/// arguments, and KEYS holds each publication's keys one after another. Returns one reply per
/// publication: as the single script's, or {-1, error} for one that failed (the others still run:
/// a script is not rolled back, so each publication's fate is reported on its own).
const PUBLISH_BATCH_BODY: &str = r#"
local results, k, a = {}, 1, 2
for i = 1, tonumber(ARGV[1]) do
  local nkeys = tonumber(ARGV[a])
  local args = {}
  for j = 1, 14 do args[j] = ARGV[a + j] end
  local dedup = nil
  if nkeys == 3 then dedup = KEYS[k + 2] end
  local ok, reply = pcall(publish_one, KEYS[k], KEYS[k + 1], dedup, args)
  if ok then
    results[i] = reply
  elseif type(reply) == 'table' and reply.err then
    results[i] = {-1, reply.err}
  else
    results[i] = {-1, tostring(reply)}
  end
  k, a = k + nkeys, a + 15
end
return results
"#;

/// The channel's top position, creating a fresh epoch when it has none and fencing it when its position
/// was assigned under another history of the primary. KEYS: meta, stream. ARGV: 1 a fresh epoch,
/// 2 history age (ms), 3 the primary's replication ID.
/// Returns {epoch, offset, generation, fenced, the epoch a fence replaced or ''}.
const TOP_BODY: &str = r#"
local epoch, offset, gen, bytes, fenced = state(KEYS[1], KEYS[2], ARGV[1], ARGV[3])
if offset == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {epoch, offset, gen, fenced, redis.call('HGET', KEYS[1], 'pe') or ''}
"#;

/// Moves a channel to a new epoch when it is still in `epoch` (its position was seen going backwards:
/// the data rolled back without the primary's history changing, as when a backup is restored into a
/// running server). KEYS: meta, stream. ARGV: 1 the epoch seen going backwards, 2 a fresh epoch,
/// 3 the primary's replication ID. Returns 1 when it fenced.
const FENCE_BODY: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'e', 'g')
if m[1] ~= ARGV[1] then return 0 end
fence(KEYS[1], KEYS[2], m[1], tonumber(m[2]), ARGV[2], own_replid(ARGV[3]))
return 1
"#;

/// How long a channel's keys are kept after their expiry is pushed back, for a history age of `age_ms`:
/// the age plus twice an eighth of it, as the publish script computes it (see the comment there).
/// Whatever else pushes the expiry back (the keeper of subscribed channels) must give at least this.
pub fn key_life_ms(age_ms: u64) -> u64 {
    age_ms + 2 * (age_ms / 8)
}

/// The publish script; `sharded` (Redis Cluster) fans out with `SPUBLISH`.
pub fn publish(sharded: bool) -> String {
    fan_out(format!("{FENCE}{PUBLISH_ONE}{PUBLISH_BODY}"), sharded)
}

pub fn publish_batch(sharded: bool) -> String {
    fan_out(format!("{FENCE}{PUBLISH_ONE}{PUBLISH_BATCH_BODY}"), sharded)
}

fn fan_out(script: String, sharded: bool) -> String {
    if sharded { script.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',") } else { script }
}

pub fn top() -> String {
    format!("{FENCE}{TOP_BODY}")
}

pub fn fence() -> String {
    format!("{FENCE}{FENCE_BODY}")
}
