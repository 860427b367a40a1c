//! The cluster configuration: one TOML document that describes the whole array and is identical on
//! every server (the `tc-config.xml` of ferrocotta).
//!
//! The same document is handed to clients in the handshake (the "config download"), so everything
//! here is plain data: loading never touches the disk except to read the file itself, and
//! [`ClusterConfig::parse`] is what both servers and clients use. Validation names the bad field
//! (`stripes[0].servers[1].port: ...`) so an operator can find it without reading the code.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::slots::{SlotRange, SlotSet, SLOT_COUNT};

/// Default client port of an array server (Terracotta's `tsa-port`).
pub const DEFAULT_CLIENT_PORT: u16 = 9510;
/// Default port for Raft traffic between servers of a stripe (Terracotta's `tsa-group-port`).
pub const DEFAULT_GROUP_PORT: u16 = 9530;
/// Default admin HTTP port.
pub const DEFAULT_ADMIN_PORT: u16 = 9540;

/// Largest frame any port accepts, whatever the config says: the config may lower it, not raise it.
pub const FRAME_BYTES_SETTING_MAX: u32 = 256 * 1024 * 1024;

/// An error in a configuration document, naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The text is not valid TOML or does not match the schema.
    #[error("config is not valid: {0}")]
    Syntax(String),
    /// A field holds a value that is not allowed.
    #[error("config field `{field}`: {reason}")]
    Field {
        /// Dotted path of the field, e.g. `stripes[0].servers[1].port`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn field_err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A duration written in the config as `"120s"`, `"500ms"`, `"2m"`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl fmt::Debug for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(ConfigDuration).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{text}` is not a duration ({e}); write e.g. \"500ms\" or \"120s\""
            ))
        })
    }
}

/// The whole array: what every server and every client agrees on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Name of the array; clients state the name they expect in the handshake.
    pub array_name: String,
    /// Raft and session timing.
    #[serde(default)]
    pub timing: Timing,
    /// Bounds on frames, keys and values.
    #[serde(default)]
    pub limits: Limits,
    /// Shared secret and TLS.
    #[serde(default)]
    pub security: Security,
    /// Snapshot and log compaction settings.
    #[serde(default)]
    pub storage: Storage,
    /// The stripes (Terracotta "mirror groups"), in slot order.
    pub stripes: Vec<StripeConfig>,
    /// Settings of named caches, applied when such a cache is first used.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub caches: std::collections::BTreeMap<String, CacheConfig>,
    /// How many times stripes were added or removed since the array's first cluster.toml: of two
    /// documents, the list of stripes of the one with the higher layout is the current one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub layout: u64,
}

/// Settings of one named cache in the config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Beyond this many entries per stripe the least recently used entry is evicted.
    pub max_entries: Option<u64>,
    /// Time to live: entries expire this long after their last write.
    pub ttl: Option<ConfigDuration>,
    /// Time to idle: entries expire this long after their last access.
    pub tti: Option<ConfigDuration>,
}

impl CacheConfig {
    /// As protocol settings.
    pub fn settings(&self) -> crate::protocol::CacheSettings {
        crate::protocol::CacheSettings {
            max_entries: self.max_entries,
            ttl_ms: self.ttl.map(|d| d.0.as_millis() as u64),
            tti_ms: self.tti.map(|d| d.0.as_millis() as u64),
        }
    }
}

/// Timing of elections, heartbeats and client sessions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// How long mirrors wait without hearing from the active before electing a new one. The
    /// actual wait is randomized between this and 1.25 x this, and a mirror also honours the
    /// active's lease (1.25 x this) first, so failover takes about 2.25 to 2.5 x this.
    pub election_timeout: ConfigDuration,
    /// How often the active sends heartbeats to its mirrors.
    pub heartbeat_interval: ConfigDuration,
    /// How long a silent client keeps its session (locks, ephemeral entries).
    pub client_reconnect_window: ConfigDuration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            election_timeout: ConfigDuration(Duration::from_millis(600)),
            heartbeat_interval: ConfigDuration(Duration::from_millis(100)),
            client_reconnect_window: ConfigDuration(Duration::from_secs(120)),
        }
    }
}

