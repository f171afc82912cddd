//! What the cluster keeps in Redis, and the commands that read and write
//! it. Every key starts with `[cluster] key_prefix`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<p>:token:<id>` | hash | one token: `rt`, `rt_fp`, `rt_gen` (its refresh token, when rotated, and its rotation count), `at`, `at_exp`, `at_life` (its access token), `st`, `stamp`, `revoked_fp`, `enabled_at` (its state), `node` (the last writer), `pending` (the lease of a refresh whose result is not written yet) |
//! | `<p>:lease:<id>` | string | the replica refreshing the token now; expires by itself |
//! | `<p>:version` | counter | one more for every change written |
//! | `<p>:changes` | sorted set | each token id, scored by the version of its last change |
//! | `<p>:meta` | hash | `epoch` (new when Redis lost its data), `key` (the encryption key's fingerprint), `fence_until` (Unix ms, Redis's clock: no lease before it) |
//! | `<p>:alive` | string | a replica of this pool is running; expires unless renewed |
//! | `<p>:clash` | string | another pool's prefix, which found this pool holding its tokens; expires |
//! | `tokenpool-claims` | hash | token id → the key prefix of the pool that holds it (one for every pool in this Redis) |
//!
//! and the channel `<p>:events` carries `<version> <node>` for each change.
//!
//! A token's id is its name and the fingerprint of its configured secret,
//! so an operator's new secret starts afresh on every replica. Every write
//! is one Lua script that merges — states by the rules of
//! [`crate::pool::accepts`], refresh tokens by rotation count, access
//! tokens by expiry — bumps the version, scores the token and publishes,
//! atomically.

use std::collections::HashMap;

use redis::aio::MultiplexedConnection;
use redis::{RedisResult, Script, ScriptInvocation};

/// The names of the pool's keys.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub(super) fn token(&self, id: &str) -> String {
        format!("{}:token:{id}", self.prefix)
    }

    pub(super) fn lease(&self, id: &str) -> String {
        format!("{}:lease:{id}", self.prefix)
    }

    pub(super) fn version(&self) -> String {
        format!("{}:version", self.prefix)
    }

    pub(super) fn changes(&self) -> String {
        format!("{}:changes", self.prefix)
    }

    pub(super) fn meta(&self) -> String {
        format!("{}:meta", self.prefix)
    }

    pub(super) fn channel(&self) -> String {
        format!("{}:events", self.prefix)
    }

    pub(super) fn alive(&self) -> String {
        format!("{}:alive", self.prefix)
    }

    pub(super) fn clash(&self) -> String {
        format!("{}:clash", self.prefix)
    }

    /// The prefix itself.
    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// The hash of which pool holds which token id, shared by every pool in
/// one Redis: two pools holding one token would each refresh it.
pub(super) const CLAIMS: &str = "tokenpool-claims";

/// The end of every write: a new version, the token scored with it, and
/// the news published.
const CHANGED: &str = r"
local function changed()
  local v = redis.call('INCR', KEYS[2])
  redis.call('ZADD', KEYS[3], v, ARGV[1])
  redis.call('PUBLISH', ARGV[2], v .. ' ' .. ARGV[3])
  return v
end
";

/// Writes a token's state if it wins over the stored one (the rule of
/// `pool::token::replicas::accepts`; a revocation is also void once the
/// refresh token it was seen with has been replaced).
/// ARGV: id, channel, node, stamp, revoked_fp ('' unless revoked),
/// enabled_at (stamp of the last enable, 0 for none), state JSON,
/// fingerprint of the configured refresh token.
/// Returns the new version, or 0 when the stored state stays.
const PUT_STATE: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'stamp', 'revoked_fp', 'enabled_at', 'rt_fp')
local rt = cur[4] or ARGV[8]
local stamp = tonumber(cur[1]) or 0
local at = tonumber(ARGV[4])
local enabled_at = math.max(tonumber(cur[3]) or 0, tonumber(ARGV[6]))
local was_revoked = cur[2] ~= false and cur[2] ~= '' and cur[2] == rt and stamp > enabled_at
local revoked = ARGV[5] ~= '' and ARGV[5] == rt and at > enabled_at
if ARGV[5] ~= '' and not revoked then return 0 end
local take
if at > stamp then
  take = (not was_revoked) or revoked
else
  take = revoked and not was_revoked
end
if not take then return 0 end
if at < stamp then at = stamp end
redis.call('HSET', KEYS[1], 'st', ARGV[7], 'stamp', at, 'revoked_fp', ARGV[5],
  'enabled_at', enabled_at, 'node', ARGV[3])
