//! The Redis target: one server, multiplexed (pipelined) connections.
//!
//! A single Redis has one copy of each key, so `get` and `get-eventual` are the same GET. The
//! compare-and-swap is a Lua script run with EVALSHA rather than WATCH/MULTI/EXEC: a script runs
//! atomically on the server in one round trip. WATCH and MULTI are state of the connection, so on
//! a multiplexed connection the other requests in flight would land inside one swap's
//! transaction; they would need a connection per in-flight swap and three round trips (WATCH,
//! GET, MULTI+SET+EXEC), which would measure the client's choice rather than Redis. The script is
//! loaded once when connecting, so the measured EVALSHAs never meet NOSCRIPT.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, RedisError, Script};
use anyhow::Context;
use ferrocotta::loadgen::{OpError, Target};

use crate::{deadline, PeerArgs};

/// Sets KEYS[1] to ARGV[2] if it holds ARGV[1]; 1 if it did, 0 if not (a missing key never
/// matches, as the array's replace-if-equal).
const CAS_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2])
    return 1
end
return 0
";

/// Redis through one or more multiplexed connections, used round-robin.
pub struct RedisTarget {
    /// One per `--connections`; each pipelines every request in flight on it.
    connections: Vec<MultiplexedConnection>,
    /// Round-robin cursor over `connections`.
    next: AtomicUsize,
    /// The compare-and-swap script (its SHA1 is what EVALSHA sends).
    cas: Script,
    /// Deadline of each operation.
    timeout: Duration,
}

impl RedisTarget {
    /// Connections to one server (`host:port` or a `redis://` URL).
    pub async fn connect(endpoints: &[String], connections: usize, args: &PeerArgs) -> anyhow::Result<RedisTarget> {
        let [endpoint] = endpoints else {
            anyhow::bail!("--target redis takes exactly one endpoint, got {}", endpoints.len());
        };
        let url = if endpoint.contains("://") {
            endpoint.clone()
        } else {
            format!("redis://{endpoint}/")
        };
        let client = Client::open(url.as_str()).with_context(|| format!("bad Redis endpoint {endpoint}"))?;
        // The client's own response timeout (500 ms by default) would fail requests that an fsync
        // per write (appendfsync always) keeps waiting at high concurrency; use `--timeout`, as
        // the other targets do.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(args.connect_timeout))
            .set_response_timeout(Some(args.timeout));
        let cas = Script::new(CAS_SCRIPT);
        let mut list = Vec::with_capacity(connections);
        for _ in 0..connections {
            let mut connection = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .with_context(|| format!("cannot connect to Redis at {endpoint}"))?;
            cas.prepare_invoke()
                .load_async(&mut connection)
                .await
                .context("cannot load the compare-and-swap script")?;
            list.push(connection);
        }
        Ok(RedisTarget {
            connections: list,
            next: AtomicUsize::new(0),
            cas,
            timeout: args.timeout,
        })
    }

    /// The next connection. Commands take `&mut`, so each operation works on a clone: a handle
    /// onto the same pipelined connection, not a new one.
    fn connection(&self) -> MultiplexedConnection {
        self.connections[self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len()].clone()
    }
}

/// The stable name of a Redis error in the error table.
fn error_kind(e: RedisError) -> OpError {
    OpError::new(if e.is_timeout() {
        "timeout"
    } else if e.is_connection_refusal() {
        "refused"
    } else if e.is_connection_dropped() || e.is_io_error() {
        "connection"
    } else {
        "server_error"
    })
}

impl Target for RedisTarget {
    async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), OpError> {
        let mut c = self.connection();
        deadline(self.timeout, async {
            ::redis::cmd("SET")
                .arg(key)
                .arg(value)
                .query_async::<()>(&mut c)
                .await
                .map_err(error_kind)
        })
        .await
    }

    async fn get(&self, key: &[u8], _linearizable: bool) -> Result<Option<Vec<u8>>, OpError> {
        let mut c = self.connection();
        deadline(self.timeout, async {
            ::redis::cmd("GET")
                .arg(key)
                .query_async::<Option<Vec<u8>>>(&mut c)
                .await
                .map_err(error_kind)
        })
        .await
    }

    async fn cas(&self, key: &[u8], expected: &[u8], new: &[u8]) -> Result<bool, OpError> {
        let mut c = self.connection();
        deadline(self.timeout, async {
            let swapped: i64 = self
                .cas
                .key(key)
                .arg(expected)
                .arg(new)
                .invoke_async(&mut c)
                .await
                .map_err(error_kind)?;
            Ok(swapped == 1)
        })
        .await
    }

    async fn put_many(&self, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), OpError> {
        let mut c = self.connection();
        let mut mset = ::redis::cmd("MSET");
        for (k, v) in entries {
            mset.arg(k).arg(v);
        }
        deadline(self.timeout, async {
            mset.query_async::<()>(&mut c).await.map_err(error_kind)
        })
        .await
    }
}
