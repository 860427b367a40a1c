//! A stripe of real processes: operations, formation without the first server, kill -9 of the
//! active under load, restart of every server, two stripes, loss of quorum, and catch-up from a
//! snapshot.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{http_get, phase, TestArray};
use ferrocotta::{ArrayClient, ClientError};

const CACHE: &str = "ferrocotta.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_works_on_a_three_server_stripe() {
    let array = TestArray::start(1, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;

    phase("single-key operations");
    assert_eq!(client.put(CACHE, b"k1", b"v1").await.unwrap(), None);
    assert_eq!(client.put(CACHE, b"k1", b"v2").await.unwrap(), Some(b"v1".to_vec()));
    assert_eq!(client.get(CACHE, b"k1").await.unwrap(), Some(b"v2".to_vec()));
    assert!(client.contains(CACHE, b"k1").await.unwrap());
    assert!(!client.contains(CACHE, b"nope").await.unwrap());
    assert_eq!(
        client.put_if_absent(CACHE, b"k1", b"x").await.unwrap(),
        Some(b"v2".to_vec())
    );
    assert_eq!(client.put_if_absent(CACHE, b"k2", b"x").await.unwrap(), None);
    assert_eq!(client.replace(CACHE, b"absent", b"x").await.unwrap(), None);
    assert!(!client.contains(CACHE, b"absent").await.unwrap());
    assert_eq!(client.replace(CACHE, b"k2", b"y").await.unwrap(), Some(b"x".to_vec()));
    assert!(!client.replace_if_equal(CACHE, b"k2", b"x", b"z").await.unwrap());
    assert!(client.replace_if_equal(CACHE, b"k2", b"y", b"z").await.unwrap());
    assert!(!client.remove_if_equal(CACHE, b"k2", b"y").await.unwrap());
    assert!(client.remove_if_equal(CACHE, b"k2", b"z").await.unwrap());
    assert_eq!(client.remove(CACHE, b"k1").await.unwrap(), Some(b"v2".to_vec()));
    assert_eq!(client.get(CACHE, b"k1").await.unwrap(), None);
    assert_eq!(client.increment(CACHE, b"n", 5).await.unwrap(), 5);
    assert_eq!(client.increment(CACHE, b"n", -2).await.unwrap(), 3);
    client.put(CACHE, b"text", b"abc").await.unwrap();
    match client.increment(CACHE, b"text", 1).await {
        Err(ClientError::Server(e)) => assert!(e.to_string().contains("counter"), "{e}"),
        other => panic!("increment of a non-number must fail, got {other:?}"),
    }

    phase("bulk operations, keys with prefix and pages, size, clear");
    let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..25)
        .map(|i| (format!("user:{i:03}").into_bytes(), format!("u{i}").into_bytes()))
        .collect();
    client.put_all(CACHE, &entries).await.unwrap();
    let keys: Vec<Vec<u8>> = entries
        .iter()
        .map(|(k, _)| k.clone())
        .chain([b"missing".to_vec()])
        .collect();
    let values = client.get_all(CACHE, &keys).await.unwrap();
    assert_eq!(values.len(), 26);
    assert_eq!(values[3], Some(b"u3".to_vec()));
    assert_eq!(values[25], None);
    let mut listed = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = client.keys(CACHE, b"user:", cursor, 10).await.unwrap();
        pages += 1;
        listed.extend(page.keys);
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(listed.len(), 25, "every user: key listed once");
    assert!(pages >= 3, "25 keys in pages of 10 take at least 3 pages");
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "keys come in order");
    assert_eq!(client.size(CACHE).await.unwrap(), 25 + 2);
    client.clear(CACHE).await.unwrap();
    assert_eq!(client.size(CACHE).await.unwrap(), 0);

    phase("eventual reads are served by any server of the stripe");
    client.put(CACHE, b"ev", b"1").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = client
            .get_with(CACHE, b"ev", ferrocotta::protocol::ReadConsistency::Eventual)
            .await
            .unwrap();
        if v == Some(b"1".to_vec()) {
            break;
        }
        assert!(Instant::now() < deadline, "eventual read never caught up");
    }

    phase("admin endpoints answer");
    let name = &array.stripe_servers(0)[0];
    let (code, body) = http_get(&array.admin_addr(name), "/v1/status");
    assert_eq!(code, 200);
    assert!(body.contains("\"role\""), "{body}");
    let (code, body) = http_get(&array.admin_addr(name), "/v1/config");
    assert_eq!(code, 200);
    assert!(body.contains("array_name = \"test-array\""), "{body}");
    let (code, _) = http_get(&array.admin_addr(name), "/healthz");
    assert_eq!(code, 200);
    let (code, body) = http_get(&array.admin_addr(name), "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("ferrocotta_raft_term"), "{body}");
    let (code, body) = http_get(&array.admin_addr(name), "/");
    assert_eq!(code, 200);
    assert!(body.contains("ferrocotta console"), "{body}");
    let (code, _) = http_get(&array.admin_addr(name), "/livez");
    assert_eq!(code, 200);
    let (code, body) = http_get(&array.admin_addr(name), "/v1/console");
    assert_eq!(code, 200);
    let view: ferrocotta::console::ArrayView = serde_json::from_str(&body).unwrap();
    assert_eq!(view.servers.len(), 3, "{body}");
    assert!(
        view.servers.iter().all(|s| s.view.is_some()),
        "every server answered: {body}"
    );
    assert!(
        view.active_of(0).is_some(),
        "the stripe's active is in the console: {body}"
    );
}