/// Bounds on everything that arrives from the network (docs/security.md lists each with its reason).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame accepted on the client and group ports, in bytes; also the largest reply.
    pub max_frame_bytes: u32,
    /// Largest key, in bytes.
    pub max_key_bytes: u32,
    /// Largest value, in bytes.
    pub max_value_bytes: u32,
    /// Client connections one server holds at most (authenticated or not); beyond it a new
    /// connection is told the server is busy and closed.
    pub max_connections: u32,
    /// Client connections from one IP address at most, so one host cannot take them all.
    pub max_connections_per_ip: u32,
    /// Connections still in their handshake at most, per server; the rest wait in the kernel's
    /// accept queue.
    pub max_pending_handshakes: u32,
    /// Longest a new connection may take for its TLS and protocol handshakes.
    pub handshake_timeout: ConfigDuration,
    /// Longest one frame may take to arrive once its first byte has: a client that sends a byte
    /// a second is closed after this.
    pub frame_timeout: ConfigDuration,
    /// An authenticated connection that sends nothing for this long is closed (clients ping idle
    /// connections well within it).
    pub idle_timeout: ConfigDuration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 * 1024 * 1024,
            max_key_bytes: 4 * 1024,
            max_value_bytes: 4 * 1024 * 1024,
            max_connections: 4096,
            max_connections_per_ip: 1024,
            max_pending_handshakes: 256,
            handshake_timeout: ConfigDuration(Duration::from_secs(5)),
            frame_timeout: ConfigDuration(Duration::from_secs(30)),
            idle_timeout: ConfigDuration(Duration::from_secs(600)),
        }
    }
}

impl Limits {
    /// Bytes of keys and values one reply may carry: the frame limit less room for the encoding
    /// around them, so a reply that passes this check always fits its frame.
    pub fn max_reply_payload_bytes(&self) -> usize {
        (self.max_frame_bytes as usize).saturating_sub(REPLY_ENCODING_ALLOWANCE_BYTES)
    }
}

/// Room left in a reply's frame for the encoding around its keys and values (lengths, ids, tags):
/// at most a few bytes per element, and a reply has at most `BATCH_KEYS_MAX` of them.
pub const REPLY_ENCODING_ALLOWANCE_BYTES: usize = 64 * 1024;

/// Authentication and encryption (docs/security.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Security {
    /// Path of the file holding the cluster secret, which gives a client full access (relative
    /// paths are relative to the config file). When absent, the array accepts any client: fine on
    /// a laptop, never in production.
    pub secret_file: Option<PathBuf>,
    /// Path of the file holding the peer secret: the servers of the array prove it to each other
    /// on the group port. Required, and different from the cluster secret, so that no client
    /// credential ever reaches the Raft layer.
    pub peer_secret_file: Option<PathBuf>,
    /// Path of a credentials file (`[[credential]]` name, secret, access by cache-name prefix):
    /// clients with less than full access. Never sent to clients.
    pub credentials_file: Option<PathBuf>,
    /// TLS on the client, group and admin ports.
    pub tls: Option<TlsSettings>,
}

impl Security {
    /// A cluster secret and a peer secret in these files (the layout `ferrocotta up` and the
    /// tests write), nothing else.
    pub fn secret_files(secret_file: impl Into<PathBuf>, peer_secret_file: impl Into<PathBuf>) -> Security {
        Security {
            secret_file: Some(secret_file.into()),
            peer_secret_file: Some(peer_secret_file.into()),
            ..Security::default()
        }
    }
}

/// TLS of an array server. Paths may hold `{name}`, replaced by the server's name, so one document
/// serves every server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// This server's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The CA that signs every server's certificate (and client certificates), PEM. Peers always
    /// verify each other with it (mutual TLS on the group port); clients verify the servers.
    pub ca_file: PathBuf,
    /// Whether clients on the client and admin ports must show a certificate signed by the CA.
    #[serde(default)]
    pub require_client_cert: bool,
    /// How often the files are looked at again (they are also re-read on SIGHUP).
    #[serde(default = "default_tls_reload_interval")]
    pub reload_interval: ConfigDuration,
}

fn default_tls_reload_interval() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(60))
}