return changed()
";

/// Writes what a refresh brought: a rotated refresh token if it has more
/// rotations than the stored one; an access token if it outlives the
/// stored one.
/// ARGV: id, channel, node, the new refresh token's rotation count (0:
/// none to write), its fingerprint, its sealed value, the sealed access
/// token ('' for none), its expiry (Unix ms), its lifetime (ms), 1 if the
/// access token was just obtained (it wins: the stored one may have met a
/// 401, and expiries are whole seconds and clocks differ).
/// Returns {rotation, version}: rotation 1 written, 0 nothing to write or
/// already there, -1 refused (the stored one is as new, or newer); version
/// 0 when nothing was written.
const GRANT: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'rt_gen', 'rt_fp', 'at_exp')
local gen = tonumber(cur[1]) or 0
local new_gen = tonumber(ARGV[4])
local rotation = 0
local wrote = false
if new_gen > 0 then
  if new_gen > gen then
    redis.call('HSET', KEYS[1], 'rt', ARGV[6], 'rt_fp', ARGV[5], 'rt_gen', new_gen)
    rotation = 1
    wrote = true
  elseif cur[2] ~= ARGV[5] then
    rotation = -1
  end
end
local stored_exp = tonumber(cur[3]) or 0
local new_exp = tonumber(ARGV[8])
if ARGV[7] ~= '' and (ARGV[10] == '1' or stored_exp < new_exp) then
  redis.call('HSET', KEYS[1], 'at', ARGV[7], 'at_exp', ARGV[8], 'at_life', ARGV[9])
  wrote = true
end
if rotation == 1 or ARGV[10] == '1' then
  -- The result of the pending refresh is written (or a newer rotation).
  redis.call('HDEL', KEYS[1], 'pending')
end
if not wrote then return {rotation, 0} end
redis.call('HSET', KEYS[1], 'node', ARGV[3])
return {rotation, changed()}
";

/// Creates the pool's meta record if it is missing; returns its epoch,
/// key fingerprint, 1 if this call created the epoch, and the version.
/// KEYS: meta, version. ARGV: a new epoch, this replica's key fingerprint.
const META: &str = r"
local created = redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
redis.call('HSETNX', KEYS[1], 'key', ARGV[2])
local m = redis.call('HMGET', KEYS[1], 'epoch', 'key')
return {m[1], m[2], created, tonumber(redis.call('GET', KEYS[2]) or '0')}
";

/// Takes a token's refresh lease, only in the Redis data this replica
/// knows: the same epoch, a version not behind what it read (a restored
/// snapshot), no fence (Redis lost its data moments ago), and no earlier
/// refresh whose result was never written (its holder died or was cut off
/// after presenting the refresh token: it may have rotated). The token's
/// record then says a refresh is pending until its result is written.
/// KEYS: lease, meta, version, token. ARGV: lease value, ttl (ms), epoch,
/// version read. Returns 1 taken, 0 held by another, -1 another epoch,
/// -2 rolled back, -3 fenced, -4 an earlier refresh unsettled.
const TAKE_LEASE: &str = r"
local m = redis.call('HMGET', KEYS[2], 'epoch', 'fence_until')
if m[1] ~= ARGV[3] then return -1 end
if (tonumber(redis.call('GET', KEYS[3]) or '0')) < tonumber(ARGV[4]) then return -2 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if (tonumber(m[2]) or 0) > now then return -3 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('HEXISTS', KEYS[4], 'pending') == 1 then return -4 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[4], 'pending', ARGV[1])
-- A lease moves the version: a failover or a restored snapshot that lost
-- it shows as a version behind what the holder read.
redis.call('INCR', KEYS[3])
return 1
";

/// Says again that a refresh of a token is pending, and fences leases for
/// `window`: its holder found its lease gone (Redis lost it) while the
/// refresh was in flight, or a refresh it knows unsettled has no mark in
/// the data. KEYS: token, meta. ARGV: lease value, window (ms).
const REASSERT: &str = r"
redis.call('HSET', KEYS[1], 'pending', ARGV[1])
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local cur = tonumber(redis.call('HGET', KEYS[2], 'fence_until') or '0')
if until_ms > cur then redis.call('HSET', KEYS[2], 'fence_until', until_ms) end
return 1
";

