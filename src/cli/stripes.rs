//! `ferrocotta array add-stripe | rebalance | remove-stripe`: changing the array's stripes while
//! it serves (docs/operations.md "Adding and removing stripes").
//!
//! A slot moves from stripe A to stripe B in four steps, each one entry in one stripe's log
//! (cache-array's `slot_moves`): A freezes it, B imports A's entries of it, B owns it, A releases
//! it. This command drives them through each stripe's active (`POST /v1/slots/...`, proved with
//! the peer secret) and, when it starts, first finishes any move a previous run left half done,
//! so a move cut short by a failover or a killed command is completed by running it again.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use ferrocotta::config::{ClusterConfig, ServerConfig, StripeConfig};
use ferrocotta::slots::{SlotSet, SLOT_COUNT};

use super::array::{Admin, ChangeArgs};

/// Flags of `ferrocotta array add-stripe`.
#[derive(Debug, Args)]
pub struct AddStripeArgs {
    /// The new stripe's name (with --out).
    #[arg(long)]
    name: Option<String>,
    /// A server of the new stripe, `NAME=HOST:CLIENT_PORT:GROUP_PORT:ADMIN_PORT` (repeat it; three
    /// servers is usual). Its data folder is `data/NAME` beside the written file.
    #[arg(long = "server")]
    servers: Vec<String>,
    /// Write the array's cluster.toml with the new stripe here: every server of the new stripe
    /// starts from this file (`cache-array --config FILE --name NAME`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A file `--out` wrote, whose new stripe's servers run now: register the stripe with the
    /// array (it owns no slot until `ferrocotta array rebalance`).
    #[arg(long, conflicts_with_all = ["name", "servers", "out"])]
    config: Option<PathBuf>,
    /// How long the new stripe's servers may take to elect an active (with --config).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    wait: Duration,
    #[command(flatten)]
    change: ChangeArgs,
}

/// Flags of `ferrocotta array rebalance`.
#[derive(Debug, Args)]
pub struct RebalanceArgs {
    /// Slots moved in one step: each is unavailable for the time its step takes (its entries'
    /// copy), so fewer means shorter pauses and more steps.
    #[arg(long, default_value_t = 128)]
    batch_slots: u16,
    /// Move at most this many slots in this run (0: until balanced).
    #[arg(long, default_value_t = 0)]
    max_slots: usize,
    #[command(flatten)]
    change: ChangeArgs,
}

/// Flags of `ferrocotta array remove-stripe`.
#[derive(Debug, Args)]
pub struct RemoveStripeArgs {
    /// The stripe to remove (by name): it must be the last one.
    name: String,
    /// Slots moved in one step (as for `rebalance`).
    #[arg(long, default_value_t = 128)]
    batch_slots: u16,
    #[command(flatten)]
    change: ChangeArgs,
}

/// The array's document as its stripes have it now, with every stripe's slots named.
async fn current_document(admin: &Admin) -> ClusterConfig {
    admin.client.refresh_document().await;
    admin.config().with_slots_named()
}

/// Gives stripes `0..tell` the array's new list of stripes (one roster entry each).
async fn give_layout(admin: &Admin, tell: usize, version: u64, stripes: &[StripeConfig]) -> anyhow::Result<()> {
    let body = serde_json::to_vec(&serde_json::json!({"version": version, "stripes": stripes}))?;
    for i in 0..tell {
        let answer = admin
            .change(i, hyper::Method::POST, "/v1/slots/layout", body.clone())
            .await
            .with_context(|| format!("stripe {i} did not take the new layout"))?;
        println!("stripe {i}: {}", answer["message"].as_str().unwrap_or_default());
    }
    Ok(())
}

