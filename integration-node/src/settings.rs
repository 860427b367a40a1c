//! The node's settings: command line flags, optionally a `node.toml`, flags winning over the file.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Deserialize;

use crate::cluster_name::{effective_cluster_name, validate_cluster_name, validate_logical_name};

/// What to do when the array cannot be reached at start-up (SPEC 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OnStartupError {
    /// Log the error and exit non-zero.
    Shutdown,
    /// Run stand-alone with local state.
    Standalone,
}

/// Command line of `integration-node`.
#[derive(Debug, Parser)]
#[command(
    name = "integration-node",
    version,
    about = "An application server that clusters through a ferrocotta array"
)]
pub struct Args {
    /// Array servers as `host:port,host:port`, tried in order for the config download.
    #[arg(long, env = "FERROCOTTA_ARRAY_URLS")]
    pub array_urls: Option<String>,
    /// Name of the cluster; nodes with the same name and array form one cluster.
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Address of the service port [default: 0.0.0.0:5555].
    #[arg(long)]
    pub listen: Option<String>,
    /// Address of the admin port [default: 0.0.0.0:9999].
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// The host others reach this node's ports at, written into its member entry (the service
    /// and admin addresses the cluster console and `getMembers` show) when the ports listen on
    /// 0.0.0.0 or behind NAT [default: the listen address].
    #[arg(long, env = "FERROCOTTA_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Logical name, unique among live members [default: hostname:service-port].
    #[arg(long)]
    pub logical_name: Option<String>,
    /// The node's own folder: its identity, kept across restarts, so that a node restarted after
    /// a crash takes over the member entry its dead process left (one folder per node; without
    /// one the node must wait until the stale entry expires).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// A node.toml with further settings.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// File with the array's cluster secret, or with `--credential` that credential's secret.
    #[arg(long, env = "FERROCOTTA_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Reach the array with this named credential (the node's own, less than full access)
    /// instead of the cluster secret.
    #[arg(long, env = "FERROCOTTA_CREDENTIAL")]
    pub credential: Option<String>,
    /// The CA that signed the array's certificates: reach the array with TLS.
    #[arg(long)]
    pub array_tls_ca_file: Option<PathBuf>,
    /// The node's certificate for the array, when the array requires client certificates.
    #[arg(long, requires = "array_tls_ca_file")]
    pub array_tls_cert_file: Option<PathBuf>,
    /// The key of --array-tls-cert-file.
    #[arg(long, requires = "array_tls_cert_file")]
    pub array_tls_key_file: Option<PathBuf>,
    /// Serve the service and admin ports with TLS, with this certificate (with --tls-key-file).
    #[arg(long, requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The key of --tls-cert-file.
    #[arg(long, requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Require callers of the node's ports to show a certificate signed by this CA (mutual TLS).
    #[arg(long, requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// File with the admin token (default: a random token written next to nothing, printed once).
    #[arg(long, env = "FERROCOTTA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// What to do when the array cannot be reached at start-up [default: shutdown].
    #[arg(long, value_enum)]
    pub on_startup_error: Option<OnStartupError>,
    /// How long the URL list may take to yield the array's config [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,
}

/// node.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    array_urls: Option<String>,
    cluster_name: Option<String>,
    listen: Option<String>,
    admin_listen: Option<String>,
    advertise_host: Option<String>,
    logical_name: Option<String>,
    state_dir: Option<PathBuf>,
    secret_file: Option<PathBuf>,
    credential: Option<String>,
    admin_token_file: Option<PathBuf>,
    on_startup_error: Option<OnStartupError>,
    array_tls: Option<TlsFileSection>,
    tls: Option<TlsFileSection>,
    locks_held_max: Option<usize>,
    connect_timeout: Option<String>,
    session_timeout: Option<String>,
    session_max_bytes: Option<usize>,
    member_refresh_interval: Option<String>,
    request_timeout: Option<String>,
    client_keepalive_interval: Option<String>,
    lock_max_duration: Option<String>,
    sessions_nonstop: Option<ferrocotta::client::NonstopSettings>,
    jobs_missed_after: Option<String>,
    clock_skew_ms: Option<i64>,
    gd_ttl: Option<String>,
    gd_retention: Option<String>,
    #[serde(default)]
    gd_takeover: crate::gd::TakeoverSettings,
    #[serde(default)]
    remote: std::collections::HashMap<String, crate::services::remote::RemoteAlias>,
    gd_answer_delay: Option<String>,
    #[serde(default)]
    jobs: Vec<crate::jobs::model::JobSpec>,
}

