//! The scenarios. Each runs the key-value workload (and, where nodes are started, the session
//! workload) while it injects its faults; [`crate::run::scenario`] heals, checks and reports.

use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::Rng;

use crate::cluster::{NODE_REQUEST_TIMEOUT, RECONNECT_WINDOW};
use crate::proxy::LinkFault;
use crate::run::{say, scenario, Ctx, Setup};
use crate::workload::{http_post, invoke_counter};

/// The active is taken off the network (silently) three times.
#[test]
fn leader_isolation() {
    scenario("leader_isolation", Setup::default(), |ctx| {
        Box::pin(async move {
            for _ in 0..3 {
                let a = ctx.active().await;
                ctx.mark("isolate-active", true);
                ctx.net.isolate(&a);
                let hold = ctx.ms(2000, 4000);
                ctx.sleep(hold).await;
                ctx.net.heal();
                ctx.sleep(Duration::from_secs(2)).await;
            }
        })
    });
}

/// Random links between servers, and between the clients and servers, are cut and healed.
#[test]
fn random_link_cuts() {
    scenario("random_link_cuts", Setup::default(), |ctx| {
        Box::pin(async move {
            let mut hosts = ctx.cluster.servers.clone();
            hosts.push("client".into());
            for _ in 0..8 {
                let cuts = ctx.rng.gen_range(1..=2);
                for _ in 0..cuts {
                    let pair: Vec<String> = hosts.choose_multiple(&mut ctx.rng, 2).cloned().collect();
                    ctx.mark("cut-link", false);
                    ctx.net.cut(&pair[0], &pair[1]);
                }
                let hold = ctx.ms(1000, 3000);
                ctx.sleep(hold).await;
                ctx.net.heal();
                ctx.sleep(Duration::from_secs(1)).await;
            }
        })
    });
}

/// Links cut in one direction only: from the active, to the active, and between random servers.
#[test]
fn one_way_cuts() {
    scenario("one_way_cuts", Setup::default(), |ctx| {
        Box::pin(async move {
            for round in 0..6 {
                let a = ctx.active().await;
                let others = ctx.others(&a);
                match round % 3 {
                    0 => {
                        ctx.mark("one-way-from-active", true);
                        for o in &others {
                            ctx.net.cut_one_way(&a, o);
                        }
                    }
                    1 => {
                        ctx.mark("one-way-to-active", true);
                        for o in &others {
                            ctx.net.cut_one_way(o, &a);
                        }
                    }
                    _ => {
                        let from = ctx.any_server();
                        let to = ctx.others(&from)[ctx.rng.gen_range(0..2)].clone();
                        ctx.mark("one-way-random", false);
                        ctx.net.cut_one_way(&from, &to);
                    }
                }
                let hold = ctx.ms(2000, 3000);
                ctx.sleep(hold).await;
                ctx.net.heal();
                ctx.sleep(Duration::from_millis(1500)).await;
            }
        })
    });
}

/// The seed guide's split-brain case: the active on one side, its mirrors on the other, and a new
/// integration node joining through a URL list whose first URL is the old active. Only the side
/// with a majority may acknowledge writes; the new node must join the real cluster.
#[test]
fn seed_split_brain() {
    let setup = Setup {
        nodes: &["n1", "n2"],
        spare: &["n3"],
        ..Setup::default()
    };
    scenario("seed_split_brain", setup, |ctx| {
        Box::pin(async move {
            for round in 0..2 {
                let old = ctx.active().await;
                let mirrors = ctx.others(&old);
                ctx.mark("partition-active-from-mirrors", true);
                let m: Vec<&str> = mirrors.iter().map(String::as_str).collect();
                ctx.net.partition(&[&old], &m);
                ctx.sleep(Duration::from_secs(1)).await;
                if round == 0 {
                    let addr = |s: &str| ctx.cluster.config.find_server(s).unwrap().1.client_addr();
                    let urls = format!("{},{},{}", addr(&old), addr(m[0]), addr(m[1]));
                    say(&format!("    n3 joins through {urls} (first: the old active {old})"));
                    let started = Instant::now();
                    ctx.cluster.start_node(&ctx.net, "n3", &urls);
                    ctx.wait_node("n3", Duration::from_secs(30)).await;
                    // It serves sessions from the majority's array.
                    let n3 = ctx.cluster.node_addr(&ctx.net, "n3");
                    let mut ssnid: Option<String> = None;
                    let mut counters = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while counters.len() < 3 {
                        match invoke_counter(&n3, ssnid.as_deref()).await {
                            Ok((c, set)) => {
                                counters.push(c);
                                ssnid = set.or(ssnid);
                            }
                            Err(e) => assert!(Instant::now() < deadline, "n3 never served: {e}"),
                        }
                    }
                    assert_eq!(counters, vec![1, 2, 3], "a new session through n3 counts from 1");
                    let deadline = Instant::now() + Duration::from_secs(20);
                    loop {
                        let members = ctx.members("n3").await;
                        if members == ["n1", "n2", "n3"] {
                            break;
                        }
                        assert!(Instant::now() < deadline, "n3's member list stayed {members:?}");
                        ctx.sleep(Duration::from_millis(200)).await;
                    }
                    ctx.notes.push(format!(
                        "n3 joined through the old active's URL during the split and served in {:.2?}",
                        started.elapsed()
                    ));
                }
                let hold = ctx.ms(2000, 3000);
                ctx.sleep(hold).await;
                ctx.net.heal();
                ctx.sleep(Duration::from_secs(2)).await;
            }
        })
    });
}

/// kill -9 of the active under load, restarted on its data folder after a while.
#[test]
fn kill_active() {
    scenario("kill_active", Setup::default(), |ctx| {
        Box::pin(async move {
            for _ in 0..3 {
                let a = ctx.active().await;
                ctx.mark("kill-active", true);
                ctx.cluster.kill9(&a);
                let hold = ctx.ms(2000, 3000);
                ctx.sleep(hold).await;
                ctx.cluster.start_server(&ctx.net, &a);
                ctx.sleep(Duration::from_secs(2)).await;
            }
        })
    });
}