/// `ferrocotta array add-stripe`.
pub async fn add_stripe(args: AddStripeArgs) -> anyhow::Result<u8> {
    let admin = Admin::connect(&args.change).await?;
    match (&args.config, &args.out) {
        (Some(file), _) => register_stripe(&admin, file, args.wait).await,
        (None, Some(out)) => {
            let name = args.name.as_deref().context("--name: the new stripe's name")?;
            if args.servers.is_empty() {
                bail!("--server NAME=HOST:CLIENT_PORT:GROUP_PORT:ADMIN_PORT: the new stripe needs servers (three is usual)");
            }
            let servers = args
                .servers
                .iter()
                .map(|s| parse_server(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut doc = current_document(&admin).await;
            doc.stripes.push(StripeConfig {
                name: name.to_string(),
                servers,
                generation: 0,
                slots: Some(SlotSet::empty()),
            });
            doc.layout += 1;
            let text = doc.to_toml();
            let checked = ClusterConfig::parse(&text).context("the array with this stripe would be invalid")?;
            checked.check_slot_cover().context("the array's slots")?;
            std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} (stripe {} `{name}`, layout {})",
                out.display(),
                doc.stripes.len() - 1,
                doc.layout
            );
            println!(
                "start each of its servers from it: cache-array --config {} --name NAME",
                out.display()
            );
            println!(
                "then register the stripe: ferrocotta array add-stripe --config {}, and move slots to it: ferrocotta array rebalance",
                out.display()
            );
            Ok(0)
        }
        (None, None) => bail!("either --out FILE (write the new cluster.toml) or --config FILE (register the stripe)"),
    }
}

/// `NAME=HOST:CLIENT:GROUP:ADMIN`.
fn parse_server(text: &str) -> anyhow::Result<ServerConfig> {
    let (name, rest) = text
        .split_once('=')
        .with_context(|| format!("--server {text}: expected NAME=HOST:CLIENT_PORT:GROUP_PORT:ADMIN_PORT"))?;
    let parts: Vec<&str> = rest.rsplitn(4, ':').collect();
    let [admin, group, client, host] = parts[..] else {
        bail!("--server {text}: expected NAME=HOST:CLIENT_PORT:GROUP_PORT:ADMIN_PORT");
    };
    let port = |p: &str| -> anyhow::Result<u16> { p.parse().with_context(|| format!("--server {text}: bad port {p}")) };
    Ok(ServerConfig {
        name: name.to_string(),
        id: None,
        host: host.to_string(),
        port: port(client)?,
        group_port: port(group)?,
        admin_port: port(admin)?,
        data_dir: PathBuf::from(format!("data/{name}")),
        listen_host: None,
        resp_port: None,
    })
}

/// Waits until every stripe of `file` the array does not know has an active, then gives every
/// stripe the file's layout.
async fn register_stripe(admin: &Admin, file: &std::path::Path, wait: Duration) -> anyhow::Result<u8> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let planned = ClusterConfig::parse(&text).with_context(|| file.display().to_string())?;
    let doc = current_document(admin).await;
    if planned.layout <= doc.layout {
        if planned.stripes.len() == doc.stripes.len() {
            println!("the array has this layout already ({} stripes)", doc.stripes.len());
            return Ok(0);
        }
        bail!(
            "{} has layout {}, and the array is at {}: write a new one with --out",
            file.display(),
            planned.layout,
            doc.layout
        );
    }
    for stripe in &planned.stripes[doc.stripes.len().min(planned.stripes.len())..] {
        wait_for_active(admin, stripe, wait).await?;
        println!("stripe `{}` serves", stripe.name);
    }
    give_layout(admin, doc.stripes.len(), planned.layout, &planned.stripes).await?;
    admin.client.refresh_document().await;
    println!(
        "the array has {} stripes; move slots to the new one: ferrocotta array rebalance",
        admin.config().stripes.len()
    );
    Ok(0)
}

