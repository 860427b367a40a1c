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
    /// Address of the service port.
    #[arg(long)]
    pub listen: Option<String>,
    /// Address of the admin port.
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// Logical name, unique among live members (default `hostname:port`).
    #[arg(long)]
    pub logical_name: Option<String>,
    /// A node.toml with further settings.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// File with the array's shared secret.
    #[arg(long, env = "FERROCOTTA_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// File with the admin token (default: a random token written next to nothing, printed once).
    #[arg(long, env = "FERROCOTTA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// What to do when the array cannot be reached at start-up.
    #[arg(long, value_enum)]
    pub on_startup_error: Option<OnStartupError>,
    /// How long the URL list may take to yield the array's config.
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
    logical_name: Option<String>,
    secret_file: Option<PathBuf>,
    admin_token_file: Option<PathBuf>,
    on_startup_error: Option<OnStartupError>,
    connect_timeout: Option<String>,
    session_timeout: Option<String>,
    session_max_bytes: Option<usize>,
    member_refresh_interval: Option<String>,
    request_timeout: Option<String>,
    client_keepalive_interval: Option<String>,
    lock_max_duration: Option<String>,
    sessions_nonstop: Option<ferrocotta::client::NonstopSettings>,
}

/// Everything the node runs with.
#[derive(Debug, Clone)]
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
    /// Logical name, if given (else derived from the bound service port).
    pub logical_name: Option<String>,
    /// Shared secret of the array.
    pub secret: Vec<u8>,
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
        if admin_token.len() < 8 {
            bail!("the admin token must be at least 8 characters");
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
            logical_name,
            secret,
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
        })
    }

    /// The array cache holding session data.
    pub fn sessions_cache(&self) -> String {
        format!("ferrocotta.node.sessions.{}", self.effective_cluster_name)
    }

    /// The array cache of a `pub.storage` store.
    pub fn storage_cache(&self, store: &str) -> String {
        format!("ferrocotta.node.storage.{}.{store}", self.effective_cluster_name)
    }

    /// The array cache of `demo:checkpointed` jobs.
    pub fn checkpoints_cache(&self) -> String {
        format!("ferrocotta.node.checkpoints.{}", self.effective_cluster_name)
    }

    /// The array cache holding the member list.
    pub fn members_cache(&self) -> String {
        format!("ferrocotta.node.members.{}", self.effective_cluster_name)
    }
}
