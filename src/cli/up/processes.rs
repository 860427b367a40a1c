//! The processes `ferrocotta up` runs: started with their log in `DIR/logs/`, watched, restarted
//! when they die, stopped in order.
//!
//! A process that exits is reported at once with its exit status and the last lines its log got
//! in this run (the log is appended to across runs), so the cause (a port in use, a damaged data
//! folder) is on the terminal, not only in the file.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

/// Longest a stopping process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often exits are looked for.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);
/// Log lines shown when a process exits.
const LOG_TAIL_LINES: usize = 12;
/// Most of a log read for its tail.
const LOG_TAIL_BYTES_MAX: u64 = 64 * 1024;
/// Wait before a dead process is started again.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);
/// A process that exits this many times within [`RESTART_WINDOW`] is not restarted again.
pub const RESTARTS_MAX: usize = 3;
/// See [`RESTARTS_MAX`].
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// What a process is, for messages and for the stop order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Array,
    Node,
}

impl Kind {
    /// Its name in messages.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Array => "array server",
            Kind::Node => "integration node",
        }
    }
}

/// One process `up` runs, with what it needs to start it again.
#[derive(Debug)]
pub struct Proc {
    pub kind: Kind,
    pub name: String,
    program: PathBuf,
    args: Vec<OsString>,
    log_path: PathBuf,
    /// Where this start's part of the log begins.
    log_start: u64,
    child: Option<Child>,
    /// Process id of the current (or last) start.
    pub pid: u32,
    /// When it last exited, most recent last, within [`RESTART_WINDOW`].
    exits: VecDeque<Instant>,
    /// When a restart is due, if one is.
    restart_at: Option<Instant>,
}

/// A process that exited: what it was, how it ended, its last log lines.
#[derive(Debug)]
pub struct Exit {
    pub kind: Kind,
    pub name: String,
    pub status: ExitStatus,
    pub log_path: PathBuf,
    pub tail: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} exited ({})", self.kind.label(), self.name, self.status)?;
        if let Some(cause) = likely_cause(&self.tail) {
            write!(f, ": {cause}")?;
        }
        if self.tail.is_empty() {
            write!(f, "; its log {} is empty", self.log_path.display())
        } else {
            write!(f, "; last lines of {}:\n{}", self.log_path.display(), self.tail)
        }
    }
}

/// A plain-words cause for the failures a newcomer meets most, from the log's tail.
fn likely_cause(tail: &str) -> Option<&'static str> {
    if tail.contains("Address already in use") || tail.contains("address already in use") {
        Some("one of its ports is in use by another process")
    } else if tail.contains("Permission denied") {
        Some("permission denied (a file or a port below 1024?)")
    } else {
        None
    }
}

impl Proc {
    /// A process of `kind` named `name`, run as `program args`, logging to `DIR/logs/NAME.log`.
    pub fn new(kind: Kind, name: &str, program: &Path, args: Vec<OsString>, dir: &Path) -> Proc {
        Proc {
            kind,
            name: name.to_string(),
            program: program.to_path_buf(),
            args,
            log_path: dir.join("logs").join(format!("{name}.log")),
            log_start: 0,
            child: None,
            pid: 0,
            exits: VecDeque::new(),
            restart_at: None,
        }
    }

    /// Starts it (again), appending to its log.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        self.log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} {}", self.kind.label(), self.program.display()))?;
        self.pid = child.id().unwrap_or(0);
        self.child = Some(child);
        self.restart_at = None;
        Ok(())
    }

    /// The exit, if the process has exited since the last look.
    fn take_exit(&mut self) -> Option<Exit> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        let now = Instant::now();
        self.exits.push_back(now);
        while self
            .exits
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            self.exits.pop_front();
        }
        Some(Exit {
            kind: self.kind,
            name: self.name.clone(),
            status,
            log_path: self.log_path.clone(),
            tail: self.log_tail(),
        })
    }

    /// The last [`LOG_TAIL_LINES`] lines written to the log since the last start, indented.
    fn log_tail(&self) -> String {
        let Ok(mut file) = std::fs::File::open(&self.log_path) else {
            return String::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let from = self.log_start.max(len.saturating_sub(LOG_TAIL_BYTES_MAX));
        let mut bytes = Vec::new();
        if file.seek(SeekFrom::Start(from)).is_err() || file.read_to_end(&mut bytes).is_err() {
            return String::new();
        }
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..]
            .iter()
            .map(|l| format!("  | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Waits until one of `procs` exits and returns it (never returns while all run).
pub async fn first_exit(procs: &mut [Proc]) -> Exit {
    loop {
        if let Some(exit) = procs.iter_mut().find_map(Proc::take_exit) {
            return exit;
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

/// What one look at the processes found and did, for the caller to report.
#[derive(Debug)]
pub enum Event {
    /// It exited; it is started again after [`RESTART_DELAY`].
    WillRestart(Exit),
    /// It exited too often (or restarts are off): it stays down.
    StaysDown { exit: Exit, why: String },
    /// It was started again.
    Restarted { kind: Kind, name: String, pid: u32 },
    /// Starting it again failed.
    RestartFailed { kind: Kind, name: String, error: String },
}

/// One turn of supervision: notes exits and starts what is due again (unless `restart` is off).
pub fn supervise(procs: &mut [Proc], restart: bool) -> Vec<Event> {
    let mut events = Vec::new();
    let now = Instant::now();
    for p in procs.iter_mut() {
        if let Some(exit) = p.take_exit() {
            if !restart {
                events.push(Event::StaysDown {
                    exit,
                    why: "not restarted (--no-restart)".into(),
                });
            } else if p.exits.len() >= RESTARTS_MAX {
                events.push(Event::StaysDown {
                    exit,
                    why: format!(
                        "it exited {RESTARTS_MAX} times within {RESTART_WINDOW:?}, so it is not restarted again; fix the cause and run `ferrocotta up` again"
                    ),
                });
            } else {
                p.restart_at = Some(now + RESTART_DELAY);
                events.push(Event::WillRestart(exit));
            }
        }
        if p.restart_at.is_some_and(|at| at <= now) {
            match p.spawn() {
                Ok(()) => events.push(Event::Restarted {
                    kind: p.kind,
                    name: p.name.clone(),
                    pid: p.pid,
                }),
                Err(e) => {
                    p.restart_at = None;
                    events.push(Event::RestartFailed {
                        kind: p.kind,
                        name: p.name.clone(),
                        error: format!("{e:#}"),
                    });
                }
            }
        }
    }
    events
}

/// Stops every process: the nodes first (so they can leave the member list while the array still
/// answers), then the array servers; SIGTERM, then SIGKILL after [`STOP_GRACE`].
pub async fn stop_all(procs: &mut [Proc]) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for kind in [Kind::Node, Kind::Array] {
        let group: Vec<&mut Proc> = procs.iter_mut().filter(|p| p.kind == kind).collect();
        for p in &group {
            if let Some(pid) = p.child.as_ref().and_then(Child::id) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        for p in group {
            let Some(mut child) = p.child.take() else {
                continue;
            };
            match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                Ok(_) => eprintln!("stopped {} {}", p.kind.label(), p.name),
                Err(_) => {
                    let _ = child.kill().await;
                    eprintln!(
                        "killed {} {} (did not stop within {STOP_GRACE:?})",
                        p.kind.label(),
                        p.name
                    );
                }
            }
        }
    }
}