/// Waits until one of a stripe's servers says it is the active.
async fn wait_for_active(admin: &Admin, stripe: &StripeConfig, wait: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        for server in &stripe.servers {
            let call = ferrocotta::http::Call::get("/v1/status", Duration::from_secs(2));
            if let Ok((200, body)) = ferrocotta::http::request(&server.admin_addr(), admin.tls.as_deref(), call).await {
                let status: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if status["role"] == "active" {
                    return Ok(());
                }
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "stripe `{}` has no active after {wait:?}: are its servers started from the new file?",
                stripe.name
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What moving slots did.
#[derive(Debug, Default)]
struct MoveTotals {
    slots: usize,
    entries: u64,
    bytes: u64,
    steps: usize,
    /// Longest time from a freeze to the new owner taking the slots.
    longest_pause: Duration,
    /// Slots that could not move (session-owned entries or locks), with why.
    stuck: Vec<(SlotSet, String)>,
    elapsed: Duration,
}

impl MoveTotals {
    fn print(&self) {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        println!(
            "moved {} slots in {} steps: {} entries, {:.1} MB in {:.2}s ({:.0} entries/s, {:.2} MB/s); longest pause of a moving slot {} ms",
            self.slots,
            self.steps,
            self.entries,
            self.bytes as f64 / 1e6,
            secs,
            self.entries as f64 / secs,
            self.bytes as f64 / 1e6 / secs,
            self.longest_pause.as_millis()
        );
        for (slots, why) in &self.stuck {
            println!("not moved: slots {slots}: {why}");
        }
    }
}

fn step_body(slots: &SlotSet, stripe: usize) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(
        &serde_json::json!({"slots": slots, "stripe": stripe}),
    )?)
}

/// Moves `slots` from stripe `from` to stripe `to`: freeze, import, own, release. Slots that hold
/// what cannot move are unfrozen again and reported; whether they moved.
async fn move_slots(
    admin: &Admin,
    from: usize,
    to: usize,
    slots: &SlotSet,
    totals: &mut MoveTotals,
) -> anyhow::Result<bool> {
    admin
        .change(from, hyper::Method::POST, "/v1/slots/freeze", step_body(slots, to)?)
        .await
        .with_context(|| format!("freezing slots {slots} on stripe {from}"))?;
    let frozen_at = Instant::now();
    let moved = finish_move(admin, from, to, slots, totals).await?;
    totals.longest_pause = totals.longest_pause.max(frozen_at.elapsed());
    Ok(moved)
}

/// Steps 2-4 of a move whose slots `from` has frozen; whether they moved.
async fn finish_move(
    admin: &Admin,
    from: usize,
    to: usize,
    slots: &SlotSet,
    totals: &mut MoveTotals,
) -> anyhow::Result<bool> {
    let post = hyper::Method::POST;
    admin
        .change(to, post.clone(), "/v1/slots/begin-import", step_body(slots, from)?)
        .await
        .with_context(|| format!("stripe {to} preparing to import slots {slots}"))?;
    // Either stripe may say the slots cannot move now (what a session owns, see
    // cache-array/src/slot_moves.rs): they go back to their stripe, and what the other imported
    // is dropped.
    let cannot_move = |e: &anyhow::Error| e.to_string().contains("cannot move");
    let exported = match admin
        .send(from, post.clone(), "/v1/slots/export", step_body(slots, to)?)
        .await
    {
        Ok(bytes) => bytes,
        Err(e) if cannot_move(&e) => return give_back(admin, from, to, slots, totals, e).await,
        Err(e) => return Err(e).with_context(|| format!("exporting slots {slots} from stripe {from}")),
    };
    let imported = match admin
        .change(to, post.clone(), "/v1/slots/import", exported.to_vec())
        .await
    {
        Ok(imported) => imported,
        Err(e) if cannot_move(&e) => return give_back(admin, from, to, slots, totals, e).await,
        Err(e) => return Err(e).with_context(|| format!("importing slots {slots} into stripe {to}")),
    };
    admin
        .change(to, post, "/v1/slots/own", step_body(slots, from)?)
        .await
        .with_context(|| format!("stripe {to} taking slots {slots}"))?;
    totals.entries += imported["entries"].as_u64().unwrap_or_default();
    totals.bytes += imported["bytes"].as_u64().unwrap_or_default();
    release(admin, from, to, slots, totals).await?;
    Ok(true)
}

/// Undoes steps 1 and 2 of a move that cannot be made now, and notes why; `false` (not moved).
async fn give_back(
    admin: &Admin,
    from: usize,
    to: usize,
    slots: &SlotSet,
    totals: &mut MoveTotals,
    why: anyhow::Error,
) -> anyhow::Result<bool> {
    let post = hyper::Method::POST;
    admin
        .change(from, post.clone(), "/v1/slots/unfreeze", step_body(slots, to)?)
        .await?;
    admin
        .change(to, post, "/v1/slots/abandon-import", step_body(slots, from)?)
        .await?;
    totals.stuck.push((slots.clone(), format!("{why:#}")));
    Ok(false)
}

/// Step 4: `from` lets the slots go to `to`, which owns them now.
async fn release(
    admin: &Admin,
    from: usize,
    to: usize,
    slots: &SlotSet,
    totals: &mut MoveTotals,
) -> anyhow::Result<()> {
    admin
        .change(from, hyper::Method::POST, "/v1/slots/release", step_body(slots, to)?)
        .await
        .with_context(|| format!("stripe {from} releasing slots {slots}"))?;
    totals.slots += slots.len();
    totals.steps += 1;
    Ok(())
}

/// Finishes the moves a previous run left half done (slots frozen on a stripe), and gives up
/// imports whose source is no longer moving them.
async fn resume(admin: &Admin, stripes: usize, totals: &mut MoveTotals) -> anyhow::Result<()> {
    let mut frozen = Vec::new();
    let mut importing = Vec::new();
    let mut owned = Vec::new();
    for i in 0..stripes {
        let view = admin.roster(i).await?;
        owned.push(serde_json::from_value::<SlotSet>(view["slots"].clone()).unwrap_or_default());
        for m in view["moving"].as_array().into_iter().flatten() {
            let slots: SlotSet = serde_json::from_value(m["slots"].clone())?;
            frozen.push((i, m["stripe"].as_u64().unwrap_or_default() as usize, slots));
        }
        for m in view["importing"].as_array().into_iter().flatten() {
            let slots: SlotSet = serde_json::from_value(m["slots"].clone())?;
            importing.push((i, m["stripe"].as_u64().unwrap_or_default() as usize, slots));
        }
    }
    for (from, to, slots) in &frozen {
        println!("finishing the move of slots {slots} from stripe {from} to stripe {to}");
        // A run cut short after the new owner took the slots leaves only the release.
        if owned.get(*to).is_some_and(|o| o.contains_set(slots)) {
            release(admin, *from, *to, slots, totals).await?;
        } else {
            finish_move(admin, *from, *to, slots, totals).await?;
        }
    }
    for (at, from, slots) in importing {
        if !frozen.iter().any(|(f, t, s)| *f == from && *t == at && *s == slots) {
            println!("stripe {at}: giving up the import of slots {slots} (stripe {from} is not moving them)");
            admin
                .change(
                    at,
                    hyper::Method::POST,
                    "/v1/slots/abandon-import",
                    step_body(&slots, from)?,
                )
                .await?;
        }
    }
    Ok(())
}

/// Moves slots until stripe `i` holds `want[i]` slots (or `max_slots` moved).
async fn balance(
    admin: &Admin,
    want: &[usize],
    batch: u16,
    max_slots: usize,
    totals: &mut MoveTotals,
) -> anyhow::Result<()> {
    let batch = batch.clamp(1, SLOT_COUNT) as usize;
    let mut owned = owned_slots(admin, want.len()).await?;
    let mut stuck = SlotSet::empty();
    loop {
        if max_slots > 0 && totals.slots >= max_slots {
            break;
        }
        let movable = |s: &SlotSet| {
            let mut m = s.clone();
            m.remove_set(&stuck);
            m
        };
        let Some(from) = (0..owned.len()).find(|&i| owned[i].len() > want[i] && !movable(&owned[i]).is_empty()) else {
            break;
        };
        let Some(to) = (0..owned.len()).find(|&i| owned[i].len() < want[i]) else {
            break;
        };
        let mut count = batch
            .min(owned[from].len() - want[from])
            .min(want[to] - owned[to].len());
        if max_slots > 0 {
            count = count.min(max_slots - totals.slots);
        }
        let slots = movable(&owned[from]).last_slots(count);
        if move_slots(admin, from, to, &slots, totals).await? {
            owned[from].remove_set(&slots);
            owned[to].insert_set(&slots);
        } else {
            stuck.insert_set(&slots);
        }
    }
    Ok(())
}

/// The slots each stripe's active says its stripe owns.
async fn owned_slots(admin: &Admin, stripes: usize) -> anyhow::Result<Vec<SlotSet>> {
    let mut out = Vec::with_capacity(stripes);
    for i in 0..stripes {
        let view = admin.roster(i).await?;
        out.push(serde_json::from_value(view["slots"].clone()).with_context(|| format!("stripe {i}'s slots"))?);
    }
    Ok(out)
}

/// An even share of the slots for `stripes` stripes (the first ones take the remainder).
fn even_shares(stripes: usize) -> Vec<usize> {
    let n = SLOT_COUNT as usize;
    (0..stripes)
        .map(|i| n / stripes + usize::from(i < n % stripes))
        .collect()
}

/// `ferrocotta array rebalance`.
pub async fn rebalance(args: RebalanceArgs) -> anyhow::Result<u8> {
    let admin = Admin::connect(&args.change).await?;
    let started = Instant::now();
    let mut totals = MoveTotals::default();
    let stripes = current_document(&admin).await.stripes.len();
    resume(&admin, stripes, &mut totals).await?;
    balance(
        &admin,
        &even_shares(stripes),
        args.batch_slots,
        args.max_slots,
        &mut totals,
    )
    .await?;
    totals.elapsed = started.elapsed();
    totals.print();
    let doc = current_document(&admin).await;
    for (i, owned) in owned_slots(&admin, stripes).await?.iter().enumerate() {
        println!("stripe {i} `{}`: {} slots ({owned})", doc.stripes[i].name, owned.len());
    }
    Ok(if totals.stuck.is_empty() { 0 } else { 1 })
}

/// `ferrocotta array remove-stripe`.
pub async fn remove_stripe(args: RemoveStripeArgs) -> anyhow::Result<u8> {
    let admin = Admin::connect(&args.change).await?;
    let started = Instant::now();
    let doc = current_document(&admin).await;
    let Some(index) = doc.stripes.iter().position(|s| s.name == args.name) else {
        bail!("no stripe named `{}` in the array", args.name);
    };
    if index + 1 != doc.stripes.len() {
        bail!(
            "only the last stripe (`{}`) can be removed: stripes are numbered, and clients route by number",
            doc.stripes[doc.stripes.len() - 1].name
        );
    }
    if index == 0 {
        bail!("the array's only stripe cannot be removed");
    }
    let mut totals = MoveTotals::default();
    resume(&admin, doc.stripes.len(), &mut totals).await?;
    let mut want = even_shares(index);
    want.push(0);
    balance(&admin, &want, args.batch_slots, 0, &mut totals).await?;
    totals.elapsed = started.elapsed();
    totals.print();
    let doc = current_document(&admin).await;
    let left = owned_slots(&admin, index + 1).await?.swap_remove(index);
    if !left.is_empty() {
        bail!(
            "stripe `{}` still owns slots {left}: it stays in the array until they can move (see above)",
            args.name
        );
    }
    let mut stripes = doc.stripes.clone();
    stripes.pop();
    give_layout(&admin, index, doc.layout + 1, &stripes).await?;
    println!(
        "stripe `{}` owns no slot and is out of the array (layout {}): stop its servers",
        args.name,
        doc.layout + 1
    );
    Ok(0)
}