/// Fences leases for `window` ms from now (Redis's clock), keeping a later
/// fence. KEYS: meta. ARGV: window (ms).
const FENCE: &str = r"
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local cur = tonumber(redis.call('HGET', KEYS[1], 'fence_until') or '0')
if until_ms > cur then redis.call('HSET', KEYS[1], 'fence_until', until_ms) end
return until_ms
";

/// Claims token ids for this pool unless a running pool with another
/// prefix holds them; tells that pool of the clash. KEYS: claims. ARGV:
/// this prefix, then ids. Returns the prefixes that hold some of them.
const CLAIM: &str = r"
local others = {}
for i = 2, #ARGV do
  local owner = redis.call('HGET', KEYS[1], ARGV[i])
  if owner and owner ~= ARGV[1] and redis.call('EXISTS', owner .. ':alive') == 1 then
    if not others[owner] then
      others[owner] = true
      redis.call('SET', owner .. ':clash', ARGV[1], 'PX', 10000)
    end
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
  end
end
local out = {}
for owner, _ in pairs(others) do table.insert(out, owner) end
return out
";

/// Extends a lease if this replica still holds it. ARGV: the lease's
/// value, its new time to live (ms).
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Deletes a lease if this replica still holds it; with ARGV[2] = '1'
/// (the refresh's result is known: written, or nothing rotated) also the
/// token's pending mark. KEYS: lease, token. ARGV: the lease's value, '1'
/// or '0'.
const RELEASE: &str = r"
if ARGV[2] == '1' and redis.call('HGET', KEYS[2], 'pending') == ARGV[1] then
  redis.call('HDEL', KEYS[2], 'pending')
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The compiled scripts (their SHA-1 computed once).
pub(super) struct Scripts {
    put_state: Script,
    grant: Script,
    meta: Script,
    take_lease: Script,
    reassert: Script,
    fence: Script,
    claim: Script,
    renew: Script,
    release: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            put_state: Script::new(&format!("{CHANGED}{PUT_STATE}")),
            grant: Script::new(&format!("{CHANGED}{GRANT}")),
            meta: Script::new(META),
            take_lease: Script::new(TAKE_LEASE),
            reassert: Script::new(REASSERT),
            fence: Script::new(FENCE),
            claim: Script::new(CLAIM),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        }
    }
}

/// A token's state to write.
pub(super) struct StateWrite<'a> {
    pub id: &'a str,
    pub stamp: u64,
    pub revoked_fp: &'a str,
    pub enabled_at: u64,
    pub json: &'a str,
    pub configured_fp: &'a str,
}

/// What a refresh brought, to write.
pub(super) struct GrantWrite<'a> {
    pub id: &'a str,
    /// The refresh token's rotation count, fingerprint and sealed value.
    pub rotated: Option<(u64, &'a str, &'a str)>,
    /// The sealed access token, its expiry and lifetime (Unix ms, ms).
    pub access: Option<(&'a str, u64, u64)>,
    /// The access token was just obtained by a refresh.
    pub fresh: bool,
}

/// One token's hash as read.
pub(super) type Record = HashMap<String, String>;

/// The pool's meta record.
pub(super) struct Meta {
    /// The epoch of the data.
    pub epoch: String,
    /// The fingerprint of the key its tokens are sealed with.
    pub key: String,
    /// This call created the epoch: the data was empty (a new cluster, or
    /// one that lost its data).
    pub created: bool,
    /// The version of the last change.
    pub version: u64,
}

/// A lease to ask for.
pub(super) struct LeaseAsk<'a> {
    pub id: &'a str,
    pub value: &'a str,
    pub ttl_ms: u64,
    /// The epoch this replica read.
    pub epoch: &'a str,
    /// The version this replica read.
    pub version: u64,
}

/// What a lease request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaseAnswer {
    /// This replica holds it.
    Taken,
    /// Another replica holds it.
    Held,
    /// Redis lost or rolled back its data moments ago: no lease yet.
    Fenced,
    /// Redis's data is not the data this replica read (another epoch, or
    /// behind the version it read): read again first.
    NotTheDataRead,
    /// An earlier refresh's result was never written: the refresh token it
    /// presented may have rotated.
    Unsettled,
}

/// The commands, for one pool's keys.
pub(super) struct Store {
    pub keys: Keys,
    scripts: Scripts,
    node: String,
}

impl Store {
    pub(super) fn new(prefix: &str, node: &str) -> Store {
        Store {
            keys: Keys::new(prefix),
            scripts: Scripts::new(),
            node: node.to_string(),
        }
    }