/// Writes unique keys one after another until told to stop; records what was acknowledged and the
/// times of failures.
struct Writer {
    acknowledged: Arc<Mutex<BTreeMap<String, String>>>,
    failures: Arc<Mutex<Vec<(Instant, String)>>>,
    /// (invoked, returned) of every successful write.
    successes: Arc<Mutex<Vec<(Instant, Instant)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn start_writer(client: ArrayClient, prefix: &'static str) -> Writer {
    let acknowledged = Arc::new(Mutex::new(BTreeMap::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let successes = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (a, f, s, st) = (acknowledged.clone(), failures.clone(), successes.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let mut i = 0u64;
        // Bounded: at most 100k writes, and the test stops it much sooner.
        while !st.load(Ordering::Relaxed) && i < 100_000 {
            let key = format!("{prefix}{i:06}");
            let value = format!("value-{i}");
            let invoked = Instant::now();
            match client.put(CACHE, key.as_bytes(), value.as_bytes()).await {
                Ok(_) => {
                    a.lock().unwrap().insert(key, value);
                    s.lock().unwrap().push((invoked, Instant::now()));
                }
                Err(e) => {
                    f.lock().unwrap().push((Instant::now(), e.to_string()));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            i += 1;
        }
    });
    Writer {
        acknowledged,
        failures,
        successes,
        stop,
        task,
    }
}

async fn verify_all_present(client: &ArrayClient, acknowledged: &BTreeMap<String, String>) {
    let keys: Vec<Vec<u8>> = acknowledged.keys().map(|k| k.clone().into_bytes()).collect();
    for chunk in keys.chunks(500) {
        let values = client.get_all(CACHE, chunk).await.expect("read back");
        for (k, v) in chunk.iter().zip(values) {
            let k = String::from_utf8(k.clone()).unwrap();
            assert_eq!(
                v.as_deref(),
                Some(acknowledged[&k].as_bytes()),
                "acknowledged write {k} is missing or wrong"
            );
        }
    }
}

/// A stripe is founded once, and only when all of its servers are present and empty: two of three
/// pristine servers cannot tell a new stripe from one whose data only the third holds, so they
/// wait; when the third starts, its first server founds the stripe and one election makes an
/// active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_is_founded_only_when_all_its_servers_are_present() {
    let mut array = TestArray::configured(1, 3, |_| {});
    let servers = array.stripe_servers(0);
    let (first, rest) = servers.split_first().expect("three servers");

    phase("only the second and third servers start, on pristine stores: they wait, nobody serves");
    for name in rest {
        array.spawn(name);
    }
    let mut settings = array.settings();
    settings.request_timeout = Duration::from_secs(2);
    let client = ArrayClient::bootstrap(settings).await.expect("bootstrap");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for p in client.probe_all(Duration::from_secs(1)).await {
        match p.result {
            Ok(ferrocotta::protocol::Reply::Pong { role, term, leader, .. }) => {
                assert_eq!(role, ferrocotta::protocol::Role::Mirror, "{}", p.name);
                assert_eq!(
                    (term, leader),
                    (0, None),
                    "{}: no election without the whole stripe",
                    p.name
                );
            }
            Ok(other) => panic!("{}: {other:?}", p.name),
            Err(_) => assert_eq!(&p.name, first, "only the first server is absent"),
        }
    }
    assert!(
        client.put(CACHE, b"k", b"v").await.is_err(),
        "a half-present stripe serves nothing"
    );
    for name in rest {
        let admin = array.admin_addr(name);
        let (code, body) = common::http_get(&admin, "/healthz");
        assert_eq!(code, 503, "{name} knows no active, so it is not ready: {body}");
        assert_eq!(common::http_get(&admin, "/livez").0, 200, "{name} is alive");
    }

    phase("the first server starts: the stripe is founded and serves");
    array.spawn(first);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    common::put_retrying(&client, CACHE, b"formed", b"with all three").await;
    for name in &servers {
        let (code, body) = common::http_get(&array.admin_addr(name), "/healthz");
        assert_eq!(code, 200, "{name} is ready once its stripe has an active: {body}");
    }
    for name in &servers {
        array
            .wait_status(name, Duration::from_secs(20), |s| {
                s["caches"][CACHE].as_u64() == Some(1)
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_active_under_load_loses_nothing_acknowledged() {
    let mut array = TestArray::start(1, 3);
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;

    phase("a writer runs; then the active is killed with SIGKILL");
    let writer = start_writer(client.clone(), "w");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = writer.acknowledged.lock().unwrap().len();
    assert!(before > 0, "the writer made progress before the kill");
    let killed_at = Instant::now();
    array.kill9(&active);

    phase("writes succeed again on a new active");
    let deadline = killed_at + Duration::from_secs(20);
    let recovered_at = loop {
        // The first write that started after the kill and succeeded.
        let first_after = writer
            .successes
            .lock()
            .unwrap()
            .iter()
            .find(|(invoked, _)| *invoked > killed_at)
            .map(|(_, done)| *done);
        if let Some(t) = first_after {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "no write succeeded within 20s of the kill\n{}",
            array.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "figure: first successful write {:?} after kill -9 of the active",
        recovered_at - killed_at
    );
    for (at, why) in writer.failures.lock().unwrap().iter() {
        eprintln!(
            "  failure {:?} after the kill: {why}",
            at.saturating_duration_since(killed_at)
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    writer.stop.store(true, Ordering::Relaxed);
    writer.task.await.unwrap();
    let new_active = array.wait_active(&client, 0, Duration::from_secs(10)).await;
    assert_ne!(new_active, active, "a mirror took over");

    phase("every acknowledged write is there");
    let acknowledged = writer.acknowledged.lock().unwrap().clone();
    eprintln!(
        "acknowledged {} writes, {} failed or unknown",
        acknowledged.len(),
        writer.failures.lock().unwrap().len()
    );
    verify_all_present(&client, &acknowledged).await;

    phase("the killed server restarts and catches up as a mirror");
    array.spawn(&active);
    // Writes whose outcome was unknown may or may not be there; acknowledged ones must be.
    let low = acknowledged.len() as u64;
    let high = low + writer.failures.lock().unwrap().len() as u64;
    array
        .wait_status(&active, Duration::from_secs(20), |v| {
            let n = v["caches"][CACHE].as_u64().unwrap_or(0);
            v["role"] == "mirror" && n >= low && n <= high && v["applied_index"] == v["last_log_index"]
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_every_server_and_restart_loses_nothing() {
    let mut array = TestArray::start(1, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;

    phase("write a batch of entries, each acknowledged");
    let mut acknowledged = BTreeMap::new();
    for i in 0..300 {
        let (k, v) = (format!("r{i:04}"), format!("value-{i}"));
        client.put(CACHE, k.as_bytes(), v.as_bytes()).await.unwrap();
        acknowledged.insert(k, v);
    }
    // Large batches right before the kill: a restarted server that served reads from the commit
    // index it found on disk (possibly behind what it acknowledged) would miss some of them.
    for b in 0..20 {
        let batch: Vec<(Vec<u8>, Vec<u8>)> = (0..1000)
            .map(|i| (format!("b{b:02}-{i:04}").into_bytes(), vec![b'x'; 100]))
            .collect();
        common::put_all_retrying(&client, CACHE, &batch).await;
    }
    drop(client);

    phase("kill -9 every server, then start them again in reverse order");
    let names = array.stripe_servers(0);
    for n in &names {
        array.kill9(n);
    }
    for n in names.iter().rev() {
        array.spawn(n);
    }

    phase("the stripe forms again by itself; the first linearizable read already sees every write");
    let client = array.client().await;
    let first = loop {
        match client.size(CACHE).await {
            Ok(n) => break n,
            Err(e) => eprintln!("not serving yet: {e}"),
        }
    };
    assert_eq!(
        first,
        300 + 20_000,
        "the first read after the restart saw a stale state"
    );
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    verify_all_present(&client, &acknowledged).await;
    client.put(CACHE, b"after-restart", b"ok").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stripes_spread_keys_and_fail_independently() {
    let mut array = TestArray::start(2, 3);
    let client = array.client().await;
    let active0 = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    array.wait_active(&client, 1, Duration::from_secs(20)).await;

    phase("keys land on both stripes");
    let config = client.config();
    let mut per_stripe = [0usize; 2];
    for i in 0..200 {
        let key = format!("spread-{i}");
        common::put_retrying(&client, CACHE, key.as_bytes(), b"x").await;
        per_stripe[config.stripe_of_key(key.as_bytes())] += 1;
    }
    assert!(per_stripe[0] > 50 && per_stripe[1] > 50, "uneven spread {per_stripe:?}");
    for (stripe, count) in per_stripe.iter().enumerate() {
        // Every server of the stripe holds exactly its share (mirrors may lag a moment).
        for server in array.stripe_servers(stripe) {
            let want = *count as u64;
            array
                .wait_status(&server, Duration::from_secs(10), |v| {
                    v["caches"][CACHE].as_u64() == Some(want)
                })
                .await;
        }
    }
    assert_eq!(client.size(CACHE).await.unwrap(), 200);

    phase("killing the active of stripe 0 leaves stripe 1 fully available");
    array.kill9(&active0);
    let stripe1_keys: Vec<String> = (0..200)
        .map(|i| format!("spread-{i}"))
        .filter(|k| config.stripe_of_key(k.as_bytes()) == 1)
        .collect();
    let started = Instant::now();
    for k in stripe1_keys.iter().take(50) {
        client
            .put(CACHE, k.as_bytes(), b"y")
            .await
            .expect("stripe 1 writes keep working");
        assert_eq!(client.get(CACHE, k.as_bytes()).await.unwrap(), Some(b"y".to_vec()));
    }
    eprintln!(
        "50 writes and reads on stripe 1 took {:?} while stripe 0 failed over",
        started.elapsed()
    );

    phase("stripe 0 fails over too");
    let new0 = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    assert_ne!(new0, active0);
    let k0 = (0..200)
        .map(|i| format!("spread-{i}"))
        .find(|k| config.stripe_of_key(k.as_bytes()) == 0)
        .unwrap();
    assert_eq!(client.get(CACHE, k0.as_bytes()).await.unwrap(), Some(b"x".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_quorum_refuses_writes_and_strong_reads() {
    let mut array = TestArray::start(1, 3);
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    client.put(CACHE, b"before", b"1").await.unwrap();

    phase("kill the two mirrors: the active is alone");
    for n in array.stripe_servers(0) {
        if n != active {
            array.kill9(&n);
        }
    }
    let mut settings = array.settings();
    settings.request_timeout = Duration::from_secs(3);
    let lonely = ArrayClient::bootstrap(settings).await.unwrap();

    phase("writes and linearizable reads fail with a clear error within the deadline, never succeed");
    for attempt in 0..3 {
        let started = Instant::now();
        let w = lonely.put(CACHE, b"during", b"x").await;
        let took = started.elapsed();
        assert!(
            matches!(
                w,
                Err(ClientError::NoQuorum { .. }) | Err(ClientError::Timeout(_)) | Err(ClientError::Indeterminate(_))
            ),
            "attempt {attempt}: write without quorum must fail, got {w:?}"
        );
        assert!(took < Duration::from_secs(5), "write answered after {took:?}");
        let started = Instant::now();
        let r = lonely.get(CACHE, b"before").await;
        assert!(r.is_err(), "strong read without quorum must fail, got {r:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        eprintln!("attempt {attempt}: write -> {w:?} after {took:?}; read -> {r:?}");
    }
    let last = lonely.put(CACHE, b"during", b"x").await;
    match last {
        Err(ClientError::NoQuorum { .. }) => {}
        other => panic!("once the loss is known the error is NoQuorum, got {other:?}"),
    }

    phase("eventual reads are still served by the survivor");
    let v = lonely
        .get_with(CACHE, b"before", ferrocotta::protocol::ReadConsistency::Eventual)
        .await
        .unwrap();
    assert_eq!(v, Some(b"1".to_vec()));
}

/// A mirror that was down while the active compacted its log past what the mirror has catches up
/// by receiving the active's snapshot file, and serves the same data afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_behind_the_compacted_log_catches_up_from_a_snapshot() {
    let mut array = TestArray::start_with(1, 3, |c| c.storage.snapshot_every_entries = 100);
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let mirror = array
        .stripe_servers(0)
        .into_iter()
        .find(|n| *n != active)
        .expect("a mirror");

    phase("stop a mirror; write more entries than the active keeps behind its snapshots");
    array.kill9(&mirror);
    // The active keeps 1,000 entries behind a snapshot (max_in_snapshot_log_to_keep): write more,
    // one entry each, so what the mirror misses is gone from every log.
    for i in 0..1_500u32 {
        common::put_retrying(
            &client,
            CACHE,
            format!("s{i:05}").as_bytes(),
            format!("v{i}").as_bytes(),
        )
        .await;
    }
    let big: Vec<(Vec<u8>, Vec<u8>)> = (0..2_000u32)
        .map(|i| (format!("big{i:05}").into_bytes(), vec![b'z'; 512]))
        .collect();
    // Set-up: this batch is one entry of about 1 MiB. In a debug build, snapshotting every 100
    // entries, the one live mirror may take longer to append it than openraft allows an
    // AppendEntries (one heartbeat interval, 100 ms; seen in its log as repeated timeouts), so the
    // entry is sent again until an answer comes in time; meanwhile no majority acknowledges the
    // active, which reports the batch's outcome unknown. Applying it again is harmless.
    common::put_all_retrying(&client, CACHE, &big).await;
    let written = common::read_on(
        &array,
        &active,
        ferrocotta::protocol::Op::Read(
            ferrocotta::protocol::ReadOp::Size { cache: CACHE.into() },
            ferrocotta::protocol::ReadConsistency::Eventual,
        ),
    )
    .await;
    assert_eq!(written, ferrocotta::protocol::Reply::Size(3_500));
    array
        .wait_status(&active, Duration::from_secs(30), |s| {
            s["purged_index"].as_u64().is_some_and(|p| p > 100)
        })
        .await;

    phase("restart the mirror: it installs the active's snapshot and has every entry");
    array.spawn(&mirror);
    array
        .wait_status(&mirror, Duration::from_secs(60), |s| {
            s["snapshot_index"].as_u64().is_some_and(|i| i > 100) && s["caches"][CACHE].as_u64() == Some(3_500)
        })
        .await;
    let log = std::fs::read_to_string(array.path().join("logs").join(format!("{mirror}.log"))).unwrap_or_default();
    assert!(
        log.contains("state_machine.snapshot_installed"),
        "the mirror caught up without installing a snapshot:\n{}",
        array.log_tails()
    );
    for i in [0u32, 777, 1_499] {
        let reply = common::read_on(
            &array,
            &mirror,
            ferrocotta::protocol::Op::Read(
                ferrocotta::protocol::ReadOp::Get {
                    cache: CACHE.into(),
                    key: format!("s{i:05}").into_bytes(),
                },
                ferrocotta::protocol::ReadConsistency::Eventual,
            ),
        )
        .await;
        assert_eq!(
            reply,
            ferrocotta::protocol::Reply::Value(Some(format!("v{i}").into_bytes()))
        );
    }
}
