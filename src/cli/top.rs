//! `ferrocotta top`: the cluster console's facts live in a terminal (servers and roles, ops/s and
//! latency, integration nodes, caches, recent events), refreshed every second; `q` quits.
//! `--once` prints one plain frame for scripts.
//!
//! It reads `GET /v1/console` from an array server's admin port (`--admin`, else every server of
//! `--dir`'s `ferrocotta up`, else the admin ports named in the config downloaded through the
//! URL list), trying them in order until one answers.
//!
//! Exit code of `--once`: 0 when every stripe has an active, 1 when some stripe has none, 2 when
//! no admin port answered.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferrocotta::console::{clean, ArrayView, ServerView};
use ferrocotta::http::{request, Call};
use ferrocotta::tls::ClientTls;
use ferrocotta::ArrayClient;

use super::ArrayArgs;

/// Flags of `ferrocotta top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    array: ArrayArgs,
    /// Array admin ports (`host:port,host:port`) to read the console from; no secret needed.
    #[arg(long, env = "FERROCOTTA_ADMIN_URLS")]
    admin: Option<String>,
    /// Print one frame and exit (for scripts).
    #[arg(long)]
    once: bool,
    /// Time between two refreshes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

/// Deadline of one read of the console (the server gathers every server's view within 1.5 s).
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the console is read from.
struct Source {
    admins: Vec<String>,
    tls: Option<std::sync::Arc<ClientTls>>,
}

impl Source {
    async fn find(args: &TopArgs) -> anyhow::Result<Source> {
        let tls = args.array.tls()?;
        let strip = |a: &str| {
            a.trim()
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/')
                .to_string()
        };
        let admins: Vec<String> = if let Some(list) = &args.admin {
            list.split(',').filter(|a| !a.trim().is_empty()).map(strip).collect()
        } else if let Some(e) = args.array.local_endpoints()? {
            e.processes
                .iter()
                .filter(|p| p.role == "array")
                .map(|p| strip(&p.admin))
                .collect()
        } else {
            let client = ArrayClient::bootstrap(args.array.settings()?)
                .await
                .context("no --admin given, and the URL list gave no config")?;
            client
                .config()
                .stripes
                .iter()
                .flat_map(|s| s.servers.iter().map(|srv| srv.admin_addr()))
                .collect()
        };
        anyhow::ensure!(!admins.is_empty(), "no array admin port to read the console from");
        Ok(Source { admins, tls })
    }