/// The failover figures, before and after any change to elections or to the client's choice of
/// server: kill -9 of the active six times, silent isolation of the active six times (each fault
/// to the first acknowledged write is reported as the write unavailability), then a mirror cut
/// off for longer than an election timeout four times. A mirror that cannot reach a majority
/// stays out of elections, so after its heal the active is still the active, in the same term:
/// the check below fails when a healed mirror deposes it (Raft without pre-vote does).
#[test]
fn failover_times() {
    scenario("failover_times", Setup::default(), |ctx| {
        Box::pin(async move {
            for round in 0..12 {
                let a = ctx.active().await;
                if round % 2 == 0 {
                    ctx.mark("kill-active", true);
                    ctx.cluster.kill9(&a);
                    ctx.sleep(Duration::from_secs(2)).await;
                    ctx.cluster.start_server(&ctx.net, &a);
                } else {
                    ctx.mark("isolate-active", true);
                    ctx.net.isolate(&a);
                    ctx.sleep(Duration::from_millis(2500)).await;
                    ctx.net.heal();
                }
                ctx.sleep(Duration::from_secs(3)).await;
            }
            let mut deposed = Vec::new();
            for _ in 0..4 {
                let a = ctx.active().await;
                let term = ctx.cluster.status_term(&a);
                let mirror = ctx.others(&a)[ctx.rng.gen_range(0..2)].clone();
                ctx.mark("isolate-mirror", false);
                ctx.net.isolate(&mirror);
                ctx.sleep(Duration::from_millis(4500)).await;
                ctx.net.heal();
                ctx.sleep(Duration::from_secs(3)).await;
                let (after, term_after) = (ctx.active().await, ctx.cluster.status_term(&a));
                if after != a || term_after != term {
                    deposed.push(format!(
                        "{mirror} healed: active {a} term {term:?} -> {after} term {term_after:?}"
                    ));
                }
            }
            ctx.notes.push(format!(
                "mirror isolated for 4.5 s, four times: the active was deposed after {} heal(s)",
                deposed.len()
            ));
            for d in deposed {
                ctx.failures.push(format!("a healed mirror forced an election: {d}"));
            }
        })
    });
}

/// The stripe's servers change under load, with `ferrocotta array` as an operator would run it:
/// a fourth server is added (it learns its stripe from the array, catches up, votes), the active
/// is removed (it hands over first), a killed mirror is replaced by a new server on an empty disk.
/// Then the two old servers are started again from the original cluster.toml (the removed active
/// on its data, the killed mirror on a wiped disk): both must refuse to start, never serve. The
/// checkers run on the history as always, and the final restart of every server is of the new set.
#[test]
fn membership_changes() {
    let setup = Setup {
        spare: &["a4", "a5"],
        ..Setup::default()
    };
    scenario("membership_changes", setup, |ctx| {
        Box::pin(async move {
            // Built (if stale) before the clock starts.
            crate::common::binary("ferrocotta");
            let started = Instant::now();
            ctx.mark("add-server", false);
            array_cli(ctx, &new_server_args(ctx, "add-server", "a4")).await;
            ctx.cluster.start_server(&ctx.net, "a4");
            let mut wait = new_server_args(ctx, "add-server", "a4");
            wait.extend(["--wait".to_string(), "60s".to_string()]);
            array_cli(ctx, &wait).await;
            ctx.cluster.servers.push("a4".into());
            ctx.notes.push(format!(
                "a4 added and voting {:.1?} after add-server",
                started.elapsed()
            ));
            ctx.sleep(Duration::from_secs(2)).await;

            let active = ctx.active().await;
            ctx.mark("remove-active", true);
            let removing = Instant::now();
            array_cli(ctx, &["remove-server".to_string(), active.clone()]).await;
            ctx.notes
                .push(format!("{active} (the active) removed in {:.1?}", removing.elapsed()));
            ctx.cluster.terminate(&active, Duration::from_secs(5));
            ctx.cluster.servers.retain(|s| *s != active);
            ctx.sleep(Duration::from_secs(2)).await;

            let now_active = ctx.active().await;
            let victim = ctx
                .others(&now_active)
                .into_iter()
                .find(|s| s != "a4")
                .unwrap_or_else(|| ctx.others(&now_active)[0].clone());
            ctx.mark("kill-mirror", false);
            ctx.cluster.kill9(&victim);
            ctx.cluster.servers.retain(|s| *s != victim);
            let replacing = Instant::now();
            let mut replace = new_server_args(ctx, "replace-server", "a5");
            replace.insert(1, victim.clone());
            replace.extend(["--wait".to_string(), "60s".to_string()]);
            let cli = spawn_array_cli(ctx, &replace);
            ctx.sleep(Duration::from_millis(500)).await;
            ctx.cluster.start_server(&ctx.net, "a5");
            finish_array_cli(cli, &replace).await;
            ctx.cluster.servers.push("a5".into());
            ctx.notes.push(format!(
                "{victim} (killed) replaced by a5 on an empty disk in {:.1?}",
                replacing.elapsed()
            ));
            ctx.sleep(Duration::from_secs(2)).await;

            // The old servers come back from the original cluster.toml.
            let wiped = ctx.cluster.dir.path().join("data").join(&victim);
            let _ = std::fs::remove_dir_all(&wiped);
            for stale in [active.clone(), victim.clone()] {
                ctx.cluster.start_server(&ctx.net, &stale);
                let exit = ctx.cluster.wait_exit(&stale, Duration::from_secs(30));
                let log = std::fs::read_to_string(ctx.cluster.log_path(&stale)).unwrap_or_default();
                match exit {
                    Some(code) if code != 0 && log.contains("removed") => {
                        ctx.notes.push(format!("stale {stale} refused to start (exit {code})"))
                    }
                    other => {
                        ctx.failures.push(format!(
                            "stale {stale} started from the old cluster.toml: exit {other:?}"
                        ));
                        ctx.cluster.kill9(&stale);
                    }
                }
            }
            ctx.sleep(Duration::from_secs(2)).await;
        })
    });
}

