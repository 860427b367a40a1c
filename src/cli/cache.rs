//! `ferrocotta cache get|put|remove|keys`.
//!
//! `get` prints the value and exits 0, or prints nothing and exits 1 when the key is absent;
//! `remove` exits 1 when there was nothing to remove; any other failure exits 2 with the reason on
//! stderr.

use std::io::Write;

use clap::{Args, Subcommand};

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
            client.put(&a.cache, a.key.as_bytes(), a.value.as_bytes()).await?;
            Ok(0)
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