/// A `[tls]` or `[array_tls]` section of node.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFileSection {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    /// `[tls]`: callers must show a certificate signed by this CA. `[array_tls]`: the CA that
    /// signed the array's certificates.
    ca_file: Option<PathBuf>,
}

/// TLS of the node's own ports.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// Certificate, key, and the CA client certificates must be signed by.
    pub files: ferrocotta::tls::TlsFiles,
    /// Whether callers must show a certificate.
    pub require_client_cert: bool,
}

/// Everything the node runs with (its `Debug` shows neither the secret nor the admin token).
#[derive(Clone)]
pub struct NodeSettings {
    /// The array's URL list.
    pub array_urls: String,
    /// The cluster name as given.
    pub cluster_name: String,
    /// The effective cluster name (periods replaced, long names shortened).
    pub effective_cluster_name: String,
    /// Service port address.
    pub listen: String,
    /// Admin port address.
    pub admin_listen: String,
    /// The host in the addresses the member entry gives, if not the bound one.
    pub advertise_host: Option<String>,
    /// Logical name, if given (else derived from the bound service port).
    pub logical_name: Option<String>,
    /// The node's state folder (identity across restarts), if it has one.
    pub state_dir: Option<PathBuf>,
    /// The array secret the node proves: the cluster secret, or its credential's.
    pub secret: Vec<u8>,
    /// The node's credential, if it has one (else `secret` is the cluster secret).
    pub credential: Option<String>,
    /// TLS to the array: the CA (and a client certificate when the array requires one).
    pub array_tls: Option<ferrocotta::tls::TlsFiles>,
    /// TLS of the node's own ports.
    pub tls: Option<NodeTls>,
    /// `pub.cache.lock` locks the node holds at most (each is held for the caller until released).
    pub locks_held_max: usize,
    /// Token the admin endpoints require.
    pub admin_token: String,
    /// Start-up failure policy.
    pub on_startup_error: OnStartupError,
    /// Bootstrap timeout.
    pub connect_timeout: Duration,
    /// Idle lifetime of a session (tti of its entry).
    pub session_timeout: Duration,
    /// Largest session, in bytes of JSON.
    pub session_max_bytes: usize,
    /// How often the node checks and refreshes its member entry.
    pub member_refresh_interval: Duration,
    /// Nonstop timeout of the node's own array operations.
    pub request_timeout: Duration,
    /// Keep-alive interval of the array client.
    pub keepalive_interval: Duration,
    /// `pub.storage` locks held longer than this may be broken by another requester.
    pub lock_max_duration: Duration,
    /// Nonstop settings of the sessions cache (what a session read or write does while the array
    /// does not answer); the default raises, which the services answer with 503.
    pub sessions_nonstop: Option<ferrocotta::client::NonstopSettings>,
    /// A scheduled firing not started this long after its time counts as missed (its job's
    /// missed-firing policy decides whether it still runs once).
    pub jobs_missed_after: Duration,
    /// Added to this node's wall clock (ms; a test's way to give a node a wrong clock). Firings
    /// are judged by the array's clock, so it changes nothing but estimates.
    pub clock_skew_ms: i64,
    /// Jobs declared in node.toml (`[[jobs]]`): created at start if no job of their id exists.
    pub jobs: Vec<crate::jobs::model::JobSpec>,
    /// Default ttl of a guaranteed-delivery transaction (30 min, as in the seed).
    pub gd_ttl: Duration,
    /// How long an ended or past-deadline transaction's record is kept.
    pub gd_retention: Duration,
    /// What a taken-over transaction of a service does (`[gd_takeover]`: service = "rerun" or
    /// "in_doubt"; in_doubt for a service not named).
    pub gd_takeover: crate::gd::TakeoverSettings,
    /// Remote clusters by alias (`[remote."alias"]`), for `pub.remote:invoke` and `pub.remote.gd:*`.
    pub remote: std::collections::HashMap<String, crate::services::remote::RemoteAlias>,
    /// How long `pub.remote.gd:invoke` waits between committing a transaction and answering (0;
    /// a test's way to kill a node after the commit and before the answer).
    pub gd_answer_delay: Duration,
}

/// Shortest admin token accepted.
pub const ADMIN_TOKEN_MIN_BYTES: usize = 16;

/// Default of `locks_held_max`.
pub const LOCKS_HELD_MAX_DEFAULT: usize = 10_000;