impl TlsSettings {
    /// The paths for one server: `{name}` replaced, relative paths resolved next to the config.
    pub fn files_for(&self, config_file: &Path, server_name: &str) -> crate::tls::TlsFiles {
        let resolve = |p: &Path| {
            let text = p.to_string_lossy().replace("{name}", server_name);
            ClusterConfig::resolve_path(config_file, Path::new(&text))
        };
        crate::tls::TlsFiles {
            cert_file: Some(resolve(&self.cert_file)),
            key_file: Some(resolve(&self.key_file)),
            ca_file: resolve(&self.ca_file),
        }
    }
}

/// Snapshot and compaction policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// Take a snapshot (and compact the log behind it) after this many applied entries.
    pub snapshot_every_entries: u64,
    /// Also take one once the log written since the last snapshot holds this many bytes or a
    /// quarter of the last snapshot's size, whichever is more: the log (which also costs memory)
    /// stays small next to the data however large the entries are, and a snapshot costs at most
    /// about four times the bytes written since the one before.
    pub snapshot_every_log_bytes: u64,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            snapshot_every_entries: 50_000,
            snapshot_every_log_bytes: 64 * 1024 * 1024,
        }
    }
}

/// One stripe: a Raft group of servers that hold the same slots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StripeConfig {
    /// Name shown in status output.
    pub name: String,
    /// The servers of the stripe; a server's Raft node id is its `id`, or else its position
    /// (from 1).
    pub servers: Vec<ServerConfig>,
    /// How many membership changes the stripe has committed since its cluster.toml (0 in a
    /// cluster.toml; the live document a server hands out carries its stripe's own).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// The hash slots the stripe owns, when they are named: after slots moved between stripes
    /// (`ferrocotta array rebalance`), every stripe's section names them. When no stripe names
    /// them, the slots are split evenly in stripe order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<SlotSet>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One array server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Unique name of the server in the array (`--name` on the command line).
    pub name: String,
    /// Its Raft node id in its stripe, when not its position: set for servers added to a running
    /// array (`ferrocotta array add-server`), whose ids are never reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Host name or address the other servers and the clients use to reach it.
    pub host: String,
    /// Client port.
    #[serde(default = "default_client_port")]
    pub port: u16,
    /// Raft traffic port.
    #[serde(default = "default_group_port")]
    pub group_port: u16,
    /// Admin HTTP port.
    #[serde(default = "default_admin_port")]
    pub admin_port: u16,
    /// Where the server keeps its log, vote and snapshots (relative to the config file).
    pub data_dir: PathBuf,
    /// The address its three ports listen on, when it is not `host`: `0.0.0.0` behind NAT or in
    /// a container, where the name others use does not belong to one of this host's interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_host: Option<String>,
    /// The Redis-protocol port (RESP2 and RESP3; docs/redis.md); none: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resp_port: Option<u16>,
}

fn default_client_port() -> u16 {
    DEFAULT_CLIENT_PORT
}
fn default_group_port() -> u16 {
    DEFAULT_GROUP_PORT
}
fn default_admin_port() -> u16 {
    DEFAULT_ADMIN_PORT
}

impl ServerConfig {
    /// The address its ports listen on: `listen_host`, else `host`.
    pub fn listen_host(&self) -> &str {
        self.listen_host.as_deref().unwrap_or(&self.host)
    }

    /// `host:port` of the client port.
    pub fn client_addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
    /// `host:port` of the group port.
    pub fn group_addr(&self) -> String {
        format!("{}:{}", self.host, self.group_port)
    }
    /// `host:port` of the admin port.
    pub fn admin_addr(&self) -> String {
        format!("{}:{}", self.host, self.admin_port)
    }
    /// `host:port` of the Redis-protocol port, when it has one.
    pub fn resp_addr(&self) -> Option<String> {
        self.resp_port.map(|p| format!("{}:{p}", self.host))
    }
}

/// Where a named server sits in the array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerPosition {
    /// Index of its stripe in `stripes`.
    pub stripe: usize,
    /// Index of the server in its stripe.
    pub index: usize,
    /// Its Raft node id: the server's `id`, or else its index plus one.
    pub id: u64,
}