/// Membership changes meet faults: the active is killed right after a server is added (before it
/// starts), the new server is cut off while it catches up, and the active is killed while it
/// removes a server. Each change is completed by running the same command again; the checkers
/// find no anomaly, and every server of the final set votes.
#[test]
fn membership_faults() {
    let setup = Setup {
        spare: &["a4", "a5"],
        ..Setup::default()
    };
    scenario("membership_faults", setup, |ctx| {
        Box::pin(async move {
            // 1. The active dies right after it added a4 as a learner.
            let add_a4 = new_server_args(ctx, "add-server", "a4");
            array_cli(ctx, &add_a4).await;
            let active = ctx.active().await;
            ctx.mark("kill-active-after-add", true);
            ctx.cluster.kill9(&active);
            ctx.cluster.start_server(&ctx.net, "a4");
            ctx.sleep(Duration::from_secs(2)).await;
            ctx.cluster.start_server(&ctx.net, &active);
            let mut wait = add_a4.clone();
            wait.extend(["--wait".to_string(), "60s".to_string()]);
            let tries = array_cli_until_done(ctx, &wait, 3).await;
            ctx.cluster.servers.push("a4".into());
            ctx.notes.push(format!(
                "a4 voting after its active was killed ({tries} run(s) of add-server --wait)"
            ));

            // 2. a5 is cut off from everyone while it should catch up.
            let add_a5 = new_server_args(ctx, "add-server", "a5");
            array_cli(ctx, &add_a5).await;
            ctx.cluster.start_server(&ctx.net, "a5");
            ctx.mark("isolate-new-server", false);
            ctx.net.isolate("a5");
            ctx.sleep(Duration::from_secs(3)).await;
            ctx.net.heal();
            let mut wait = add_a5.clone();
            wait.extend(["--wait".to_string(), "60s".to_string()]);
            array_cli_until_done(ctx, &wait, 3).await;
            ctx.cluster.servers.push("a5".into());

            // 3. The active is killed while it removes a mirror.
            let active = ctx.active().await;
            let victim = ctx
                .others(&active)
                .into_iter()
                .find(|s| s.starts_with('a') && s != "a4" && s != "a5")
                .expect("an original mirror");
            let remove = vec!["remove-server".to_string(), victim.clone()];
            let cli = spawn_array_cli(ctx, &remove);
            // The removal itself takes tens of milliseconds: the kill lands before, during or
            // after it, by the seed.
            let delay = ctx.ms(0, 60);
            ctx.sleep(delay).await;
            ctx.mark("kill-active-during-remove", true);
            ctx.cluster.kill9(&active);
            let first = try_finish_array_cli(cli, &remove).await;
            ctx.sleep(Duration::from_secs(2)).await;
            ctx.cluster.start_server(&ctx.net, &active);
            let tries = array_cli_until_done(ctx, &remove, 3).await;
            ctx.notes.push(format!(
                "{victim} removed while its active was killed (first run {}, then {tries} run(s))",
                if first { "succeeded" } else { "failed" }
            ));
            ctx.cluster.terminate(&victim, Duration::from_secs(5));
            ctx.cluster.servers.retain(|s| *s != victim);

            // Every server of the final set votes, and the membership is not left joint.
            let roster = roster_of_active(ctx).await;
            let voters = roster["voters"].as_array().map(|v| v.len()).unwrap_or(0);
            if voters != ctx.cluster.servers.len() || roster["joint"] != serde_json::json!(false) {
                ctx.failures.push(format!(
                    "after the changes: {voters} voters for {} servers, roster {roster}",
                    ctx.cluster.servers.len()
                ));
            }
            ctx.sleep(Duration::from_secs(2)).await;
        })
    });
}

/// Stripes change under the key-value load, with `ferrocotta array` as an operator runs it: a
/// second stripe is added (`add-stripe --out`, its servers started from that file, `add-stripe
/// --config`), `rebalance` moves half the slots to it while stripe 0's active (the source) is
/// killed, the same command resumes the move while the new stripe's active (the target) is
/// killed, and runs again until done; then `remove-stripe` drains it back while its own active is
/// killed, and runs again until done. The workload's keys span both stripes: a key written on
/// two stripes, or lost on its way, shows as a linearizability or durability anomaly. A client's
/// ephemeral entry and exclusive lock, on keys that move both ways, must still be there and still
/// its after each change ([`HeldAcrossMoves`]).
#[test]
fn stripe_changes() {
    let setup = Setup {
        spare: &["b1", "b2", "b3"],
        sessions: 0,
        kv: crate::workload::KvLoad {
            keys: 16,
            ..Setup::default().kv
        },
        ..Setup::default()
    };
    scenario("stripe_changes", setup, |ctx| {
        Box::pin(async move {
            crate::common::binary("ferrocotta");
            let news = ["b1", "b2", "b3"];
            // 1. The array's cluster.toml with the new stripe; its servers start from it.
            let file = ctx.cluster.dir.path().join("cluster-2.toml");
            let mut plan: Vec<String> = ["add-stripe", "--name", "stripe-b", "--out"]
                .iter()
                .map(|s| s.to_string())
                .chain([file.display().to_string()])
                .collect();
            for b in news {
                let ip = ctx.net.ip(b);
                let port = |p| crate::cluster::Cluster::server_addr(&ctx.net, b, p);
                let ports: Vec<String> = (0..3)
                    .map(|p| port(p).rsplit_once(':').unwrap().1.to_string())
                    .collect();
                plan.push("--server".into());
                plan.push(format!("{b}={ip}:{}:{}:{}", ports[0], ports[1], ports[2]));
            }
            array_cli(ctx, &plan).await;
            for b in news {
                ctx.cluster.config_files.insert(b.to_string(), file.clone());
                ctx.cluster.start_server(&ctx.net, b);
                ctx.cluster.servers.push(b.to_string());
            }
            let held = HeldAcrossMoves::take(ctx).await;
            let register: Vec<String> = vec!["add-stripe".into(), "--config".into(), file.display().to_string()];
            array_cli(ctx, &register).await;
            ctx.sleep(Duration::from_secs(1)).await;
            // The holder opens its session on the new stripe (its keep-alive does), or what it
            // holds could not move.
            if let Some(wrong) = held.wait_for_sessions(2).await {
                ctx.failures.push(wrong);
            }

            // 2. Half the slots move to the new stripe; stripe 0's active (the source) dies on
            // the way, then the new stripe's (the target) during the next run of the command.
            let rebalance: Vec<String> = vec!["rebalance".into(), "--batch-slots".into(), "64".into()];
            let started = Instant::now();
            let delay = ctx.ms(100, 1500);
            let first = cli_killing_active(
                ctx,
                &rebalance,
                &["a1", "a2", "a3"],
                delay,
                "kill-source-active-during-move",
                true,
            )
            .await;
            let target_delay = ctx.ms(100, 1000);
            let second = cli_killing_active(
                ctx,
                &rebalance,
                &news,
                target_delay,
                "kill-target-active-during-move",
                false,
            )
            .await;
            // Run again in any case: after a run cut short it finishes the move, after a whole
            // one it finds nothing to do.
            let tries = array_cli_until_done(ctx, &rebalance, 3).await;
            let said = |done: bool| if done { "finished" } else { "cut short" };
            ctx.notes.push(format!(
                "rebalance to the new stripe: {:.1?}; the source's active killed after {delay:?} (run {}), the target's after {target_delay:?} of the next run (run {}), then {tries} run(s)",
                started.elapsed(),
                said(first),
                said(second)
            ));
            let slots = slots_of(ctx, "a1").await;
            if slots != 8192 {
                ctx.failures
                    .push(format!("after the rebalance stripe 0 owns {slots} slots, not 8192"));
            }
            ctx.failures.extend(held.check("after the rebalance", 1).await);
            ctx.sleep(Duration::from_secs(2)).await;

            // 3. The new stripe is drained and removed; its own active dies on the way.
            let remove: Vec<String> = vec![
                "remove-stripe".into(),
                "stripe-b".into(),
                "--batch-slots".into(),
                "64".into(),
            ];
            let started = Instant::now();
            let delay = ctx.ms(100, 1500);
            let first =
                cli_killing_active(ctx, &remove, &news, delay, "kill-new-stripe-active-during-drain", false).await;
            // A removal that finished before the kill leaves nothing to run again.
            let tries = if first {
                0
            } else {
                array_cli_until_done(ctx, &remove, 3).await
            };
            ctx.notes.push(format!(
                "stripe-b drained and removed: {:.1?}, its active killed after {delay:?} (first run {}, then {tries} run(s))",
                started.elapsed(),
                if first { "finished" } else { "cut short" }
            ));
            let slots = slots_of(ctx, "a1").await;
            if slots != 16384 {
                ctx.failures
                    .push(format!("after the removal stripe 0 owns {slots} slots, not all 16384"));
            }
            ctx.failures.extend(held.check("after the removal", 0).await);
            ctx.failures.extend(held.release().await);
            for b in news {
                ctx.cluster.terminate(b, Duration::from_secs(5));
            }
            ctx.cluster.servers.retain(|s| !news.contains(&s.as_str()));
            ctx.sleep(Duration::from_secs(2)).await;
        })
    });
}