impl std::fmt::Debug for NodeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSettings")
            .field("array_urls", &self.array_urls)
            .field("cluster_name", &self.cluster_name)
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("advertise_host", &self.advertise_host)
            .field("logical_name", &self.logical_name)
            .field("credential", &self.credential)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("admin_token", &"<hidden>")
            .finish_non_exhaustive()
    }
}

fn duration(field: &str, v: Option<String>, default: Duration) -> anyhow::Result<Duration> {
    match v {
        None => Ok(default),
        Some(text) => {
            humantime::parse_duration(&text).with_context(|| format!("node.toml `{field}`: `{text}` is not a duration"))
        }
    }
}

impl NodeSettings {
    /// Merges flags over the file over defaults, and validates.
    pub fn from_args(args: Args) -> anyhow::Result<NodeSettings> {
        let file: NodeFile = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("{} is not a valid node.toml", path.display()))?
            }
            None => NodeFile::default(),
        };
        let Some(array_urls) = args.array_urls.or(file.array_urls) else {
            bail!("--array-urls (or array_urls in node.toml) is required");
        };
        let Some(cluster_name) = args.cluster_name.or(file.cluster_name) else {
            bail!("--cluster-name (or cluster_name in node.toml) is required");
        };
        validate_cluster_name(&cluster_name).map_err(anyhow::Error::msg)?;
        let logical_name = args.logical_name.or(file.logical_name);
        if let Some(n) = &logical_name {
            validate_logical_name(n).map_err(anyhow::Error::msg)?;
        }
        let secret = match args.secret_file.or(file.secret_file) {
            Some(p) => std::fs::read(&p)
                .with_context(|| format!("secret file {}", p.display()))?
                .trim_ascii()
                .to_vec(),
            None => Vec::new(),
        };
        let credential = args.credential.or(file.credential);
        if let Some(c) = &credential {
            ferrocotta::security::check_credential_name(c).map_err(|e| anyhow::anyhow!("--credential: {e}"))?;
        }
        let array_tls_file = file.array_tls.unwrap_or_default();
        let array_tls = match args.array_tls_ca_file.or(array_tls_file.ca_file) {
            None => None,
            Some(ca_file) => Some(ferrocotta::tls::TlsFiles {
                cert_file: args.array_tls_cert_file.or(array_tls_file.cert_file),
                key_file: args.array_tls_key_file.or(array_tls_file.key_file),
                ca_file,
            }),
        };
        let tls_file = file.tls.unwrap_or_default();
        let tls = match (
            args.tls_cert_file.or(tls_file.cert_file),
            args.tls_key_file.or(tls_file.key_file),
        ) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let client_ca = args.tls_client_ca_file.or(tls_file.ca_file);
                let require_client_cert = client_ca.is_some();
                Some(NodeTls {
                    files: ferrocotta::tls::TlsFiles {
                        cert_file: Some(cert.clone()),
                        key_file: Some(key),
                        // Without a client CA the verifier is never asked; the node's own chain serves.
                        ca_file: client_ca.unwrap_or(cert),
                    },
                    require_client_cert,
                })
            }
            _ => bail!("TLS of the node's ports needs both a certificate and its key"),
        };
        let admin_token = match args.admin_token_file.or(file.admin_token_file) {
            Some(p) => String::from_utf8_lossy(
                std::fs::read(&p)
                    .with_context(|| format!("admin token file {}", p.display()))?
                    .trim_ascii(),
            )
            .into_owned(),
            None => {
                let t: [u8; 16] = rand::random();
                let token: String = t.iter().map(|b| format!("{b:02x}")).collect();
                eprintln!("admin token (generated, pass --admin-token-file to choose one): {token}");
                token
            }
        };
        if admin_token.len() < ADMIN_TOKEN_MIN_BYTES {
            bail!(
                "the admin token must be at least {ADMIN_TOKEN_MIN_BYTES} characters (a random one: 128 bits or more)"
            );
        }
        let connect_timeout = match args.connect_timeout {
            Some(d) => d,
            None => duration("connect_timeout", file.connect_timeout, Duration::from_secs(30))?,
        };
        Ok(NodeSettings {
            array_urls,
            effective_cluster_name: effective_cluster_name(&cluster_name),
            cluster_name,
            listen: args.listen.or(file.listen).unwrap_or_else(|| "0.0.0.0:5555".into()),
            admin_listen: args
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or_else(|| "0.0.0.0:9999".into()),
            advertise_host: args.advertise_host.or(file.advertise_host).filter(|h| !h.is_empty()),
            logical_name,
            state_dir: args.state_dir.or(file.state_dir),
            secret,
            credential,
            array_tls,
            tls,
            locks_held_max: file.locks_held_max.unwrap_or(LOCKS_HELD_MAX_DEFAULT),
            admin_token,
            on_startup_error: args
                .on_startup_error
                .or(file.on_startup_error)
                .unwrap_or(OnStartupError::Shutdown),
            connect_timeout,
            session_timeout: duration("session_timeout", file.session_timeout, Duration::from_secs(3600))?,
            session_max_bytes: file.session_max_bytes.unwrap_or(64 * 1024),
            member_refresh_interval: duration(
                "member_refresh_interval",
                file.member_refresh_interval,
                Duration::from_secs(2),
            )?,
            request_timeout: duration("request_timeout", file.request_timeout, Duration::from_secs(10))?,
            keepalive_interval: duration(
                "client_keepalive_interval",
                file.client_keepalive_interval,
                Duration::from_secs(1),
            )?,
            lock_max_duration: duration("lock_max_duration", file.lock_max_duration, Duration::from_secs(180))?,
            sessions_nonstop: file.sessions_nonstop,
            jobs_missed_after: duration("jobs_missed_after", file.jobs_missed_after, Duration::from_secs(10))?,
            clock_skew_ms: file.clock_skew_ms.unwrap_or(0),
            jobs: file.jobs,
            gd_ttl: duration("gd_ttl", file.gd_ttl, Duration::from_secs(30 * 60))?,
            gd_retention: duration("gd_retention", file.gd_retention, Duration::from_secs(3600))?,
            gd_takeover: file.gd_takeover,
            remote: file.remote,
            gd_answer_delay: duration("gd_answer_delay", file.gd_answer_delay, Duration::ZERO)?,
        })
    }

    /// The array cache holding session data.
    pub fn sessions_cache(&self) -> String {
        format!(
            "{}{}",
            ferrocotta::console::SESSIONS_CACHE_PREFIX,
            self.effective_cluster_name
        )
    }

    /// The array cache of a `pub.storage` store.
    pub fn storage_cache(&self, store: &str) -> String {
        format!("ferrocotta.node.storage.{}.{store}", self.effective_cluster_name)
    }

    /// The array cache of a `pub.storage` store's lock records: another prefix than every store's
    /// values, so a store named `x.locks` never reaches the locks of store `x`.
    pub fn storage_locks_cache(&self, store: &str) -> String {
        format!("ferrocotta.node.storage_locks.{}.{store}", self.effective_cluster_name)
    }

    /// The array cache of guaranteed-delivery transactions.
    pub fn gd_cache(&self) -> String {
        format!("ferrocotta.node.gd.{}", self.effective_cluster_name)
    }

    /// The array cache of `demo:checkpointed` jobs.
    pub fn checkpoints_cache(&self) -> String {
        format!("ferrocotta.node.checkpoints.{}", self.effective_cluster_name)
    }

    /// The array cache holding the member list.
    pub fn members_cache(&self) -> String {
        format!(
            "{}{}",
            ferrocotta::console::MEMBERS_CACHE_PREFIX,
            self.effective_cluster_name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every node*.toml under deploy/ parses as node.toml, with valid names and durations.
    #[test]
    fn deploy_node_files_are_valid() {
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let mut found = Vec::new();
        let mut stack = vec![deploy];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                if path.is_dir() {
                    stack.push(path);
                } else if name.starts_with("node") && name.ends_with(".toml") {
                    found.push(path);
                }
            }
        }
        assert!(!found.is_empty(), "deploy/local/1x3/node.toml exists");
        for path in found {
            let text = std::fs::read_to_string(&path).unwrap();
            let file: NodeFile = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(file.array_urls.is_some(), "{}", path.display());
            validate_cluster_name(file.cluster_name.as_deref().unwrap_or_default()).unwrap();
            for (field, v) in [
                ("connect_timeout", file.connect_timeout),
                ("session_timeout", file.session_timeout),
                ("member_refresh_interval", file.member_refresh_interval),
                ("request_timeout", file.request_timeout),
                ("client_keepalive_interval", file.client_keepalive_interval),
                ("lock_max_duration", file.lock_max_duration),
            ] {
                duration(field, v, Duration::ZERO).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            }
        }
    }
}