impl ServerPosition {
    /// The Raft node id of this server within its stripe.
    pub fn node_id(&self) -> u64 {
        self.id
    }
}

impl ServerConfig {
    /// Its Raft node id, given its index in its stripe.
    pub fn node_id_at(&self, index: usize) -> u64 {
        self.id.unwrap_or(index as u64 + 1)
    }
}

impl ClusterConfig {
    /// Reads and validates a config file. Relative paths in it stay relative; use
    /// [`ClusterConfig::resolve_path`] to turn them into paths next to the file.
    pub fn load(path: &Path) -> Result<ClusterConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates a config document.
    pub fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
        let config: ClusterConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The document as TOML text, as written to disk and sent to clients.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a validated config always serializes")
    }

    /// Checks every rule a loaded config must follow.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.array_name.is_empty() || self.array_name.len() > 128 {
            return Err(field_err("array_name", "must be 1 to 128 characters"));
        }
        let t = &self.timing;
        if t.heartbeat_interval.0 < Duration::from_millis(10) {
            return Err(field_err("timing.heartbeat_interval", "must be at least 10ms"));
        }
        if t.election_timeout.0 < t.heartbeat_interval.0 * 3 {
            return Err(field_err(
                "timing.election_timeout",
                format!(
                    "must be at least 3 x heartbeat_interval ({:?}), or mirrors start elections while the active is healthy",
                    t.heartbeat_interval
                ),
            ));
        }
        if t.client_reconnect_window.0 < Duration::from_secs(1) {
            return Err(field_err("timing.client_reconnect_window", "must be at least 1s"));
        }
        let l = &self.limits;
        if l.max_frame_bytes < 64 * 1024 || l.max_frame_bytes > FRAME_BYTES_SETTING_MAX {
            return Err(field_err(
                "limits.max_frame_bytes",
                format!("must be between 65536 and {FRAME_BYTES_SETTING_MAX}"),
            ));
        }
        if l.max_key_bytes == 0 || l.max_key_bytes > l.max_frame_bytes / 4 {
            return Err(field_err(
                "limits.max_key_bytes",
                "must be between 1 and a quarter of max_frame_bytes",
            ));
        }
        if l.max_value_bytes == 0 || l.max_value_bytes > l.max_frame_bytes / 2 {
            return Err(field_err(
                "limits.max_value_bytes",
                "must be between 1 and half of max_frame_bytes",
            ));
        }
        if l.max_connections == 0 || l.max_connections_per_ip == 0 || l.max_pending_handshakes == 0 {
            return Err(field_err(
                "limits",
                "max_connections, max_connections_per_ip and max_pending_handshakes must be at least 1",
            ));
        }
        for (field, d, min) in [
            ("handshake_timeout", l.handshake_timeout, Duration::from_millis(100)),
            ("frame_timeout", l.frame_timeout, Duration::from_millis(100)),
            ("idle_timeout", l.idle_timeout, Duration::from_secs(1)),
        ] {
            if d.0 < min {
                return Err(field_err(
                    format!("limits.{field}"),
                    format!("must be at least {min:?}"),
                ));
            }
        }
        if self.security.peer_secret_file.is_none() {
            return Err(field_err(
                "security.peer_secret_file",
                "required: the servers authenticate to each other with a secret that clients do not hold \
                 (a file of at least 16 random bytes, different from secret_file)",
            ));
        }
        if self.security.peer_secret_file.is_some() && self.security.peer_secret_file == self.security.secret_file {
            return Err(field_err(
                "security.peer_secret_file",
                "must name another file than secret_file: a client credential must never be a peer's",
            ));
        }
        if let Some(tls) = &self.security.tls {
            if tls.reload_interval.0 < Duration::from_secs(1) {
                return Err(field_err("security.tls.reload_interval", "must be at least 1s"));
            }
        }
        if self.storage.snapshot_every_entries < 100 {
            return Err(field_err("storage.snapshot_every_entries", "must be at least 100"));
        }
        if self.storage.snapshot_every_log_bytes < 1024 * 1024 {
            return Err(field_err(
                "storage.snapshot_every_log_bytes",
                "must be at least 1 MiB (1048576)",
            ));
        }
        if self.stripes.is_empty() {
            return Err(field_err("stripes", "at least one stripe is needed"));
        }
        for (name, c) in &self.caches {
            if let Err(why) = crate::protocol::check_cache_name(name) {
                return Err(field_err(format!("caches.{name:?}"), why));
            }
            if c.max_entries == Some(0) {
                return Err(field_err(
                    format!("caches.\"{name}\".max_entries"),
                    "must be at least 1",
                ));
            }
            for (field, d) in [("ttl", c.ttl), ("tti", c.tti)] {
                if d.is_some_and(|d| d.0 < Duration::from_millis(1)) {
                    return Err(field_err(format!("caches.\"{name}\".{field}"), "must be at least 1ms"));
                }
            }
        }
        if self.stripes.len() > SLOT_COUNT as usize {
            return Err(field_err("stripes", format!("at most {SLOT_COUNT} stripes")));
        }
        let mut names = HashSet::new();
        let mut endpoints = HashSet::new();
        let mut stripe_names = HashSet::new();
        for (si, stripe) in self.stripes.iter().enumerate() {
            if stripe.name.is_empty() {
                return Err(field_err(format!("stripes[{si}].name"), "must not be empty"));
            }
            if !stripe_names.insert(stripe.name.as_str()) {
                return Err(field_err(
                    format!("stripes[{si}].name"),
                    format!("`{}` is used twice", stripe.name),
                ));
            }
            if self.names_slots() && stripe.slots.is_none() {
                return Err(field_err(
                    format!("stripes[{si}].slots"),
                    "missing: when one stripe names its slots, every stripe must",
                ));
            }
            if stripe.servers.is_empty() {
                return Err(field_err(
                    format!("stripes[{si}].servers"),
                    "a stripe needs at least one server",
                ));
            }
            if stripe.servers.len() > 7 {
                return Err(field_err(
                    format!("stripes[{si}].servers"),
                    "at most 7 servers per stripe",
                ));
            }
            let mut ids = HashSet::new();
            for (i, server) in stripe.servers.iter().enumerate() {
                let at = format!("stripes[{si}].servers[{i}]");
                if server.name.is_empty() || server.name.len() > 64 {
                    return Err(field_err(format!("{at}.name"), "must be 1 to 64 characters"));
                }
                if server
                    .name
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace() || c == '/')
                {
                    return Err(field_err(
                        format!("{at}.name"),
                        "may not hold spaces, control characters or `/`",
                    ));
                }
                if server.id == Some(0) || !ids.insert(server.node_id_at(i)) {
                    return Err(field_err(
                        format!("{at}.id"),
                        format!("node id {} is 0 or used twice in the stripe", server.node_id_at(i)),
                    ));
                }
                if !names.insert(server.name.clone()) {
                    return Err(field_err(
                        format!("{at}.name"),
                        format!("`{}` is used twice", server.name),
                    ));
                }
                if server.host.is_empty() {
                    return Err(field_err(format!("{at}.host"), "must not be empty"));
                }
                let ports = [
                    ("port", Some(server.port)),
                    ("group_port", Some(server.group_port)),
                    ("admin_port", Some(server.admin_port)),
                    ("resp_port", server.resp_port),
                ];
                for (field, port) in ports.into_iter().filter_map(|(f, p)| Some((f, p?))) {
                    if port == 0 {
                        return Err(field_err(format!("{at}.{field}"), "must not be 0"));
                    }
                    if !endpoints.insert((server.host.clone(), port)) {
                        return Err(field_err(
                            format!("{at}.{field}"),
                            format!("{}:{port} is already used by another port in this config", server.host),
                        ));
                    }
                }
                if server.data_dir.as_os_str().is_empty() {
                    return Err(field_err(format!("{at}.data_dir"), "must not be empty"));
                }
            }
        }
        Ok(())
    }

    /// Warnings that do not stop a server but that an operator must see.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for stripe in &self.stripes {
            match stripe.servers.len() {
                1 => out.push(format!("stripe `{}` has one server: it has no mirror and cannot fail over", stripe.name)),
                2 => out.push(format!(
                    "stripe `{}` has 2 servers: losing either stops writes (a majority of 2 is 2); it cannot fail over safely, use 3",
                    stripe.name
                )),
                n if n % 2 == 0 => out.push(format!(
                    "stripe `{}` has {n} servers: an even count tolerates no more failures than {}",
                    stripe.name,
                    n - 1
                )),
                _ => {}
            }
        }
        if self.security.secret_file.is_none() {
            out.push("no security.secret_file: any client that can reach the array may use it".to_string());
        }
        out
    }

    /// Finds a server by name.
    pub fn find_server(&self, name: &str) -> Option<(ServerPosition, &ServerConfig)> {
        self.stripes.iter().enumerate().find_map(|(stripe, s)| {
            s.servers.iter().position(|srv| srv.name == name).map(|index| {
                let srv = &s.servers[index];
                let id = srv.node_id_at(index);
                (ServerPosition { stripe, index, id }, srv)
            })
        })
    }

    /// The server at a position.
    pub fn server(&self, pos: ServerPosition) -> &ServerConfig {
        &self.stripes[pos.stripe].servers[pos.index]
    }

    /// Every server with its position, in config order.
    pub fn servers(&self) -> impl Iterator<Item = (ServerPosition, &ServerConfig)> {
        self.stripes.iter().enumerate().flat_map(|(stripe, s)| {
            s.servers.iter().enumerate().map(move |(index, srv)| {
                let id = srv.node_id_at(index);
                (ServerPosition { stripe, index, id }, srv)
            })
        })
    }

    /// Whether the stripes' sections name their slots (slots have moved since the first
    /// cluster.toml).
    pub fn names_slots(&self) -> bool {
        self.stripes.iter().any(|s| s.slots.is_some())
    }

    /// The slots owned by a stripe, by this document.
    pub fn stripe_slots(&self, stripe: usize) -> SlotSet {
        match &self.stripes[stripe].slots {
            Some(set) => set.clone(),
            None => {
                let r = SlotRange::for_stripe(stripe, self.stripes.len());
                SlotSet::range(r.start, r.end)
            }
        }
    }

    /// The stripe that owns a slot, by this document. A document merged from several servers'
    /// may name no owner for a slot that is moving; the even split's stripe is asked then, and
    /// its answer names the owner.
    pub fn stripe_of_slot(&self, slot: u16) -> usize {
        if self.names_slots() {
            if let Some(i) = self
                .stripes
                .iter()
                .position(|s| s.slots.as_ref().is_some_and(|set| set.contains(slot)))
            {
                return i;
            }
        }
        crate::slots::stripe_of_slot(slot, self.stripes.len())
    }

    /// The document with every stripe's section naming its slots (a section that names none
    /// holds its share of the even split): how documents are compared and written once slots
    /// have moved.
    pub fn with_slots_named(&self) -> ClusterConfig {
        let mut doc = self.clone();
        for (i, s) in doc.stripes.iter_mut().enumerate() {
            if s.slots.is_none() {
                s.slots = Some(self.stripe_slots(i));
            }
        }
        doc
    }

    /// The stripe that owns a key.
    pub fn stripe_of_key(&self, key: &[u8]) -> usize {
        self.stripe_of_slot(crate::slots::slot_of_key(key))
    }

    /// Checks that every slot has exactly one owner: the rule for a cluster.toml a server starts
    /// from (a document merged from servers' views may be caught in the middle of a move).
    pub fn check_slot_cover(&self) -> Result<(), ConfigError> {
        if !self.names_slots() {
            return Ok(());
        }
        let mut all = SlotSet::empty();
        for (i, _) in self.stripes.iter().enumerate() {
            let set = self.stripe_slots(i);
            if all.overlaps(&set) {
                return Err(field_err(
                    format!("stripes[{i}].slots"),
                    "overlaps another stripe's slots: every slot has one owner",
                ));
            }
            all.insert_set(&set);
        }
        if all.len() != SLOT_COUNT as usize {
            let mut missing = SlotSet::range(0, SLOT_COUNT);
            missing.remove_set(&all);
            return Err(field_err(
                "stripes.slots",
                format!("slots {missing} have no stripe: every slot has one owner"),
            ));
        }
        Ok(())
    }

    /// Resolves a path from the config relative to the directory of the config file.
    pub fn resolve_path(config_file: &Path, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            config_file.parent().unwrap_or_else(|| Path::new(".")).join(path)
        }
    }
}