/// Runs a `ferrocotta array` command and kills the active among `stripe` (one stripe's servers)
/// `delay` into it; the killed server starts again a second after the command ended. Whether the
/// command finished.
async fn cli_killing_active(
    ctx: &mut Ctx,
    args: &[String],
    stripe: &[&str],
    delay: Duration,
    mark: &str,
    loses_active: bool,
) -> bool {
    let cli = spawn_array_cli(ctx, args);
    ctx.sleep(delay).await;
    let victim = active_among(ctx, stripe).await;
    ctx.mark(mark, loses_active);
    if let Some(v) = &victim {
        ctx.cluster.kill9(v);
    }
    let finished = try_finish_array_cli(cli, args).await;
    ctx.sleep(Duration::from_secs(1)).await;
    if let Some(v) = &victim {
        ctx.cluster.start_server(&ctx.net, v);
    }
    finished
}

/// How many slots a server's stripe owns, by its roster.
/// Cache of [`HeldAcrossMoves`] (not the key-value workload's).
const HELD_CACHE: &str = "chaos-held";

/// A client's ephemeral entry and exclusive lock on keys of slots that `rebalance` moves to a new
/// stripe (and `remove-stripe` back): after each change both must still be there and still the
/// client's (another client cannot take the lock), and the client releases the lock where it
/// lives then.
struct HeldAcrossMoves {
    holder: ferrocotta::ArrayClient,
    other: ferrocotta::ArrayClient,
    entry: Vec<u8>,
    lock: ferrocotta::client::LockHandle,
}

impl HeldAcrossMoves {
    async fn take(ctx: &Ctx) -> HeldAcrossMoves {
        let connect = || ferrocotta::ArrayClient::connect(ctx.cluster.settings());
        let holder = connect().await.expect("the holder connects");
        let other = connect().await.expect("the other client connects");
        // Keys of the upper slots, which go to the new stripe.
        let moving = |prefix: &str| {
            (0..)
                .map(|i| format!("{prefix}-{i}").into_bytes())
                .find(|k| ferrocotta::slots::slot_of_key(k) >= 12_000)
                .expect("a key of a moving slot")
        };
        let entry = moving("held-entry");
        holder
            .put_ephemeral(HELD_CACHE, &entry, b"mine")
            .await
            .expect("the ephemeral entry");
        let lock = holder
            .lock(
                HELD_CACHE,
                &moving("held-lock"),
                ferrocotta::protocol::LockMode::Exclusive,
                ferrocotta::client::LockWait::NoWait,
            )
            .await
            .expect("the lock");
        HeldAcrossMoves {
            holder,
            other,
            entry,
            lock,
        }
    }

