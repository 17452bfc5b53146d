//! Server-side Lua scripts. Each runs atomically in Redis.

/// Publish. KEYS: meta, stream, [dedup]. ARGV: 1 pub/sub channel, 2 channel, 3 event, 4 data (compact
/// JSON), 5 correlation ID, 6 published_at (RFC 3339), 7 now (ms), 8 history size, 9 history age (ms),
/// 10 dedup window (s), 11 a fresh epoch (used if the channel has none), 12 message header.
/// Channel, event and correlation ID are validated by Herald to contain no quote or backslash, so the
/// envelope can be assembled by concatenation; `data` is already JSON.
/// Returns {1, "epoch:offset:correlation"} for a duplicate, {0, epoch, offset, receivers} otherwise,
/// where receivers is how many pub/sub connections (nodes) got the message.
pub const PUBLISH: &str = r#"
local meta, stream, dedup = KEYS[1], KEYS[2], KEYS[3]
if dedup then
  local seen = redis.call('GET', dedup)
  if seen then return {1, seen} end
end
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  epoch = ARGV[11]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 'o', 0)
end
local offset = redis.call('HINCRBY', meta, 'o', 1)
local envelope = '{"channel":"' .. ARGV[2] .. '","epoch":"' .. epoch .. '","offset":' .. offset ..
  ',"event":"' .. ARGV[3] .. '","data":' .. ARGV[4] .. ',"correlation_id":"' .. ARGV[5] ..
  '","published_at":"' .. ARGV[6] .. '"}'
if tonumber(ARGV[8]) > 0 then
  redis.call('XADD', stream, 'MAXLEN', ARGV[8], offset .. '-0', 't', ARGV[7], 'p', envelope)
  redis.call('PEXPIRE', stream, ARGV[9])
end
redis.call('PEXPIRE', meta, ARGV[9])
if dedup then
  redis.call('SET', dedup, epoch .. ':' .. offset .. ':' .. ARGV[5], 'EX', ARGV[10])
end
local receivers = redis.call('PUBLISH', ARGV[1], ARGV[12] .. envelope)
return {0, epoch, offset, receivers}
"#;

/// The channel's top position, creating a fresh epoch when it has none.
/// KEYS: meta, stream. ARGV: 1 a fresh epoch, 2 history age (ms). Returns {epoch, offset}.
pub const TOP: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', ARGV[1], 'o', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {ARGV[1], 0}
end
return {epoch, tonumber(redis.call('HGET', KEYS[1], 'o'))}
"#;