    /// The console from the first admin port that answers; the errors of all otherwise.
    async fn read(&self) -> Result<ArrayView, String> {
        let mut errors = Vec::new();
        for admin in &self.admins {
            match request(admin, self.tls.as_deref(), Call::get("/v1/console", READ_TIMEOUT)).await {
                Ok((200, body)) => match serde_json::from_slice(&body) {
                    Ok(v) => return Ok(v),
                    Err(e) => errors.push(format!("{admin}: unreadable answer: {e}")),
                },
                Ok((code, _)) => errors.push(format!("{admin}: HTTP {code}")),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(errors.join("; "))
    }
}

pub async fn run(args: TopArgs) -> anyhow::Result<u8> {
    let source = Source::find(&args).await?;
    if args.once {
        return Ok(match source.read().await {
            Ok(view) => {
                print!("{}", frame(&view).join("\n"));
                println!();
                if every_stripe_has_an_active(&view) {
                    0
                } else {
                    1
                }
            }
            Err(e) => {
                eprintln!("ferrocotta top: no array admin port answered: {e}");
                2
            }
        });
    }
    live(source, args.interval).await?;
    Ok(0)
}

fn every_stripe_has_an_active(view: &ArrayView) -> bool {
    (0..view.stripes.len()).all(|s| view.active_of(s).is_some())
}

fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Requests of the last complete second over every server: (total, by kind, worst p50, worst p99).
fn last_second(view: &ArrayView) -> (u64, BTreeMap<String, u64>, u32, u32) {
    let (mut total, mut kinds, mut p50, mut p99) = (0, BTreeMap::new(), 0, 0);
    for v in view.servers.iter().filter_map(|s| s.view.as_ref()) {
        if let Some(s) = v.samples.last() {
            for (k, n) in &s.ops {
                total += *n as u64;
                *kinds.entry(k.clone()).or_insert(0) += *n as u64;
            }
            if !s.ops.is_empty() {
                p50 = p50.max(s.p50_us);
                p99 = p99.max(s.p99_us);
            }
        }
    }
    (total, kinds, p50, p99)
}

/// Total requests per second over every server, the last `n` seconds, oldest first.
fn ops_history(view: &ArrayView, n: usize) -> Vec<u64> {
    let mut by_second: BTreeMap<u64, u64> = BTreeMap::new();
    for v in view.servers.iter().filter_map(|s| s.view.as_ref()) {
        for s in &v.samples {
            *by_second.entry((s.t_ms + 500) / 1000).or_insert(0) += s.ops.values().map(|n| *n as u64).sum::<u64>();
        }
    }
    let values: Vec<u64> = by_second.into_values().collect();
    values[values.len().saturating_sub(n)..].to_vec()
}

fn lag_of(view: &ArrayView, v: &ServerView) -> String {
    if v.role == "active" {
        return "0".into();
    }
    match view
        .active_of(v.stripe)
        .and_then(|a| a.matched.get(&v.name).map(|m| (a, *m)))
    {
        Some((a, Some(m))) => a.last_log_index.saturating_sub(m).to_string(),
        Some((_, None)) => "?".into(),
        None => "-".into(),
    }
}

/// One frame as lines of text: what `--once` prints and the live view shows.
pub fn frame(view: &ArrayView) -> Vec<String> {
    let mut out = Vec::new();
    let answering = view.servers.iter().filter(|s| s.view.is_some()).count();
    let now = view
        .servers
        .iter()
        .filter_map(|s| s.view.as_ref())
        .map(|v| v.now_ms)
        .max()
        .unwrap_or(0);
    out.push(format!(
        "array {}: {} stripe(s), {}/{} servers answering, seen from {} at {} UTC",
        view.array_name,
        view.stripes.len(),
        answering,
        view.servers.len(),
        view.gathered_by,
        clock(now)
    ));
    out.push(String::new());
    out.push(format!(
        "{:<14} {:<12} {:<12} {:>6} {:>10} {:>10} {:>6} {:>8} {:>9}  CONFIG",
        "SERVER", "STRIPE", "ROLE", "TERM", "LAST_LOG", "APPLIED", "LAG", "CLIENTS", "SESSIONS"
    ));
    for s in &view.servers {
        let stripe = view.stripes.get(s.stripe).cloned().unwrap_or_default();
        match &s.view {
            Some(v) => out.push(format!(
                "{:<14} {:<12} {:<12} {:>6} {:>10} {:>10} {:>6} {:>8} {:>9}  {}",
                v.name,
                stripe,
                v.role,
                v.term,
                v.last_log_index,
                v.applied_index,
                lag_of(view, v),
                v.client_connections,
                v.session_count,
                v.config_digest
            )),
            None => out.push(format!(
                "{:<14} {:<12} {:<12} {}",
                s.name,
                stripe,
                "unreachable",
                clean(s.error.as_deref().unwrap_or("no answer"))
            )),
        }
    }
    let (total, kinds, p50, p99) = last_second(view);
    let top: Vec<String> = {
        let mut k: Vec<_> = kinds.into_iter().collect();
        k.sort_by_key(|b| std::cmp::Reverse(b.1));
        k.into_iter().take(6).map(|(k, n)| format!("{k} {n}")).collect()
    };
    out.push(String::new());
    out.push(format!(
        "ops/s {total} ({})   latency p50 {:.2} ms, p99 {:.2} ms (slowest server)",
        if top.is_empty() {
            "idle".to_string()
        } else {
            top.join(", ")
        },
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0
    ));

    out.push(String::new());
    let members = view.members();
    out.push(format!(
        "{:<12} {:<14} {:<9} {:<22} {:>8} {:>17}",
        "CLUSTER", "NODE", "STATE", "SERVICE", "REJOINS", "NONSTOP_TIMEOUTS"
    ));
    if members.is_empty() {
        out.push("(no integration node is in a member list)".into());
    }
    for (cluster, m) in &members {
        out.push(format!(
            "{:<12} {:<14} {:<9} {:<22} {:>8} {:>17}",
            clean(cluster),
            clean(&m.logical_name),
            clean(&m.state),
            clean(&m.service),
            m.rejoins,
            m.nonstop_timeouts
        ));
    }

    out.push(String::new());
    // Bytes are None where a stripe's cache was too large to count.
    let mut caches: BTreeMap<String, (u64, Option<u64>)> = BTreeMap::new();
    for stripe in 0..view.stripes.len() {
        if let Some(a) = view.active_of(stripe) {
            for (name, c) in &a.caches {
                let e = caches.entry(clean(name)).or_insert((0, Some(0)));
                e.0 += c.entries;
                e.1 = e.1.zip(c.bytes).map(|(a, b)| a + b);
            }
        }
    }
    out.push(format!("{:<40} {:>10} {:>12}", "CACHE", "ENTRIES", "BYTES"));
    for (name, (entries, bytes)) in &caches {
        let bytes = bytes.map(human_bytes).unwrap_or_else(|| "not counted".into());
        out.push(format!("{name:<40} {entries:>10} {bytes:>12}"));
    }

    out.push(String::new());
    out.push("RECENT EVENTS".into());
    let mut events: Vec<ferrocotta::console::Event> = view
        .servers
        .iter()
        .filter_map(|s| s.view.as_ref())
        .flat_map(|v| v.events.iter().cloned())
        .chain(members.iter().flat_map(|(_, m)| m.events.clone()))
        .collect();
    events.sort_by_key(|b| std::cmp::Reverse(b.t_ms));
    if events.is_empty() {
        out.push("(none)".into());
    }
    for e in events.iter().take(10) {
        out.push(format!(
            "{} {:<16} {:<10} {}",
            clock(e.t_ms),
            clean(&e.kind),
            clean(&e.source),
            clean(&e.text)
        ));
    }
    out
}

/// The live view until `q`, Esc or Ctrl-C.
async fn live(source: Source, interval: Duration) -> anyhow::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Color, Style};
    use ratatui::widgets::{Block, Paragraph, Sparkline};

