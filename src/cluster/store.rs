//! What the cluster keeps in Redis, and the commands that read and write
//! it. Every key starts with `[cluster] key_prefix`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<p>:token:<id>` | hash | one token: `rt`, `rt_fp`, `rt_gen` (its refresh token, when rotated, and its rotation count), `at`, `at_exp`, `at_life` (its access token), `st`, `stamp`, `revoked_fp`, `enabled_at` (its state), `node` (the last writer) |
//! | `<p>:lease:<id>` | string | the replica refreshing the token now; expires by itself |
//! | `<p>:version` | counter | one more for every change written |
//! | `<p>:changes` | sorted set | each token id, scored by the version of its last change |
//! | `<p>:meta` | hash | `epoch` (new when Redis lost its data), `key` (the encryption key's fingerprint) |
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
}

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
/// `pool::token::shared::accepts`; a revocation is also void once the
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
if not wrote then return {rotation, 0} end
redis.call('HSET', KEYS[1], 'node', ARGV[3])
return {rotation, changed()}
";

/// Creates the pool's meta record if it is missing; returns its epoch
/// and key fingerprint. ARGV: a new epoch, this replica's key fingerprint.
const META: &str = r"
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
redis.call('HSETNX', KEYS[1], 'key', ARGV[2])
return redis.call('HMGET', KEYS[1], 'epoch', 'key')
";

/// Extends a lease if this replica still holds it. ARGV: the lease's
/// value, its new time to live (ms).
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Deletes a lease if this replica still holds it. ARGV: the lease's value.
const RELEASE: &str = r"
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
    renew: Script,
    release: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            put_state: Script::new(&format!("{CHANGED}{PUT_STATE}")),
            grant: Script::new(&format!("{CHANGED}{GRANT}")),
            meta: Script::new(META),
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

    /// The pool's `(epoch, key fingerprint)`, creating them if missing.
    pub(super) async fn meta(
        &self,
        conn: &mut MultiplexedConnection,
        new_epoch: &str,
        key_fp: &str,
    ) -> RedisResult<(String, String)> {
        self.scripts
            .meta
            .key(self.keys.meta())
            .arg(new_epoch)
            .arg(key_fp)
            .invoke_async(conn)
            .await
    }

    /// The stored epoch (`None` when Redis lost it) and version.
    pub(super) async fn heartbeat(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> RedisResult<(Option<String>, Option<u64>)> {
        redis::pipe()
            .cmd("HGET")
            .arg(self.keys.meta())
            .arg("epoch")
            .cmd("GET")
            .arg(self.keys.version())
            .query_async(conn)
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
    /// holds it.
    pub(super) async fn take_lease(
        &self,
        conn: &mut MultiplexedConnection,
        id: &str,
        value: &str,
        ttl_ms: u64,
    ) -> RedisResult<bool> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.keys.lease(id))
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(conn)
            .await?;
        Ok(set.is_some())
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

    /// Gives back a lease this replica holds.
    pub(super) async fn release_lease(
        &self,
        conn: &mut MultiplexedConnection,
        id: &str,
        value: &str,
    ) -> RedisResult<()> {
        let _: i64 = self
            .scripts
            .release
            .key(self.keys.lease(id))
            .arg(value)
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
