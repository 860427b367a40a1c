//! `ferrocotta up --detach` and `ferrocotta down`: the local cluster in the background.
//!
//! A running `up` owns its folder through `DIR/up.pid`: a second `up` on the same folder is
//! refused (it would fight the first over ports and data), and `down` reads the pid to stop it.
//! `--detach` starts `up` again as its own process group, its output in `DIR/logs/up.log`, and
//! returns once that `up` prints that everything serves (or with its log when it fails).

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The line `up` prints once everything serves (the last of its table).
pub const READY_LINE: &str = "press Ctrl-C to stop everything";
/// Longest `down` waits for `up` to stop everything (each group gets up to 10 s of grace).
const DOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest `--detach` waits for the cluster to serve (beyond `up`'s own ready timeout, which
/// ends the background `up` itself).
const DETACH_TIMEOUT: Duration = Duration::from_secs(300);

/// `DIR/up.pid` while an `up` runs; removed when it ends.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

/// The pid of the `ferrocotta up` that runs in `dir`, if one does.
fn running_up(dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join("up.pid")).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    // Alive, and still a ferrocotta (a pid left by an `up` that was killed may be reused).
    kill(Pid::from_raw(pid), None).ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline).contains("ferrocotta").then_some(pid)
}

impl PidFile {
    /// Claims `dir` for this process, unless another `up` runs there.
    pub fn claim(dir: &Path) -> anyhow::Result<PidFile> {
        if let Some(pid) = running_up(dir) {
            if pid != std::process::id() as i32 {
                bail!(
                    "another `ferrocotta up` (pid {pid}) runs with {}; stop it first (Ctrl-C in its terminal, or `ferrocotta down --dir {}`)",
                    dir.display(),
                    dir.display()
                );
            }
        }
        let path = dir.join("up.pid");
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(PidFile { path })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts this `up` command again in the background and waits until it serves.
pub async fn detach(dir: &Path) -> anyhow::Result<u8> {
    std::fs::create_dir_all(dir.join("logs")).with_context(|| format!("cannot create {}", dir.display()))?;
    let log_path = dir.join("logs").join("up.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let start = log.metadata()?.len();
    let exe = std::env::current_exe().context("cannot find the ferrocotta binary's path")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).filter(|a| a != "--detach").collect();
    let mut child = std::process::Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C in this terminal later does not reach it.
        .process_group(0)
        .spawn()
        .context("cannot start ferrocotta up in the background")?;
    let deadline = Instant::now() + DETACH_TIMEOUT;
    loop {
        let text = read_from(&log_path, start);
        if let Some(at) = text.find(READY_LINE) {
            print!("{}", &text[..at]);
            println!(
                "running in the background (pid {}), its output in {}; stop everything with `ferrocotta down --dir {}`",
                child.id(),
                log_path.display(),
                dir.display()
            );
            return Ok(0);
        }
        if let Some(status) = child.try_wait()? {
            eprint!("{text}");
            eprintln!("ferrocotta up in the background ended ({status}) before the cluster served");
            return Ok(status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .filter(|c| *c != 0)
                .unwrap_or(2));
        }
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            eprint!("{text}");
            bail!("the cluster did not serve within {DETACH_TIMEOUT:?}; the background `up` was stopped");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `path` holds from byte `from` on.
fn read_from(path: &Path, from: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(from)).is_ok() {
            let _ = f.read_to_end(&mut bytes);
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether `pid` runs (a zombie, ended but not yet reaped by its parent, does not).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Flags of `ferrocotta down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// The folder of the `ferrocotta up` to stop.
    #[arg(long, env = "FERROCOTTA_DIR", default_value = "ferrocotta-local")]
    dir: PathBuf,
}

/// Stops the `up` running in the folder (which stops everything it started) and waits for it.
/// Exit 1 when none runs there.
pub async fn down(args: DownArgs) -> anyhow::Result<u8> {
    let Some(pid) = running_up(&args.dir) else {
        eprintln!("no `ferrocotta up` runs with {}", args.dir.display());
        return Ok(1);
    };
    kill(Pid::from_raw(pid), Signal::SIGTERM).with_context(|| format!("cannot signal ferrocotta up (pid {pid})"))?;
    let deadline = Instant::now() + DOWN_TIMEOUT;
    while alive(pid) {
        if Instant::now() >= deadline {
            bail!("ferrocotta up (pid {pid}) did not stop within {DOWN_TIMEOUT:?}; see its log");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("stopped ferrocotta up (pid {pid}) and everything it started");
    Ok(0)
}