    let mut terminal = ratatui::try_init().context("cannot take over the terminal (use --once without one)")?;
    let result = async {
        loop {
            let last = source.read().await;
            terminal.draw(|f| {
                let [head, spark, body] =
                    Layout::vertical([Constraint::Length(1), Constraint::Length(5), Constraint::Min(0)])
                        .areas(f.area());
                match &last {
                    Ok(view) => {
                        let lines = frame(view);
                        f.render_widget(
                            Paragraph::new(format!("{}   (q quits)", lines[0])).style(Style::new().fg(Color::Cyan)),
                            head,
                        );
                        let history = ops_history(view, spark.width.saturating_sub(2) as usize);
                        f.render_widget(
                            Sparkline::default()
                                .block(Block::bordered().title("ops/s, all servers"))
                                .data(&history)
                                .style(Style::new().fg(Color::Green)),
                            spark,
                        );
                        f.render_widget(Paragraph::new(lines[2..].join("\n")), body);
                    }
                    Err(e) => {
                        f.render_widget(
                            Paragraph::new(format!("no array admin port answered: {e}   (q quits)"))
                                .style(Style::new().fg(Color::Red)),
                            head,
                        );
                    }
                }
            })?;
            // Wait for the next refresh, or a key.
            let until = tokio::time::Instant::now() + interval;
            while tokio::time::Instant::now() < until {
                let quit = tokio::task::block_in_place(|| -> std::io::Result<bool> {
                    if event::poll(Duration::from_millis(100))? {
                        if let Event::Key(k) = event::read()? {
                            return Ok(matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                                || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL)));
                        }
                    }
                    Ok(false)
                })?;
                if quit {
                    return Ok::<(), anyhow::Error>(());
                }
            }
        }
    }
    .await;
    ratatui::restore();
    result
}
