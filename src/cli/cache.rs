//! `ferrocotta cache get|put|remove|keys`.
//!
//! `get` prints the value and exits 0, or prints nothing and exits 1 when the key is absent;
//! `remove` exits 1 when there was nothing to remove; `lock` prints the id of the session holding
//! the lock, or exits 1 when it was not granted; `unlock` exits 1 when that session does not hold
//! it; any other failure exits 2 with the reason on stderr.

use std::io::Write;

use clap::{Args, Subcommand};

use ferrocotta::client::LockWait;
use ferrocotta::protocol::{ErrorReply, LockMode, PutOptions};
use ferrocotta::ClientError;

use super::ArrayArgs;

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Print the value of a key (exit 1 when absent).
    Get(KeyArgs),
    /// Set a key to a value.
    Put(PutArgs),
    /// Remove a key (exit 1 when absent).
    Remove(KeyArgs),
    /// List keys, one per line.
    Keys(KeysArgs),
    /// Take a lock on a key; prints the session id that holds it (exit 1 when not granted).
    Lock(LockArgs),
    /// Release a lock taken by `lock` (exit 1 when that session does not hold it).
    Unlock(UnlockArgs),
}

#[derive(Debug, Args)]
pub struct LockArgs {
    #[command(flatten)]
    array: ArrayArgs,
    /// Name of the cache.
    #[arg(long)]
    cache: String,
    /// The key.
    key: String,
    /// How long to wait when the lock is taken: `0` fails at once, `-1` waits forever.
    #[arg(long, default_value = "0", allow_hyphen_values = true)]
    wait_ms: i64,
    /// A shared lock instead of an exclusive one.
    #[arg(long)]
    shared: bool,
    /// Keep the lock (renewing the session) this long, then release it and exit. Without it the
    /// lock stays until `unlock --session` or until the session expires (the reconnect window).
    #[arg(long, value_parser = humantime::parse_duration)]
    hold: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
pub struct UnlockArgs {
    #[command(flatten)]
    array: ArrayArgs,
    /// Name of the cache.
    #[arg(long)]
    cache: String,
    /// The key.
    key: String,
    /// The session id `lock` printed.
    #[arg(long)]
    session: u64,
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    array: ArrayArgs,
    /// Name of the cache.
    #[arg(long)]
    cache: String,
    /// The key.
    key: String,
}

#[derive(Debug, Args)]
pub struct PutArgs {
    #[command(flatten)]
    array: ArrayArgs,
    /// Name of the cache.
    #[arg(long)]
    cache: String,
    /// The key.
    key: String,
    /// The value.
    value: String,
    /// Time to live of this entry (e.g. `30s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<std::time::Duration>,
    /// Time to idle of this entry (e.g. `10m`).
    #[arg(long, value_parser = humantime::parse_duration)]
    tti: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    array: ArrayArgs,
    /// Name of the cache.
    #[arg(long)]
    cache: String,
    /// Only keys starting with this.
    #[arg(long, default_value = "")]
    prefix: String,
    /// At most this many keys.
    #[arg(long, default_value_t = 10_000)]
    limit: usize,
}

fn print_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.write_all(b"\n")?;
    Ok(())
}

pub async fn run(cmd: CacheCommand) -> anyhow::Result<u8> {
    match cmd {
        CacheCommand::Get(a) => {
            let client = a.array.connect().await?;
            match client.get(&a.cache, a.key.as_bytes()).await? {
                Some(v) => {
                    print_bytes(&v)?;
                    Ok(0)
                }
                None => Ok(1),
            }
        }
        CacheCommand::Put(a) => {
            let client = a.array.connect().await?;
            let opts = PutOptions {
                ttl_ms: a.ttl.map(|d| d.as_millis() as u64),
                tti_ms: a.tti.map(|d| d.as_millis() as u64),
                session: None,
            };
            client
                .put_with(&a.cache, a.key.as_bytes(), a.value.as_bytes(), opts)
                .await?;
            Ok(0)
        }
        CacheCommand::Lock(a) => {
            let client = a.array.connect().await?;
            let mode = if a.shared {
                LockMode::Shared
            } else {
                LockMode::Exclusive
            };
            match client
                .lock(&a.cache, a.key.as_bytes(), mode, LockWait::from_millis(a.wait_ms))
                .await
            {
                Ok(handle) => {
                    println!("{}", handle.session);
                    if let Some(hold) = a.hold {
                        tokio::select! {
                            _ = tokio::time::sleep(hold) => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                        client.unlock(&handle).await?;
                        client.close().await;
                    }
                    Ok(0)
                }
                Err(ClientError::LockTimeout) => {
                    eprintln!("the lock was not granted within {} ms", a.wait_ms);
                    Ok(1)
                }
                Err(e) => Err(e.into()),
            }
        }
        CacheCommand::Unlock(a) => {
            let client = a.array.connect().await?;
            match client.unlock_session(&a.cache, a.key.as_bytes(), a.session).await {
                Ok(()) => Ok(0),
                Err(ClientError::Server(ErrorReply::NotLockHolder)) => {
                    eprintln!("session {} does not hold this lock", a.session);
                    Ok(1)
                }
                Err(e) => Err(e.into()),
            }
        }
        CacheCommand::Remove(a) => {
            let client = a.array.connect().await?;
            Ok(if client.remove(&a.cache, a.key.as_bytes()).await?.is_some() {
                0
            } else {
                1
            })
        }
        CacheCommand::Keys(a) => {
            let client = a.array.connect().await?;
            for k in client.all_keys(&a.cache, a.prefix.as_bytes(), a.limit).await? {
                print_bytes(&k)?;
            }
            Ok(0)
        }
    }
}