/// Ports of one server in a generated config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerPorts {
    /// Client port.
    pub port: u16,
    /// Group port.
    pub group_port: u16,
    /// Admin port.
    pub admin_port: u16,
    /// Redis-protocol port, if any.
    pub resp_port: Option<u16>,
}

/// Builds the config of an array on one host (`ferrocotta up`, tests): `stripes` stripes of
/// `servers_per_stripe` servers named `a1, a2, ...`, data under `data/<name>` next to the config,
/// ports from `ports(i)` for the i-th server.
pub fn local_array(
    array_name: &str,
    host: &str,
    stripes: usize,
    servers_per_stripe: usize,
    security: Security,
    mut ports: impl FnMut(usize) -> ServerPorts,
) -> ClusterConfig {
    let mut n = 0;
    let stripes = (0..stripes)
        .map(|s| StripeConfig {
            name: format!("stripe-{}", s + 1),
            servers: (0..servers_per_stripe)
                .map(|_| {
                    let p = ports(n);
                    n += 1;
                    ServerConfig {
                        name: format!("a{n}"),
                        id: None,
                        host: host.to_string(),
                        port: p.port,
                        group_port: p.group_port,
                        admin_port: p.admin_port,
                        data_dir: PathBuf::from(format!("data/a{n}")),
                        listen_host: None,
                        resp_port: p.resp_port,
                    }
                })
                .collect(),
            generation: 0,
            slots: None,
        })
        .collect();
    ClusterConfig {
        array_name: array_name.to_string(),
        timing: Timing::default(),
        limits: Limits::default(),
        security,
        storage: Storage::default(),
        stripes,
        caches: Default::default(),
        layout: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
array_name = "test"
[security]
peer_secret_file = "peer-secret"
[timing]
election_timeout = "500ms"
heartbeat_interval = "100ms"
[[stripes]]
name = "s1"
[[stripes.servers]]
name = "a1"
host = "127.0.0.1"
port = 1
group_port = 2
admin_port = 3
data_dir = "a1"
"#;

    #[test]
    fn parses_a_minimal_config() {
        let c = ClusterConfig::parse(GOOD).unwrap();
        assert_eq!(c.timing.election_timeout.0, Duration::from_millis(500));
        assert_eq!(c.timing.client_reconnect_window.0, Duration::from_secs(120));
        let again = ClusterConfig::parse(&c.to_toml()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn errors_name_the_field() {
        let bad = GOOD.replace("port = 1\n", "port = 0\n");
        let err = ClusterConfig::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("stripes[0].servers[0].port"), "{err}");

        let bad = GOOD.replace("\"500ms\"", "\"soon\"");
        let err = ClusterConfig::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("election_timeout") && err.contains("soon"), "{err}");

        let bad = GOOD.replace("group_port = 2", "group_port = 1");
        let err = ClusterConfig::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("stripes[0].servers[0].group_port"), "{err}");

        let bad = GOOD.replace("array_name", "arry_name");
        let err = ClusterConfig::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("arry_name"), "{err}");

        let bad = GOOD.replace("[timing]", "[storage]\nsnapshot_every_log_bytes = 1000\n[timing]");
        let err = ClusterConfig::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("storage.snapshot_every_log_bytes"), "{err}");
    }

    /// Every cluster config shipped under `deploy/` parses and validates.
    #[test]
    fn deploy_configs_are_valid() {
        fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, found);
                } else if path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("cluster") && n.ends_with(".toml"))
                {
                    found.push(path);
                }
            }
        }
        let mut found = Vec::new();
        walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy"), &mut found);
        assert!(
            found.len() >= 2,
            "expected the local 1x3 and 2x3 configs, found {found:?}"
        );
        for path in found {
            let config = ClusterConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!config.stripes.is_empty(), "{}", path.display());
        }
    }

    #[test]
    fn small_stripes_are_warned_about() {
        let c = ClusterConfig::parse(GOOD).unwrap();
        assert!(c.warnings().iter().any(|w| w.contains("cannot fail over")));
    }
}
