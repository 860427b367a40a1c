//! `ferrocotta cache get|put|remove|exists|incr|keys|size|clear|lock|unlock`.
//!
//! `get` prints the value and exits 0, or prints nothing and exits 1 when the key is absent;
//! `remove` exits 1 when there was nothing to remove; `exists` exits 0 or 1; `incr` prints the new
//! value; `size` the number of entries; `lock` prints the id of the session holding the lock, or
//! exits 1 when it was not granted; `unlock` exits 1 when that session does not hold it; any
//! other failure exits 2 with the reason on stderr. With `--json` each prints one JSON object
//! instead (values as strings when they are UTF-8, else as `{"hex": "..."}`), and the exit codes
//! stay the same.

use std::io::Write;

use clap::{Args, Subcommand};
use ferrocotta::json_bytes::to_json;
use serde_json::{json, Value};

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
    /// Exit 0 when a key is present, 1 when absent.
    Exists(KeyArgs),
    /// Add to a decimal counter (absent counts as 0) and print the new value.
    Incr(IncrArgs),
    /// Print the number of entries of a cache (every stripe).
    Size(CacheArgs),
    /// Remove every entry of a cache (every stripe).
    Clear(CacheArgs),
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
    /// How long to wait when the lock is taken (e.g. `5s`): `0` fails at once, `forever` waits
    /// until it is granted.
    #[arg(long, default_value = "0", value_parser = parse_wait)]
    wait: LockWait,
    /// A shared lock instead of an exclusive one.
    #[arg(long)]
    shared: bool,
    /// Keep the lock (renewing the session) this long, then release it and exit. Without it the
    /// lock stays until `unlock --session` or until the session expires (the reconnect window).
    #[arg(long, value_parser = humantime::parse_duration)]
    hold: Option<std::time::Duration>,
    /// Print one JSON object instead of plain text.
    #[arg(long)]
    json: bool,
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
    /// Print one JSON object instead of plain text.
    #[arg(long)]
    json: bool,
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
    /// Print one JSON object instead of plain text.
    #[arg(long)]
    json: bool,
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
    /// Print one JSON object instead of plain text.
    #[arg(long)]
    json: bool,
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
    /// Print one JSON object instead of plain text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(flatten)]
    array: ArrayArgs,
    /// Name of the cache.
    #[arg(long)]
    cache: String,
    /// Print one JSON object instead of plain text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct IncrArgs {
    #[command(flatten)]
    array: ArrayArgs,
    /// Name of the cache.
    #[arg(long)]
    cache: String,
    /// The key.
    key: String,
    /// What to add (negative to subtract).
    #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
    by: i64,
    /// Print one JSON object instead of plain text.
    #[arg(long)]
    json: bool,
}

/// `--wait`: a duration, or `forever`.
fn parse_wait(text: &str) -> Result<LockWait, String> {
    match text {
        "forever" => Ok(LockWait::Forever),
        "0" => Ok(LockWait::NoWait),
        _ => match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => Ok(LockWait::NoWait),
            Ok(d) => Ok(LockWait::For(d)),
            Err(e) => Err(format!(
                "`{text}` is neither a duration (like 5s or 500ms) nor `forever`: {e}"
            )),
        },
    }
}

fn print_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.write_all(b"\n")?;
    Ok(())
}

fn print_json(value: Value) -> anyhow::Result<()> {
    println!("{value}");
    Ok(())
}