    /// Waits (at most 30 s) until the holder has a session on each of `stripes` stripes.
    async fn wait_for_sessions(&self, stripes: usize) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.holder.session_ids().iter().flatten().count() < stripes {
            if Instant::now() >= deadline {
                return Some(format!(
                    "the holder has no session on every stripe after 30 s: {:?}",
                    self.holder.session_ids()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// What is wrong with the entry and the lock now, which should live on `stripe`, if anything;
    /// a request that fails (the array healing) is asked again for up to 30 s.
    async fn check(&self, when: &str, stripe: usize) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = async {
                let value = self.holder.get(HELD_CACHE, &self.entry).await?;
                let taken = self
                    .other
                    .try_lock(HELD_CACHE, &self.lock.key, ferrocotta::protocol::LockMode::Exclusive)
                    .await?;
                Ok::<_, ferrocotta::client::ClientError>((value, taken))
            };
            match seen.await {
                Ok((value, taken)) => {
                    let stolen = taken.is_some();
                    if let Some(stolen) = taken {
                        let _ = self.other.unlock(&stolen).await;
                    }
                    // The other client followed the keys to where they live now.
                    let lives = (self.other.stripe_of(&self.entry), self.other.stripe_of(&self.lock.key));
                    let wrong = held_findings(value.as_deref(), stolen, lives, stripe);
                    return (!wrong.is_empty()).then(|| format!("{when}: {}", wrong.join("; ")));
                }
                Err(e) if Instant::now() >= deadline => {
                    return Some(format!("{when}: the held entry and lock could not be read: {e}"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The holder releases its lock (taken before both moves) and closes: the lock is free and
    /// the entry gone.
    async fn release(&self) -> Option<String> {
        if let Err(e) = self.holder.unlock(&self.lock).await {
            return Some(format!("the holder could not release its lock after the moves: {e}"));
        }
        self.holder.close().await;
        match self.other.get(HELD_CACHE, &self.entry).await {
            Ok(None) => None,
            Ok(Some(v)) => Some(format!("the holder closed, yet its ephemeral entry reads {v:?}")),
            Err(e) => Some(format!("the held entry could not be read after the holder closed: {e}")),
        }
    }
}

/// What [`HeldAcrossMoves::check`] saw wrong: the entry's value (`mine` expected), whether
/// another client could take the lock, and the stripes the entry and the lock live on.
fn held_findings(value: Option<&[u8]>, stolen: bool, lives: (usize, usize), stripe: usize) -> Vec<String> {
    let mut wrong = Vec::new();
    if value != Some(&b"mine"[..]) {
        wrong.push(format!(
            "the holder's ephemeral entry reads {:?}",
            value.map(String::from_utf8_lossy)
        ));
    }
    if stolen {
        wrong.push("another client took the holder's lock".to_string());
    }
    if lives != (stripe, stripe) {
        wrong.push(format!(
            "the entry and the lock live on stripes {lives:?}, not {stripe}"
        ));
    }
    wrong
}

#[test]
fn held_findings_report_each_planted_anomaly() {
    assert!(held_findings(Some(b"mine"), false, (1, 1), 1).is_empty());
    let lost = held_findings(None, false, (1, 1), 1);
    assert!(lost[0].contains("reads None"), "{lost:?}");
    let stolen = held_findings(Some(b"mine"), true, (1, 1), 1);
    assert!(stolen[0].contains("took the holder's lock"), "{stolen:?}");
    let stayed = held_findings(Some(b"mine"), false, (0, 1), 1);
    assert!(stayed[0].contains("live on stripes (0, 1)"), "{stayed:?}");
    assert_eq!(held_findings(Some(b"theirs"), true, (0, 0), 1).len(), 3);
}

async fn slots_of(ctx: &Ctx, server: &str) -> usize {
    let admin = crate::cluster::Cluster::server_addr(&ctx.net, server, 2);
    let (_, body) = crate::common::try_http_get(&admin, "/v1/roster").expect("a roster");
    let roster: serde_json::Value = serde_json::from_str(&body).expect("a roster document");
    roster["slots"]
        .as_array()
        .map(|ranges| {
            ranges
                .iter()
                .map(|r| (r[1].as_u64().unwrap_or(0) - r[0].as_u64().unwrap_or(0)) as usize)
                .sum()
        })
        .unwrap_or(0)
}

/// The server of `names` that says it is its stripe's active.
async fn active_among(ctx: &Ctx, names: &[&str]) -> Option<String> {
    for _ in 0..50 {
        for n in names {
            let admin = crate::cluster::Cluster::server_addr(&ctx.net, n, 2);
            if let Ok((_, body)) = crate::common::try_http_get(&admin, "/v1/status") {
                if body.contains("\"role\":\"active\"") {
                    return Some(n.to_string());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// `GET /v1/roster` of the stripe's active.
async fn roster_of_active(ctx: &Ctx) -> serde_json::Value {
    let active = ctx.active().await;
    let admin = crate::cluster::Cluster::server_addr(&ctx.net, &active, 2);
    let (_, body) = crate::common::try_http_get(&admin, "/v1/roster").expect("the active's roster");
    serde_json::from_str(&body).expect("a roster document")
}

/// `ferrocotta array <command> NAME --client .. --group .. --admin ..` for a spare host.
fn new_server_args(ctx: &Ctx, command: &str, name: &str) -> Vec<String> {
    let addr = |port| crate::cluster::Cluster::server_addr(&ctx.net, name, port);
    vec![
        command.to_string(),
        "--name".into(),
        name.into(),
        "--client".into(),
        addr(0),
        "--group".into(),
        addr(1),
        "--admin".into(),
        addr(2),
    ]
    .into_iter()
    .chain(if command == "add-server" {
        vec!["--stripe".to_string(), "0".to_string()]
    } else {
        Vec::new()
    })
    .collect()
}

fn spawn_array_cli(ctx: &Ctx, args: &[String]) -> tokio::process::Child {
    let dir = ctx.cluster.dir.path();
    tokio::process::Command::new(crate::common::binary("ferrocotta"))
        .arg("array")
        .args(args)
        .arg("--array-urls")
        .arg(ctx.cluster.urls())
        .arg("--array-name")
        .arg(&ctx.cluster.config.array_name)
        .arg("--secret-file")
        .arg(dir.join("secret"))
        .arg("--peer-secret-file")
        .arg(dir.join("peer-secret"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start ferrocotta array")
}

/// Waits for a `ferrocotta array` command and says what it printed; whether it succeeded.
async fn try_finish_array_cli(child: tokio::process::Child, args: &[String]) -> bool {
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("ferrocotta array finishes within 90 s")
        .expect("ferrocotta array ran");
    say(&format!(
        "    ferrocotta array {} ({:.1?} after waiting began): {} {}",
        args.join(" "),
        started.elapsed(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    ));
    out.status.success()
}

async fn finish_array_cli(child: tokio::process::Child, args: &[String]) {
    assert!(
        try_finish_array_cli(child, args).await,
        "ferrocotta array {} failed",
        args.join(" ")
    );
}

async fn array_cli(ctx: &Ctx, args: &[String]) {
    finish_array_cli(spawn_array_cli(ctx, args), args).await;
}

/// Runs a `ferrocotta array` command until it succeeds (a change cut short by a fault is
/// repeated by running the same command again, as an operator would), at most `tries` times.
async fn array_cli_until_done(ctx: &Ctx, args: &[String], tries: usize) -> usize {
    for attempt in 1..=tries {
        if try_finish_array_cli(spawn_array_cli(ctx, args), args).await {
            return attempt;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("ferrocotta array {} did not succeed in {tries} tries", args.join(" "));
}

/// kill -9 of every server at once, then a restart of all of them.
#[test]
fn kill_all_and_restart() {
    let setup = Setup {
        nodes: &["n1", "n2"],
        ..Setup::default()
    };
    scenario("kill_all_and_restart", setup, |ctx| {
        Box::pin(async move {
            for _ in 0..2 {
                ctx.mark("kill-all", true);
                for s in ctx.cluster.servers.clone() {
                    ctx.cluster.kill9(&s);
                }
                ctx.sleep(Duration::from_secs(1)).await;
                for s in ctx.cluster.servers.clone() {
                    ctx.cluster.start_server(&ctx.net, &s);
                }
                let took = ctx.cluster.wait_serving(&ctx.control, Duration::from_secs(60)).await;
                ctx.notes
                    .push(format!("serving {took:.2?} after restarting every server"));
                ctx.sleep(Duration::from_secs(3)).await;
            }
        })
    });
}

/// SIGSTOP of the active for longer than the election timeout, then SIGCONT: the old active wakes
/// up believing it leads and must not acknowledge anything as such.
#[test]
fn pause_active() {
    scenario("pause_active", Setup::default(), |ctx| {
        Box::pin(async move {
            for _ in 0..3 {
                let a = ctx.active().await;
                ctx.mark("pause-active", true);
                ctx.cluster.pause(&a);
                let hold = ctx.ms(2000, 3500);
                ctx.sleep(hold).await;
                ctx.cluster.resume(&a);
                ctx.sleep(Duration::from_secs(2)).await;
            }
        })
    });
}

/// Every server in turn is stopped (SIGTERM) and started again.
#[test]
fn rolling_restart() {
    scenario("rolling_restart", Setup::default(), |ctx| {
        Box::pin(async move {
            for s in ctx.cluster.servers.clone() {
                let was_active = ctx.active().await == s;
                ctx.mark(if was_active { "restart-active" } else { "restart-mirror" }, was_active);
                ctx.cluster.terminate(&s, Duration::from_secs(5));
                ctx.sleep(Duration::from_millis(500)).await;
                ctx.cluster.start_server(&ctx.net, &s);
                ctx.sleep(Duration::from_secs(3)).await;
            }
        })
    });
}

/// A node cut from the array for less than the reconnect window (nonstop answers within the
/// timeout, then it reconnects with the same array session), then for more (the array ends its
/// session; it rejoins and registers again).
#[test]
fn node_cut_from_array() {
    let setup = Setup {
        nodes: &["n1", "n2"],
        ..Setup::default()
    };
    scenario("node_cut_from_array", setup, |ctx| {
        Box::pin(async move {
            let n1 = ctx.cluster.node_addr(&ctx.net, "n1");
            let rejoins = |v: serde_json::Value| v["rejoins"].as_u64().unwrap_or(0);
            let before = rejoins(ctx.node_admin("n1", "/admin/status").await);
            for (kind, hold) in [
                ("node-cut-short", RECONNECT_WINDOW / 2),
                ("node-cut-long", RECONNECT_WINDOW + Duration::from_secs(3)),
            ] {
                ctx.mark(kind, false);
                let cut_at = Instant::now();
                for s in ctx.cluster.servers.clone() {
                    ctx.net.cut("n1", &s);
                }
                // Nonstop: a session request through the cut node is answered, not hung.
                let asked = Instant::now();
                let (status, _, body) =
                    http_post(&n1, "/invoke/demo:counter", Some("cutprobe"), Duration::from_secs(20))
                        .await
                        .expect("the cut node answers");
                let answered = asked.elapsed();
                assert_eq!(status, 503, "{body}");
                ctx.notes.push(format!(
                    "{kind}: the cut node answered 503 after {answered:.2?} (request timeout {NODE_REQUEST_TIMEOUT:?})"
                ));
                if kind == "node-cut-long" {
                    let deadline = Instant::now() + RECONNECT_WINDOW + Duration::from_secs(10);
                    loop {
                        if !ctx.members("n2").await.contains(&"n1".to_string()) {
                            ctx.notes.push(format!(
                                "node-cut-long: n1 left n2's member list {:.2?} after the cut",
                                cut_at.elapsed()
                            ));
                            break;
                        }
                        assert!(Instant::now() < deadline, "n1 never left the member list");
                        ctx.sleep(Duration::from_millis(200)).await;
                    }
                }
                ctx.sleep(hold.saturating_sub(cut_at.elapsed())).await;
                ctx.net.heal();
                let healed = Instant::now();
                let deadline = healed + Duration::from_secs(30);
                loop {
                    if invoke_counter(&n1, Some("cutprobe")).await.is_ok() {
                        break;
                    }
                    assert!(Instant::now() < deadline, "n1 never served again after the heal");
                    ctx.sleep(Duration::from_millis(100)).await;
                }
                let served = healed.elapsed();
                let now = rejoins(ctx.node_admin("n1", "/admin/status").await);
                if kind == "node-cut-short" {
                    assert_eq!(now, before, "a cut shorter than the window must not cost the session");
                    ctx.notes.push(format!(
                        "{kind}: n1 served again {served:.2?} after the heal (reconnect, no rejoin)"
                    ));
                } else {
                    let deadline = Instant::now() + Duration::from_secs(20);
                    let mut now = now;
                    while now != before + 1 {
                        assert!(
                            Instant::now() < deadline,
                            "n1 did not rejoin (rejoins {before} -> {now})"
                        );
                        ctx.sleep(Duration::from_millis(100)).await;
                        now = rejoins(ctx.node_admin("n1", "/admin/status").await);
                    }
                    loop {
                        if ctx.members("n2").await.contains(&"n1".to_string()) {
                            break;
                        }
                        assert!(Instant::now() < deadline, "n1 never came back to the member list");
                        ctx.sleep(Duration::from_millis(100)).await;
                    }
                    ctx.notes.push(format!(
                        "{kind}: n1 served again {served:.2?} after the heal, rejoined and was back in the member list after {:.2?}",
                        healed.elapsed()
                    ));
                }
                ctx.sleep(Duration::from_secs(2)).await;
            }
        })
    });
}

/// A randomized schedule of every fault kind; `FERROCOTTA_CHAOS_NEMESIS_SECS` sets its length
/// (default 40 s).
#[test]
fn nemesis() {
    let secs = std::env::var("FERROCOTTA_CHAOS_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let setup = Setup {
        nodes: &["n1", "n2"],
        ..Setup::default()
    };
    scenario("nemesis", setup, move |ctx| {
        Box::pin(nemesis_for(ctx, Duration::from_secs(secs), None))
    });
}

/// A long soak: the nemesis for `FERROCOTTA_SOAK` (e.g. `30m`), with fresh keys every minute so
/// each key's history stays small enough to check. Skipped when the variable is unset.
#[test]
fn soak() {
    let Ok(spec) = std::env::var("FERROCOTTA_SOAK") else {
        return;
    };
    let length = humantime::parse_duration(&spec).expect("FERROCOTTA_SOAK is a duration such as 30m");
    let setup = Setup {
        nodes: &["n1", "n2"],
        ..Setup::default()
    };
    scenario("soak", setup, move |ctx| {
        Box::pin(nemesis_for(ctx, length, Some(Duration::from_secs(60))))
    });
}

/// Random faults for `length`; with `rotate`, the key-value workload moves to fresh keys that
/// often.
async fn nemesis_for(ctx: &mut Ctx, length: Duration, rotate: Option<Duration>) {
    let started = Instant::now();
    let mut rotated = Instant::now();
    let mut round = 0;
    while started.elapsed() < length {
        if let Some(every) = rotate {
            if rotated.elapsed() >= every {
                round += 1;
                ctx.rotate_keys(&format!("r{round}-")).await;
                rotated = Instant::now();
            }
        }
        let active = ctx.active().await;
        match ctx.rng.gen_range(0..12) {
            0 => {
                ctx.mark("isolate-active", true);
                ctx.net.isolate(&active);
            }
            1 => {
                let s = ctx.any_server();
                ctx.mark("isolate-server", s == active);
                ctx.net.isolate(&s);
            }
            2 => {
                let mut hosts = ctx.cluster.servers.clone();
                hosts.extend(ctx.cluster.nodes.clone());
                hosts.push("client".into());
                let pair: Vec<String> = hosts.choose_multiple(&mut ctx.rng, 2).cloned().collect();
                ctx.mark("cut-link", false);
                ctx.net.cut(&pair[0], &pair[1]);
            }
            3 => {
                let from = ctx.any_server();
                let to = ctx.others(&from)[ctx.rng.gen_range(0..2)].clone();
                ctx.mark("one-way", false);
                ctx.net.cut_one_way(&from, &to);
            }
            4 => {
                let lone = ctx.any_server();
                let rest = ctx.others(&lone);
                ctx.mark("partition-1-2", lone == active);
                ctx.net.partition(&[&lone], &[&rest[0], &rest[1]]);
            }
            5 => {
                ctx.mark("kill-active", true);
                ctx.cluster.kill9(&active);
            }
            6 => {
                let s = ctx.any_server();
                ctx.mark("kill-server", s == active);
                ctx.cluster.kill9(&s);
            }
            7 => {
                ctx.mark("kill-all", true);
                for s in ctx.cluster.servers.clone() {
                    ctx.cluster.kill9(&s);
                }
            }
            8 => {
                ctx.mark("pause-active", true);
                ctx.cluster.pause(&active);
            }
            9 => {
                let n = ctx
                    .cluster
                    .nodes
                    .choose(&mut ctx.rng)
                    .cloned()
                    .unwrap_or_else(|| "client".into());
                ctx.mark("node-cut", false);
                for s in ctx.cluster.servers.clone() {
                    ctx.net.cut(&n, &s);
                }
            }
            10 => {
                let delay = ctx.ms(20, 300);
                ctx.mark("proxy-delay", false);
                for p in &ctx.proxies {
                    p.set(LinkFault { delay, drop: 0.0 });
                }
            }
            _ => {
                let i = ctx.rng.gen_range(0..ctx.proxies.len());
                ctx.mark("proxy-drop", false);
                ctx.proxies[i].set(LinkFault {
                    delay: Duration::ZERO,
                    drop: 0.05,
                });
            }
        }
        let hold = ctx.ms(1000, 4000);
        ctx.sleep(hold).await;
        ctx.heal_all().await;
        let rest = ctx.ms(1000, 2500);
        ctx.sleep(rest).await;
    }
}

/// Scheduled jobs under node kills, node pauses, node-array cuts and kills of the active: an
/// every-second `any` job runs each firing at most once and decides every firing (none missed:
/// a node was connected throughout); an `all` job runs each firing at most once per node.
#[test]
fn scheduled_jobs() {
    let setup = Setup {
        nodes: &["n1", "n2", "n3"],
        sessions: 0,
        ..Setup::default()
    };
    scenario("scheduled_jobs", setup, |ctx| {
        Box::pin(async move {
            for (id, target) in [
                ("tick-any", serde_json::json!("any")),
                ("tick-all", serde_json::json!("all")),
            ] {
                let body = serde_json::json!({
                    "id": id, "service": "demo:echo", "schedule": {"every": "1s"},
                    "target": target, "overlap": "allow"
                });
                let answer = ctx
                    .node_admin_call("n1", "POST", "/admin/jobs", &body.to_string())
                    .await;
                assert_eq!(answer["job"]["id"], id, "creating {id}: {answer}");
            }
            ctx.sleep(Duration::from_secs(3)).await;
            let nodes = ["n1", "n2", "n3"];
            node_faults(ctx, &nodes, 8).await;
            ctx.sleep(Duration::from_secs(3)).await;
            for id in ["tick-any", "tick-all"] {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let answer = ctx
                        .node_admin_call("n1", "POST", &format!("/admin/jobs/{id}/suspend"), "")
                        .await;
                    if answer["job"]["state"] == "suspended" {
                        break;
                    }
                    assert!(Instant::now() < deadline, "cannot suspend {id}: {answer}");
                    ctx.sleep(Duration::from_millis(500)).await;
                }
            }
            // Runs of nodes that died are declared in doubt once their array session ends.
            ctx.sleep(RECONNECT_WINDOW + Duration::from_secs(4)).await;
            let mut anomalies = Vec::new();
            for (id, any) in [("tick-any", true), ("tick-all", false)] {
                let answer = ctx
                    .node_admin_call("n1", "GET", &format!("/admin/jobs/{id}/runs"), "")
                    .await;
                let records: Vec<crate::checkers::JobRecord> = answer["runs"]
                    .as_array()
                    .unwrap_or_else(|| panic!("no runs of {id}: {answer}"))
                    .iter()
                    .map(|r| crate::checkers::JobRecord {
                        lane: r["lane"].as_str().unwrap_or("").to_string(),
                        firing_ms: r["firing_ms"].as_u64().unwrap_or(0),
                        missed_before: r["missed_before"].as_u64().unwrap_or(0),
                        outcome: r["outcome"].as_str().unwrap_or("").to_string(),
                        owner: r["owner"]["node"].as_str().unwrap_or("").to_string(),
                    })
                    .collect();
                let starts: Vec<crate::checkers::StartLine> = nodes
                    .iter()
                    .flat_map(|n| {
                        let log = std::fs::read_to_string(ctx.cluster.log_path(n)).unwrap_or_default();
                        crate::checkers::start_lines(n, &log, id)
                    })
                    .collect();
                // `any`: a node was connected throughout, so no firing may be missed. `all`: a
                // node's own firings are missed while it is down; what counts is no double run.
                let report = crate::checkers::check_jobs(&records, &starts, 1000, &|_, _| !any);
                ctx.notes.push(format!(
                    "{id}: {} firings decided, {} runs started, {} in doubt, {} missed, {} anomalies",
                    report.firings,
                    report.started,
                    report.in_doubt,
                    report.missed,
                    report.anomalies.len()
                ));
                assert!(report.firings >= 20, "{id}: too few firings to judge: {report:#?}");
                anomalies.extend(report.anomalies.into_iter().map(|a| format!("{id}: {a}")));
            }
            assert!(
                anomalies.is_empty(),
                "scheduled jobs anomalies:\n{}\n{}",
                anomalies.join("\n"),
                ctx.cluster.log_tails()
            );
        })
    });
}

/// `rounds` faults on integration nodes and the array, in turn: a node killed (started again once
/// its array session expired), a node paused 2-3.5 s, a node cut from every server 2-6 s, the
/// active killed (back after 1-2.5 s); then everything healed and every node running.
async fn node_faults(ctx: &mut Ctx, nodes: &[&str], rounds: usize) {
    let urls = ctx.cluster.urls();
    for round in 0..rounds {
        let node = nodes[ctx.rng.gen_range(0..nodes.len())];
        match round % 4 {
            0 => {
                ctx.mark("node-kill", false);
                ctx.cluster.kill9(node);
                // Without a state folder the name is free once the dead node's array session
                // expired.
                ctx.sleep(RECONNECT_WINDOW + Duration::from_secs(1)).await;
                restart_node(ctx, node, &urls).await;
            }
            1 => {
                ctx.mark("node-pause", false);
                ctx.cluster.pause(node);
                let hold = ctx.ms(2000, 3500);
                ctx.sleep(hold).await;
                ctx.cluster.resume(node);
            }
            2 => {
                ctx.mark("node-cut-from-array", false);
                for s in ctx.cluster.servers.clone() {
                    ctx.net.cut(node, &s);
                }
                let hold = ctx.ms(2000, 6000);
                ctx.sleep(hold).await;
                ctx.net.heal();
            }
            _ => {
                let a = ctx.active().await;
                ctx.mark("kill-active", true);
                ctx.cluster.kill9(&a);
                let hold = ctx.ms(1000, 2500);
                ctx.sleep(hold).await;
                ctx.cluster.start_server(&ctx.net, &a);
            }
        }
        ctx.sleep(Duration::from_secs(2)).await;
    }
    ctx.heal_all().await;
    for node in nodes {
        if !ctx.cluster.is_running(node) {
            restart_node(ctx, node, &urls).await;
        }
    }
}

/// Starts a node again, retrying while its old entry still holds the name (exit code 5).
async fn restart_node(ctx: &mut Ctx, node: &str, urls: &str) {
    for _ in 0..5 {
        ctx.cluster.start_node(&ctx.net, node, urls);
        ctx.sleep(Duration::from_secs(2)).await;
        if ctx.cluster.is_running(node) {
            ctx.wait_node(node, Duration::from_secs(30)).await;
            return;
        }
        say(&format!(
            "    {node} did not start yet (its old member entry holds the name); again"
        ));
    }
    panic!("{node} never started again\n{}", ctx.cluster.log_tails());
}

/// One deposit of the guaranteed-delivery workload: tid, account, amount, and the balance its
/// client was answered (if it saw it succeed).
type Attempt = (String, String, i64, Option<i64>);

/// Guaranteed delivery under node kills, node pauses, node-array cuts and kills of the active:
/// clients run `demo:deposit` transactions through the failover client (resubmitting each tid
/// until it is done); every tid a client saw succeed moved its balance once, none moved it twice.
#[test]
fn guaranteed_delivery() {
    let setup = Setup {
        nodes: &["n1", "n2", "n3"],
        sessions: 0,
        ..Setup::default()
    };
    scenario("guaranteed_delivery", setup, |ctx| {
        Box::pin(async move {
            use ferrocotta::node_client::{NodeClient, NodeClientSettings};
            use std::sync::atomic::{AtomicBool, Ordering};
            use std::sync::{Arc, Mutex};
            let nodes = ["n1", "n2", "n3"];
            let addrs: Vec<String> = nodes.iter().map(|n| ctx.cluster.node_addr(&ctx.net, n)).collect();
            let stop = Arc::new(AtomicBool::new(false));
            let history: Arc<Mutex<Vec<Attempt>>> = Arc::default();
            let mut clients = Vec::new();
            for c in 0..4u64 {
                let mut settings = NodeClientSettings::new(&addrs.join(",")).unwrap();
                settings.request_timeout = Duration::from_secs(6);
                settings.discover = false;
                let (stop, history) = (stop.clone(), history.clone());
                clients.push(tokio::spawn(async move {
                    let client = NodeClient::connect(settings).await;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let account = format!("acct-{}", (c + n) % 3);
                        let amount = (c * 1000 + n) as i64;
                        let start = serde_json::json!({"tag": account});
                        let tid = match client.invoke("pub.remote.gd:start", &start).await {
                            Ok(a) => a.value["tid"].as_str().unwrap_or_default().to_string(),
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue;
                            }
                        };
                        let input = serde_json::json!({"account": account, "amount": amount});
                        let seen = client
                            .invoke_gd(
                                "demo:deposit",
                                &input,
                                Some(tid.clone()),
                                &start,
                                Duration::from_secs(20),
                            )
                            .await
                            .ok()
                            .and_then(|(_, a)| a.value["result"]["balance"].as_i64());
                        history.lock().unwrap().push((tid, account, amount, seen));
                    }
                }));
            }
            ctx.sleep(Duration::from_secs(2)).await;
            node_faults(ctx, &nodes, 8).await;
            ctx.sleep(Duration::from_secs(3)).await;
            stop.store(true, Ordering::Relaxed);
            for c in clients {
                let _ = tokio::time::timeout(Duration::from_secs(60), c).await;
            }
            // What the array kept: each tid's record and each account's balance.
            let mut settings = NodeClientSettings::new(&addrs.join(",")).unwrap();
            settings.discover = false;
            let reader = NodeClient::connect(settings).await;
            let history = history.lock().unwrap().clone();
            let mut deposits = Vec::new();
            for (tid, account, amount, seen) in history {
                let status = reader
                    .invoke("pub.remote.gd:status", &serde_json::json!({"tid": tid}))
                    .await;
                let (state, stored) = match status {
                    Ok(a) => (
                        a.value["state"].as_str().unwrap_or("?").to_string(),
                        a.value["result"]["balance"].as_i64(),
                    ),
                    Err(_) => ("missing".to_string(), None),
                };
                deposits.push(crate::checkers::Deposit {
                    tid,
                    account,
                    amount,
                    client_balance: seen,
                    state,
                    stored_balance: stored,
                });
            }
            let mut finals = std::collections::BTreeMap::new();
            for account in ["acct-0", "acct-1", "acct-2"] {
                let key = format!("{{{account}}}");
                let answer = reader
                    .invoke(
                        "pub.cache:get",
                        &serde_json::json!({"cacheName": "demo.accounts", "key": key}),
                    )
                    .await
                    .expect("the balances can be read after the heal");
                finals.insert(
                    account.to_string(),
                    answer.value["value"].as_str().map_or(0, |v| v.parse().unwrap_or(-1)),
                );
            }
            let report = crate::checkers::check_deposits(&deposits, &finals);
            ctx.notes.push(format!(
                "guaranteed delivery: {} transactions, {} seen to succeed by their clients, {} done but unseen, {} never \
                 applied, final balances {finals:?}, {} anomalies",
                report.transactions,
                report.client_succeeded,
                report.done_unseen.len(),
                report.not_applied.len(),
                report.anomalies.len()
            ));
            assert!(
                report.client_succeeded >= 20,
                "too few transactions to judge: {report:#?}"
            );
            assert!(
                report.anomalies.is_empty(),
                "guaranteed-delivery anomalies:\n{}\n{}",
                report.anomalies.join("\n"),
                ctx.cluster.log_tails()
            );
        })
    });
}
