//! Subcommands of the `ferrocotta` CLI, one module each.
//!
//! - [`up`]: a whole local cluster in one command (and `down` to stop one in the background).
//! - [`array`]: operations on a running array as a whole (a rolling restart).
//! - [`status`]: the array at a glance.
//! - [`cache`]: get, put, remove and list keys from a shell.
//! - [`bench`]: a load generator with latency percentiles.
//! - [`top`]: the cluster console's facts live in a terminal.
//! - [`jobs`]: scheduled jobs through an integration node's admin API.
//! - [`invoke`]: a service of the nodes through the failover client, optionally guaranteed.

mod array;
mod bench;
mod cache;
mod invoke;
mod jobs;
mod status;
mod stripes;
mod top;
mod up;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferrocotta::{ArrayClient, ClientSettings};

/// ferrocotta: clustered shared state for application servers.
#[derive(Debug, Parser)]
#[command(name = "ferrocotta", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local array and integration nodes on this machine and keep them running until
    /// Ctrl-C (or `down`).
    Up(up::UpArgs),
    /// Stop a `ferrocotta up` (one started with --detach, or in another terminal).
    Down(up::DownArgs),
    /// Show every server of an array: stripe, role, term, indexes.
    Status(status::StatusArgs),
    /// Operations on a running array as a whole: `restart --rolling`.
    #[command(subcommand)]
    Array(array::ArrayCommand),
    /// Read and write cache entries.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Load an array and report throughput and latency percentiles.
    Bench(bench::BenchArgs),
    /// The whole cluster live in the terminal (servers, ops/s, nodes, caches, events); `q` quits.
    Top(top::TopArgs),
    /// Scheduled jobs of a cluster of integration nodes (through any node's admin API).
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Invoke a service of a cluster of integration nodes, failing over between them (and with
    /// --gd under guaranteed delivery).
    Invoke(Box<invoke::InvokeArgs>),
}

/// How to reach an array; shared by every command that talks to one.
#[derive(Debug, Clone, Args)]
pub struct ArrayArgs {
    /// Array servers as `host:port,host:port`, tried in order for the config download.
    #[arg(long, env = "FERROCOTTA_ARRAY_URLS")]
    pub array_urls: Option<String>,
    /// The folder of a running `ferrocotta up`: its endpoints.json gives the URLs, the secret
    /// file, the CA and the array name (each flag above still wins).
    #[arg(long, env = "FERROCOTTA_DIR")]
    pub dir: Option<PathBuf>,
    /// File holding the array's cluster secret (`ferrocotta up` writes one into its folder), or
    /// with `--credential` that credential's secret.
    #[arg(long, env = "FERROCOTTA_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Connect with this named credential of the array's credentials file (less than full
    /// access) instead of the cluster secret.
    #[arg(long, env = "FERROCOTTA_CREDENTIAL")]
    pub credential: Option<String>,
    /// The CA that signed the array's certificates: connect with TLS (`ferrocotta up --tls` makes
    /// `DIR/tls/ca.crt`).
    #[arg(long, env = "FERROCOTTA_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// This client's certificate, when the array requires one (with --tls-key-file).
    #[arg(long, env = "FERROCOTTA_TLS_CERT_FILE", requires = "tls_ca_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The key of --tls-cert-file.
    #[arg(long, env = "FERROCOTTA_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// The array name to expect; refused if the servers belong to another array.
    #[arg(long, env = "FERROCOTTA_ARRAY_NAME")]
    pub array_name: Option<String>,
    /// How long the URL list may take to yield the config.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Deadline of each operation.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl ArrayArgs {
    /// The endpoints of the `ferrocotta up` named by `--dir`, if one is.
    pub fn local_endpoints(&self) -> anyhow::Result<Option<up::Endpoints>> {
        self.dir.as_deref().map(up::Endpoints::read).transpose()
    }

    /// The flags with what `--dir` gives filled in where they are absent.
    fn resolved(&self) -> anyhow::Result<ArrayArgs> {
        let mut args = self.clone();
        if let Some(e) = self.local_endpoints()? {
            args.array_urls.get_or_insert(e.array_urls);
            args.array_name.get_or_insert(e.array_name);
            if args.credential.is_none() {
                args.secret_file.get_or_insert(e.secret_file);
            }
            if let Some(ca) = e.tls_ca_file {
                args.tls_ca_file.get_or_insert(ca);
            }
        }
        Ok(args)
    }

    /// Client settings from the flags.
    pub fn settings(&self) -> anyhow::Result<ClientSettings> {
        let args = self.resolved()?;
        let Some(urls) = &args.array_urls else {
            anyhow::bail!(
                "which array? Give --array-urls (or FERROCOTTA_ARRAY_URLS), or --dir with the folder of a running `ferrocotta up` (or FERROCOTTA_DIR)"
            );
        };
        args.settings_for(urls)
    }

    fn settings_for(&self, urls: &str) -> anyhow::Result<ClientSettings> {
        let mut s = ClientSettings::new(urls)?;
        s.array_name = self.array_name.clone();
        s.connect_timeout = self.connect_timeout;
        s.request_timeout = self.timeout;
        // A command line tool should fail rather than wait forever for a dead stripe.
        s.max_connect_retries = Some(3);
        if let Some(path) = &self.secret_file {
            let bytes = std::fs::read(path).with_context(|| format!("--secret-file {}", path.display()))?;
            s.secret = bytes.trim_ascii().to_vec();
        }
        s.credential = self.credential.clone();
        s.tls = self.own_tls()?;
        Ok(s)
    }

    fn own_tls(&self) -> anyhow::Result<Option<std::sync::Arc<ferrocotta::tls::ClientTls>>> {
        let Some(ca) = &self.tls_ca_file else {
            return Ok(None);
        };
        let files = ferrocotta::tls::TlsFiles {
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
            ca_file: ca.clone(),
        };
        Ok(Some(ferrocotta::tls::ClientTls::load("ferrocotta", files)?))
    }

    /// TLS from the flags (or `--dir`'s CA), for talking to integration nodes: no array URLs needed.
    pub fn tls(&self) -> anyhow::Result<Option<std::sync::Arc<ferrocotta::tls::ClientTls>>> {
        self.resolved()?.own_tls()
    }

    /// A connected client.
    pub async fn connect(&self) -> anyhow::Result<ArrayClient> {
        Ok(ArrayClient::connect(self.settings()?).await?)
    }
}

/// Runs a parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Up(a) => up::run(a).await,
        Command::Down(a) => up::down(a).await,
        Command::Status(a) => status::run(a).await,
        Command::Array(c) => array::run(c).await,
        Command::Cache(c) => cache::run(c).await,
        Command::Bench(a) => bench::run(a).await,
        Command::Top(a) => top::run(a).await,
        Command::Jobs(c) => jobs::run(c).await,
        Command::Invoke(a) => invoke::run(*a).await,
    }
}