pub async fn run(cmd: CacheCommand) -> anyhow::Result<u8> {
    match cmd {
        CacheCommand::Get(a) => {
            let client = a.array.connect().await?;
            let value = client.get(&a.cache, a.key.as_bytes()).await?;
            match (&value, a.json) {
                (_, true) => print_json(json!({
                    "key": a.key,
                    "found": value.is_some(),
                    "value": value.as_deref().map(to_json),
                }))?,
                (Some(v), false) => print_bytes(v)?,
                (None, false) => {}
            }
            Ok(if value.is_some() { 0 } else { 1 })
        }
        CacheCommand::Put(a) => {
            let client = a.array.connect().await?;
            let opts = PutOptions {
                ttl_ms: a.ttl.map(|d| d.as_millis() as u64),
                tti_ms: a.tti.map(|d| d.as_millis() as u64),
                session: None,
            };
            let previous = client
                .put_with(&a.cache, a.key.as_bytes(), a.value.as_bytes(), opts)
                .await?;
            if a.json {
                print_json(json!({ "key": a.key, "previous": previous.as_deref().map(to_json) }))?;
            }
            Ok(0)
        }
        CacheCommand::Remove(a) => {
            let client = a.array.connect().await?;
            let previous = client.remove(&a.cache, a.key.as_bytes()).await?;
            if a.json {
                print_json(json!({
                    "key": a.key,
                    "removed": previous.is_some(),
                    "previous": previous.as_deref().map(to_json),
                }))?;
            }
            Ok(if previous.is_some() { 0 } else { 1 })
        }
        CacheCommand::Exists(a) => {
            let client = a.array.connect().await?;
            let exists = client.contains(&a.cache, a.key.as_bytes()).await?;
            if a.json {
                print_json(json!({ "key": a.key, "exists": exists }))?;
            }
            Ok(if exists { 0 } else { 1 })
        }
        CacheCommand::Incr(a) => {
            let client = a.array.connect().await?;
            let value = client.increment(&a.cache, a.key.as_bytes(), a.by).await?;
            match a.json {
                true => print_json(json!({ "key": a.key, "value": value }))?,
                false => println!("{value}"),
            }
            Ok(0)
        }
        CacheCommand::Size(a) => {
            let client = a.array.connect().await?;
            let entries = client.size(&a.cache).await?;
            match a.json {
                true => print_json(json!({ "cache": a.cache, "entries": entries }))?,
                false => println!("{entries}"),
            }
            Ok(0)
        }
        CacheCommand::Clear(a) => {
            let client = a.array.connect().await?;
            client.clear(&a.cache).await?;
            if a.json {
                print_json(json!({ "cache": a.cache, "cleared": true }))?;
            }
            Ok(0)
        }
        CacheCommand::Keys(a) => {
            let client = a.array.connect().await?;
            let keys = client.all_keys(&a.cache, a.prefix.as_bytes(), a.limit).await?;
            match a.json {
                true => print_json(json!({ "keys": keys.iter().map(|k| to_json(k)).collect::<Vec<_>>() }))?,
                false => {
                    for k in keys {
                        print_bytes(&k)?;
                    }
                }
            }
            Ok(0)
        }
        CacheCommand::Lock(a) => {
            let client = a.array.connect().await?;
            let mode = if a.shared {
                LockMode::Shared
            } else {
                LockMode::Exclusive
            };
            match client.lock(&a.cache, a.key.as_bytes(), mode, a.wait).await {
                Ok(handle) => {
                    match a.json {
                        true => print_json(json!({ "key": a.key, "granted": true, "session": handle.session }))?,
                        false => println!("{}", handle.session),
                    }
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
                    match a.json {
                        true => print_json(json!({ "key": a.key, "granted": false }))?,
                        false => match a.wait {
                            LockWait::For(d) => {
                                eprintln!("the lock was not granted within {}", humantime::format_duration(d))
                            }
                            _ => eprintln!("the lock is held by another session"),
                        },
                    }
                    Ok(1)
                }
                Err(e) => Err(e.into()),
            }
        }
        CacheCommand::Unlock(a) => {
            let client = a.array.connect().await?;
            let released = match client.unlock_session(&a.cache, a.key.as_bytes(), a.session).await {
                Ok(()) => true,
                Err(ClientError::Server(ErrorReply::NotLockHolder)) => false,
                Err(e) => return Err(e.into()),
            };
            match (a.json, released) {
                (true, _) => print_json(json!({ "key": a.key, "session": a.session, "released": released }))?,
                (false, false) => eprintln!("session {} does not hold this lock", a.session),
                (false, true) => {}
            }
            Ok(if released { 0 } else { 1 })
        }
    }
}
