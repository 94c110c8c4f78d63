//! The cluster log's Redis side: the leader lease (take, renew, give up)
//! and the append script, fenced by the lease, that gives entries their ids.

use std::sync::LazyLock;

use super::{EVENTS_KEY, LAST_KEY, LEADER_KEY};
use crate::store::connect::Link;
use crate::stream::frame::{Event, Message, REPLAY_GAP};

/// Appends entries under ids `<ms>-<n>`: `ms` is Redis's clock (never
/// smaller than the last id's), `n` counts every entry ever written, so ids
/// increase by `<seq>` alone too, and a reader sees a hole as a jump in it.
/// The last id is kept apart from the log, which may be trimmed empty.
const WRITE: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER the leader lease is not ours')
end
local last = redis.call('GET', KEYS[3])
if not last then
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  last = top[1] and top[1][1] or '0-0'
end
local dash = string.find(last, '-', 1, true)
local ms = tonumber(string.sub(last, 1, dash - 1))
local n = tonumber(string.sub(last, dash + 1))
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now > ms then ms = now end
local id = last
for i = 4, #ARGV, 4 do
  n = n + 1
  id = string.format('%d-%d', ms, n)
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], id,
    'e', ARGV[i], 'd', ARGV[i + 1], 'p', ARGV[i + 2], 'h', ARGV[i + 3])
end
redis.call('SET', KEYS[3], id)
if ARGV[3] ~= '' then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[3])
end
return n
"#;
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;
const RESIGN: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;
static WRITE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(WRITE));
static RENEW_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RENEW));
static RESIGN_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RESIGN));

/// One entry to append: event name, device, `data`, hash of what was heard
/// (0 for a gap marker or a value the rate limit released).
pub struct Entry {
    pub event: &'static str,
    pub device: String,
    pub data: Vec<u8>,
    pub hash: u64,
}

impl Entry {
    pub fn of(msg: Message, hash: u64) -> Entry {
        Entry {
            event: msg.event.name(),
            device: msg.device,
            data: msg.data,
            hash,
        }
    }

    /// A gap marker: `system` `{"kind":"replay-gap"}`.
    pub fn gap() -> Entry {
        Entry {
            event: Event::System.name(),
            device: String::new(),
            data: REPLAY_GAP.as_bytes().to_vec(),
            hash: 0,
        }
    }

    pub fn is_gap(&self) -> bool {
        self.hash == 0 && self.event == Event::System.name()
    }
}

/// `SET <leader> <me> NX PX <ms>`: whether the lease is now `me`'s.
pub fn acquire(link: &mut Link, me: &str, lease_ms: u64) -> redis::RedisResult<bool> {
    redis::cmd("SET")
        .arg(LEADER_KEY)
        .arg(me)
        .arg("NX")
        .arg("PX")
        .arg(lease_ms)
        .query::<Option<String>>(link.con())
        .map(|ok| ok.is_some())
}

/// Extends `me`'s lease; false when it is no longer `me`'s.
pub fn renew(link: &mut Link, me: &str, lease_ms: u64) -> redis::RedisResult<bool> {
    RENEW_SCRIPT
        .key(LEADER_KEY)
        .arg(me)
        .arg(lease_ms)
        .invoke::<i64>(link.con())
        .map(|held| held == 1)
}

/// Gives `me`'s lease up (nothing if it is another's by now).
pub fn resign(link: &mut Link, me: &str) -> redis::RedisResult<()> {
    RESIGN_SCRIPT
        .key(LEADER_KEY)
        .arg(me)
        .invoke::<i64>(link.con())
        .map(drop)
}

/// Appends `entries` if the lease is `me`'s (else the error `NOTLEADER`),
/// capping the log at about `maxlen` entries and, when `minid` is given,
/// trimming entries older than it (ms).
pub fn append(
    link: &mut Link,
    me: &str,
    maxlen: usize,
    minid: Option<u64>,
    entries: &[Entry],
) -> redis::RedisResult<()> {
    let mut invocation = WRITE_SCRIPT.key(EVENTS_KEY);
    invocation
        .key(LEADER_KEY)
        .key(LAST_KEY)
        .arg(me)
        .arg(maxlen)
        .arg(minid.map(|m| m.to_string()).unwrap_or_default());
    for e in entries {
        invocation
            .arg(e.event)
            .arg(&e.device)
            .arg(&e.data)
            .arg(e.hash);
    }
    invocation.invoke::<i64>(link.con()).map(drop)
}