    /// A write script's invocation for token `id`, with what every write
    /// takes (the three keys [`CHANGED`] uses; id, channel, node).
    fn write<'a>(&self, script: &'a Script, id: &str) -> ScriptInvocation<'a> {
        let mut call = script.prepare_invoke();
        call.key(self.keys.token(id))
            .key(self.keys.version())
            .key(self.keys.changes())
            .arg(id)
            .arg(self.keys.channel())
            .arg(&self.node);
        call
    }

    /// Writes a state; the new version, or 0 when the stored one stays.
    pub(super) async fn put_state(
        &self,
        conn: &mut MultiplexedConnection,
        w: &StateWrite<'_>,
    ) -> RedisResult<u64> {
        self.write(&self.scripts.put_state, w.id)
            .arg(w.stamp)
            .arg(w.revoked_fp)
            .arg(w.enabled_at)
            .arg(w.json)
            .arg(w.configured_fp)
            .invoke_async(conn)
            .await
    }

    /// Writes a grant; `(rotation, version)` as [`GRANT`] says.
    pub(super) async fn grant(
        &self,
        conn: &mut MultiplexedConnection,
        w: &GrantWrite<'_>,
    ) -> RedisResult<(i64, u64)> {
        let (generation, new_fp, sealed_rt) = w.rotated.unwrap_or((0, "", ""));
        let (sealed_at, exp, life) = w.access.unwrap_or(("", 0, 0));
        self.write(&self.scripts.grant, w.id)
            .arg(generation)
            .arg(new_fp)
            .arg(sealed_rt)
            .arg(sealed_at)
            .arg(exp)
            .arg(life)
            .arg(if w.fresh { "1" } else { "0" })
            .invoke_async(conn)
            .await
    }

    /// The pool's meta record, created if missing (see [`Meta`]).
    pub(super) async fn meta(
        &self,
        conn: &mut MultiplexedConnection,
        new_epoch: &str,
        key_fp: &str,
    ) -> RedisResult<Meta> {
        let (epoch, key, created, version): (String, String, i64, u64) = self
            .scripts
            .meta
            .key(self.keys.meta())
            .key(self.keys.version())
            .arg(new_epoch)
            .arg(key_fp)
            .invoke_async(conn)
            .await?;
        Ok(Meta {
            epoch,
            key,
            created: created == 1,
            version,
        })
    }

    /// The stored epoch (`None` when Redis lost it), version, and another
    /// pool's prefix that found this one holding its tokens; says this
    /// pool is alive for `alive_ms`.
    pub(super) async fn heartbeat(
        &self,
        conn: &mut MultiplexedConnection,
        alive_ms: u64,
    ) -> RedisResult<(Option<String>, Option<u64>, Option<String>)> {
        redis::pipe()
            .cmd("HGET")
            .arg(self.keys.meta())
            .arg("epoch")
            .cmd("GET")
            .arg(self.keys.version())
            .cmd("SET")
            .arg(self.keys.alive())
            .arg(&self.node)
            .arg("PX")
            .arg(alive_ms)
            .ignore()
            .cmd("GET")
            .arg(self.keys.clash())
            .query_async(conn)
            .await
    }

    /// Says this pool is alive for `alive_ms`.
    pub(super) async fn alive(
        &self,
        conn: &mut MultiplexedConnection,
        alive_ms: u64,
    ) -> RedisResult<()> {
        redis::cmd("SET")
            .arg(self.keys.alive())
            .arg(&self.node)
            .arg("PX")
            .arg(alive_ms)
            .query_async(conn)
            .await
    }

    /// Claims `ids` for this pool; the prefixes of running pools that hold
    /// some of them.
    pub(super) async fn claim(
        &self,
        conn: &mut MultiplexedConnection,
        ids: &[&str],
    ) -> RedisResult<Vec<String>> {
        let mut call = self.scripts.claim.prepare_invoke();
        call.key(CLAIMS).arg(self.keys.prefix());
        for id in ids {
            call.arg(*id);
        }
        call.invoke_async(conn).await
    }

    /// Marks token `id`'s refresh (lease `value`) pending again and fences
    /// leases for `window`.
    pub(super) async fn reassert_pending(
        &self,
        conn: &mut MultiplexedConnection,
        id: &str,
        value: &str,
        window: std::time::Duration,
    ) -> RedisResult<()> {
        let _: i64 = self
            .scripts
            .reassert
            .key(self.keys.token(id))
            .key(self.keys.meta())
            .arg(value)
            .arg(window.as_millis() as u64)
            .invoke_async(conn)
            .await?;
        Ok(())
    }

    /// Fences leases for `window` from now.
    pub(super) async fn fence(
        &self,
        conn: &mut MultiplexedConnection,
        window: std::time::Duration,
    ) -> RedisResult<u64> {
        self.scripts
            .fence
            .key(self.keys.meta())
            .arg(window.as_millis() as u64)
            .invoke_async(conn)
            .await
    }

    /// Token ids changed after version `since`, with their versions.
    pub(super) async fn changed_since(
        &self,
        conn: &mut MultiplexedConnection,
        since: u64,
    ) -> RedisResult<Vec<(String, u64)>> {
        redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.changes())
            .arg(format!("({since}"))
            .arg("+inf")
            .arg("WITHSCORES")
            .query_async(conn)
            .await
    }

    /// The record of token `id` (empty if there is none).
    pub(super) async fn record(
        &self,
        conn: &mut MultiplexedConnection,
        id: &str,
    ) -> RedisResult<Record> {
        redis::cmd("HGETALL")
            .arg(self.keys.token(id))
            .query_async(conn)
            .await
    }

    /// The records of `ids`, in one round trip.
    pub(super) async fn records(
        &self,
        conn: &mut MultiplexedConnection,
        ids: &[&str],
    ) -> RedisResult<Vec<Record>> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGETALL").arg(self.keys.token(id));
        }
        pipe.query_async(conn).await
    }

    /// Takes the lease of token `id` for `ttl_ms` unless another replica
    /// holds it, and only in the data this replica read (`epoch`,
    /// `version`), and not while fenced.
    pub(super) async fn take_lease(
        &self,
        conn: &mut MultiplexedConnection,
        lease: LeaseAsk<'_>,
    ) -> RedisResult<LeaseAnswer> {
        let answer: i64 = self
            .scripts
            .take_lease
            .key(self.keys.lease(lease.id))
            .key(self.keys.meta())
            .key(self.keys.version())
            .key(self.keys.token(lease.id))
            .arg(lease.value)
            .arg(lease.ttl_ms)
            .arg(lease.epoch)
            .arg(lease.version)
            .invoke_async(conn)
            .await?;
        Ok(match answer {
            1 => LeaseAnswer::Taken,
            0 => LeaseAnswer::Held,
            -3 => LeaseAnswer::Fenced,
            -4 => LeaseAnswer::Unsettled,
            _ => LeaseAnswer::NotTheDataRead,
        })
    }

    /// Extends a lease this replica holds; false if it no longer does.
    pub(super) async fn renew_lease(
        &self,
        conn: &mut MultiplexedConnection,
        id: &str,
        value: &str,
        ttl_ms: u64,
    ) -> RedisResult<bool> {
        let renewed: i64 = self
            .scripts
            .renew
            .key(self.keys.lease(id))
            .arg(value)
            .arg(ttl_ms)
            .invoke_async(conn)
            .await?;
        Ok(renewed == 1)
    }

    /// Gives back a lease this replica holds; `settled`: the refresh's
    /// result is known to the cluster (written, or nothing rotated), so the
    /// token's pending mark goes too.
    pub(super) async fn release_lease(
        &self,
        conn: &mut MultiplexedConnection,
        id: &str,
        value: &str,
        settled: bool,
    ) -> RedisResult<()> {
        let _: i64 = self
            .scripts
            .release
            .key(self.keys.lease(id))
            .key(self.keys.token(id))
            .arg(value)
            .arg(if settled { "1" } else { "0" })
            .invoke_async(conn)
            .await?;
        Ok(())
    }
}

/// A Redis error described without anything it might carry (a URL, a
/// key name): its kind only.
pub(super) fn describe(e: &redis::RedisError) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    if e.is_connection_refusal() {
        return "connection refused".into();
    }
    if e.is_connection_dropped() {
        return "connection lost".into();
    }
    match e.kind() {
        redis::ErrorKind::AuthenticationFailed => "authentication failed".into(),
        redis::ErrorKind::Io => "I/O error".into(),
        redis::ErrorKind::Server(_) => match e.code() {
            Some(code) => format!("Redis answered {code}"),
            None => "Redis answered an error".into(),
        },
        _ => e.category().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_starts_with_the_prefix() {
        let k = Keys::new("pool-a");
        for key in [
            k.token("alice:00ff"),
            k.lease("alice:00ff"),
            k.version(),
            k.changes(),
            k.meta(),
            k.channel(),
        ] {
            assert!(key.starts_with("pool-a:"), "{key}");
        }
        assert_eq!(k.token("alice:00ff"), "pool-a:token:alice:00ff");
    }
}
