//! Figures of the cache array against real processes on loopback (`cargo bench --bench
//! array_figures`): time from kill -9 of the active to the first successful write (several runs,
//! median), restart-to-serving time of a stripe holding 100k entries, and how long a client with
//! default settings takes to notice the array is gone, to reconnect when it returns, and to rejoin
//! after its session expired, the memory of each server holding 1M entries of 1 KiB, the time to
//! add a server to a full stripe, and the throughput and pauses of moving slots to a new stripe.
//! Prints figures; asserts nothing about speed or size.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{ProxiedArray, TestArray};
use ferrocotta::client::{ClientEvent, LockWait};
use ferrocotta::config::ConfigDuration;
use ferrocotta::protocol::LockMode;
use ferrocotta::ArrayClient;

const CACHE: &str = "ferrocotta.figures";
const FAILOVER_RUNS: usize = 7;
const RESTART_ENTRIES: u64 = 100_000;
/// Entries and value size of the memory figure (the target: 1M entries of 1 KiB).
const MEMORY_ENTRIES: u64 = 1_000_000;
const MEMORY_VALUE_BYTES: usize = 1024;
/// Overwrites of random keys after the load, so sled frees the pages of purged log entries
/// (it does as writes go on) and the figure is the steady state, not the end of a bulk load.
const MEMORY_OVERWRITES: u64 = 300_000;

async fn failover_once() -> Duration {
    let mut array = TestArray::start(1, 3);
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    for i in 0..50 {
        client.put(CACHE, format!("warm-{i}").as_bytes(), b"x").await.unwrap();
    }
    let killed = Instant::now();
    array.kill9(&active);
    let mut i = 0u64;
    loop {
        i += 1;
        let started = Instant::now();
        if client.put(CACHE, format!("after-{i}").as_bytes(), b"y").await.is_ok() && started > killed {
            return killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "no failover within 30s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn restart_with_entries() -> (Duration, Duration) {
    let mut array = TestArray::start(1, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let value = vec![b'v'; 100];
    let loaded = Instant::now();
    let mut i = 0;
    while i < RESTART_ENTRIES {
        let end = (i + 1000).min(RESTART_ENTRIES);
        let batch: Vec<(Vec<u8>, Vec<u8>)> = (i..end)
            .map(|k| (format!("e{k:08}").into_bytes(), value.clone()))
            .collect();
        client.put_all(CACHE, &batch).await.unwrap();
        i = end;
    }
    let load_time = loaded.elapsed();
    drop(client);
    let names = array.stripe_servers(0);
    for n in &names {
        array.kill9(n);
    }
    let restarted = Instant::now();
    for n in &names {
        array.spawn(n);
    }
    let client = array.client().await;
    loop {
        if let Ok(n) = client.size(CACHE).await {
            assert_eq!(n, RESTART_ENTRIES, "every entry is back");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (load_time, restarted.elapsed())
}

/// Resident memory of a process in bytes.
fn rss_bytes(pid: u32) -> u64 {
    common::rss_kib_of(pid) * 1024
}

/// Loads MEMORY_ENTRIES entries, overwrites random ones, and samples every server's RSS each 200 ms
/// throughout. Returns the raw key and value bytes, each server's peak and its RSS at the end.
async fn memory_with_entries() -> (u64, Vec<(String, u64, u64)>) {
    let array = TestArray::start(1, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let names = array.stripe_servers(0);
    let pids: Vec<u32> = names.iter().map(|n| array.pid(n)).collect();
    // The sampler keeps the peaks and hands them back when it is told to stop.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (sampling, pids) = (sampling.clone(), pids.clone());
        std::thread::spawn(move || {
            let mut peaks = vec![0u64; pids.len()];
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                for (peak, pid) in peaks.iter_mut().zip(&pids) {
                    *peak = (*peak).max(rss_bytes(*pid));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            peaks
        })
    };
    let key = |i: u64| format!("m{i:015}").into_bytes();
    let value = vec![b'v'; MEMORY_VALUE_BYTES];
    let mut i = 0;
    while i < MEMORY_ENTRIES {
        let end = (i + 200).min(MEMORY_ENTRIES);
        let batch: Vec<(Vec<u8>, Vec<u8>)> = (i..end).map(|k| (key(k), value.clone())).collect();
        client.put_all(CACHE, &batch).await.unwrap();
        i = end;
    }
    // Overwrites, 64 in flight, keys from a fixed-seed generator.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    let mut done = 0;
    while done < MEMORY_OVERWRITES {
        let keys: Vec<Vec<u8>> = (0..64)
            .map(|_| key(rand::Rng::gen_range(&mut rng, 0..MEMORY_ENTRIES)))
            .collect();
        let puts = keys.iter().map(|k| client.put(CACHE, k, &value));
        for r in futures::future::join_all(puts).await {
            r.unwrap();
        }
        done += 64;
    }
    assert_eq!(
        client.size(CACHE).await.unwrap(),
        MEMORY_ENTRIES,
        "every entry is there"
    );
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peaks = sampler.join().unwrap();
    let raw = MEMORY_ENTRIES * (key(0).len() + MEMORY_VALUE_BYTES) as u64;
    let rows = names
        .into_iter()
        .zip(pids)
        .zip(peaks)
        .map(|((name, pid), peak)| (name, peak, rss_bytes(pid)))
        .collect();
    (raw, rows)
}

async fn wait_for(
    events: &mut tokio::sync::broadcast::Receiver<ClientEvent>,
    what: &str,
    want: fn(&ClientEvent) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await {
            if want(&e) {
                return;
            }
        }
    }
    panic!("no {what} event within 60 s");
}

/// Notice, reconnect and rejoin times of a client with default settings (keep-alive every 1 s).
async fn client_times() -> (Duration, Duration, Duration, Duration) {
    let mut array = TestArray::start(1, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    client.put(CACHE, b"k", b"v").await.unwrap();
    let mut events = client.events();
    let gone = Instant::now();
    for n in array.stripe_servers(0) {
        array.kill9(&n);
    }
    wait_for(&mut events, "Disconnected", |e| *e == ClientEvent::Disconnected).await;
    let noticed = gone.elapsed();
    let back = Instant::now();
    for n in array.stripe_servers(0) {
        array.spawn(&n);
    }
    wait_for(&mut events, "Reconnected", |e| *e == ClientEvent::Reconnected).await;
    let reconnected = back.elapsed();
    while client.get(CACHE, b"k").await.is_err() {}
    let serving = back.elapsed();
    drop(client);
    drop(array);

    let window = Duration::from_secs(3);
    let array = TestArray::start_with(1, 3, |c| c.timing.client_reconnect_window = ConfigDuration(window));
    let mut settings = array.settings();
    let proxy = ProxiedArray::start(&array, &mut settings).await;
    let client = ArrayClient::connect(settings).await.unwrap();
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    client
        .lock(CACHE, b"l", LockMode::Exclusive, LockWait::NoWait)
        .await
        .unwrap();
    let mut events = client.events();
    proxy.cut();
    tokio::time::sleep(window + Duration::from_secs(2)).await;
    let healed = Instant::now();
    proxy.heal();
    wait_for(&mut events, "Rejoined", |e| matches!(e, ClientEvent::Rejoined { .. })).await;
    (noticed, reconnected, serving, healed.elapsed())
}

fn main() {
    // `cargo bench` passes `--bench`; another argument picks the figures whose name holds it
    // (`failover`, `restart`, `client`, `memory`, `add_server`, `slot_move`), e.g. `cargo bench --bench array_figures -- failover`.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wanted = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if wanted("failover") {
            failover_figures().await;
        }
        if wanted("restart") {
            restart_figures().await;
        }
        if wanted("client") {
            client_figures().await;
        }
        if wanted("memory") {
            memory_figures().await;
        }
        if wanted("slot_move") {
            slot_move_figures().await;
        }
        if wanted("add_server") {
            add_server_figures().await;
        }
    });
}

async fn failover_figures() {
    let mut times = Vec::new();
    for run in 0..FAILOVER_RUNS {
        let t = failover_once().await;
        println!(
            "failover run {run}: first successful write {:.0} ms after kill -9 of the active",
            t.as_secs_f64() * 1e3
        );
        times.push(t);
    }
    times.sort();
    println!(
        "failover: median {:.0} ms, min {:.0} ms, max {:.0} ms over {FAILOVER_RUNS} runs",
        times[FAILOVER_RUNS / 2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[FAILOVER_RUNS - 1].as_secs_f64() * 1e3
    );
}

async fn restart_figures() {
    let (load, restart) = restart_with_entries().await;
    println!(
            "restart: {RESTART_ENTRIES} entries of 100 bytes (loaded in {:.1} s) serving again {:.0} ms after kill -9 and restart of all three servers",
            load.as_secs_f64(),
            restart.as_secs_f64() * 1e3
        );
}

async fn client_figures() {
    let (noticed, reconnected, serving, rejoined) = client_times().await;
    println!(
            "client (keep-alive 1 s): noticed the array gone after {:.0} ms; reconnected {:.0} ms after the servers restarted (first linearizable read after {:.0} ms); rejoined {:.0} ms after the link healed past its window",
            noticed.as_secs_f64() * 1e3,
            reconnected.as_secs_f64() * 1e3,
            serving.as_secs_f64() * 1e3,
            rejoined.as_secs_f64() * 1e3
        );
}

/// Last: the heaviest (three servers with a gigabyte each).
async fn memory_figures() {
    let (raw, rows) = memory_with_entries().await;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    for (name, peak, end) in rows {
        println!(
                "memory: {name} holding {MEMORY_ENTRIES} entries of {MEMORY_VALUE_BYTES} B ({:.0} MiB of keys and values) after {MEMORY_OVERWRITES} overwrites: {:.0} MiB resident ({:.2}x), peak {:.0} MiB ({:.2}x)",
                mib(raw),
                mib(end),
                end as f64 / raw as f64,
                mib(peak),
                peak as f64 / raw as f64
            );
    }
}

/// Entries the stripe holds when a server is added (the figure: 1M of 1 KiB).
const ADD_SERVER_ENTRIES: u64 = 1_000_000;

/// A fourth server added to a stripe holding 1M entries of 1 KiB, under a light write load:
/// Four clients making one request at a time each, with a pause between two, counting the
/// answered and failed requests and the longest gap between two answered ones.
struct Clients {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, u64, Duration)>>,
}

impl Clients {
    /// Starts them: `request(client, worker, n)` makes worker's `n`th request; whether answered.
    fn start<F, Fut>(client: &ArrayClient, pause: Duration, request: F) -> Clients
    where
        F: Fn(ArrayClient, usize, u64) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = bool> + Send,
    {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..4)
            .map(|w| {
                let (client, stop, request) = (client.clone(), stop.clone(), request.clone());
                tokio::spawn(async move {
                    let (mut acked, mut failed, mut longest) = (0u64, 0u64, Duration::ZERO);
                    let mut last = Instant::now();
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if request(client.clone(), w, n).await {
                            acked += 1;
                            longest = longest.max(last.elapsed());
                            last = Instant::now();
                        } else {
                            failed += 1;
                        }
                        n += 1;
                        tokio::time::sleep(pause).await;
                    }
                    (acked, failed, longest)
                })
            })
            .collect();
        Clients { stop, tasks }
    }

    /// Stops them: answered, failed, longest gap.
    async fn stop(self) -> (u64, u64, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut acked, mut failed, mut longest) = (0, 0, Duration::ZERO);
        for t in self.tasks {
            let (a, f, l) = t.await.unwrap();
            acked += a;
            failed += f;
            longest = longest.max(l);
        }
        (acked, failed, longest)
    }
}

/// Puts `count` entries of [`MEMORY_VALUE_BYTES`] (keys `m000000000000000`, ...) 200 at a time.
async fn load_entries(client: &ArrayClient, count: u64) {
    let value = vec![b'v'; MEMORY_VALUE_BYTES];
    let mut i = 0;
    while i < count {
        let end = (i + 200).min(count);
        let batch: Vec<(Vec<u8>, Vec<u8>)> = (i..end)
            .map(|k| (format!("m{k:015}").into_bytes(), value.clone()))
            .collect();
        // A put_all may be repeated: a batch whose outcome was unknown (a busy machine) is sent again.
        let mut tries = 0;
        while let Err(e) = client.put_all(CACHE, &batch).await {
            tries += 1;
            assert!(tries < 5, "loading: {e}");
        }
        i = end;
    }
}

/// from `ferrocotta array add-server` to the new server voting (snapshot sent, log caught up,
/// promoted), and what the writers saw meanwhile.
async fn add_server_figures() {
    let mut array = TestArray::start(1, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let loaded = Instant::now();
    load_entries(&client, ADD_SERVER_ENTRIES).await;
    let load = loaded.elapsed();
    println!(
        "add_server: loaded {ADD_SERVER_ENTRIES} entries in {:.1} s",
        load.as_secs_f64()
    );
    // Writers: one put at a time each, counting acknowledgements and the longest gap between two.
    let writers = Clients::start(&client, Duration::from_millis(5), |client, w, n| async move {
        client
            .put(CACHE, format!("w{w}-{}", n % 100).as_bytes(), b"x")
            .await
            .is_ok()
    });
    let ports = common::free_ports(3);
    let (urls, dir) = (array.urls(), array.path().to_path_buf());
    let args = |wait: bool| {
        let mut a: Vec<String> = [
            "array",
            "add-server",
            "--stripe",
            "0",
            "--name",
            "a4",
            "--client",
            &format!("127.0.0.1:{}", ports[0]),
            "--group",
            &format!("127.0.0.1:{}", ports[1]),
            "--admin",
            &format!("127.0.0.1:{}", ports[2]),
            "--array-urls",
            &urls,
            "--secret-file",
            &dir.join("secret").display().to_string(),
            "--peer-secret-file",
            &dir.join("peer-secret").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if wait {
            a.extend(["--wait".to_string(), "30m".to_string()]);
        }
        a
    };
    let added = Instant::now();
    let out = std::process::Command::new(common::binary("ferrocotta"))
        .args(args(false))
        .output()
        .expect("ferrocotta array add-server");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    array.spawn("a4");
    let out = tokio::process::Command::new(common::binary("ferrocotta"))
        .args(args(true))
        .output()
        .await
        .expect("ferrocotta array add-server --wait");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let took = added.elapsed();
    let (acked, failed, longest) = writers.stop().await;
    println!(
        "add_server: a fourth server joined a stripe holding {ADD_SERVER_ENTRIES} entries of {MEMORY_VALUE_BYTES} B (loaded in {:.1} s) and voted {:.1} s after add-server; meanwhile 4 writers: {acked} puts acknowledged, {failed} failed, longest gap {:.0} ms",
        load.as_secs_f64(),
        took.as_secs_f64(),
        longest.as_secs_f64() * 1e3
    );
}

/// Entries of the slot-move figure (1 KiB each; half of them move).
const SLOT_MOVE_ENTRIES: u64 = 200_000;

/// `ferrocotta array add-stripe` and `rebalance` on a stripe holding [`SLOT_MOVE_ENTRIES`] entries
/// of 1 KiB: the move's throughput as the command prints it, and what a client reading and
/// writing keys all over the slots saw meanwhile (the longest gap between two answered requests
/// is the client-visible pause of a moving slot, retries included).
async fn slot_move_figures() {
    let mut array = TestArray::start(1, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    load_entries(&client, SLOT_MOVE_ENTRIES).await;
    let ports = common::free_ports(9);
    let (urls, dir) = (array.urls(), array.path().to_path_buf());
    let file = dir.join("cluster-2.toml");
    let cli = move |args: Vec<String>| {
        let mut all: Vec<String> = vec!["array".into()];
        all.extend(args);
        all.extend([
            "--array-urls".to_string(),
            urls.clone(),
            "--secret-file".into(),
            dir.join("secret").display().to_string(),
            "--peer-secret-file".into(),
            dir.join("peer-secret").display().to_string(),
        ]);
        let out = std::process::Command::new(common::binary("ferrocotta"))
            .args(&all)
            .output()
            .expect("ferrocotta array");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let mut plan: Vec<String> = vec![
        "add-stripe".into(),
        "--name".into(),
        "stripe-b".into(),
        "--out".into(),
        file.display().to_string(),
    ];
    for (n, p) in ports.chunks(3).enumerate() {
        plan.push("--server".into());
        plan.push(format!("b{}=127.0.0.1:{}:{}:{}", n + 1, p[0], p[1], p[2]));
    }
    cli(plan);
    for n in 1..=3 {
        array.spawn_from(&format!("b{n}"), &file);
    }
    cli(vec!["add-stripe".into(), "--config".into(), file.display().to_string()]);
    // Clients reading and writing keys all over the slots, counting the longest gap.
    let workers = Clients::start(&client, Duration::from_millis(2), |client, w, n| async move {
        let k = (w as u64 + n * 7919) % SLOT_MOVE_ENTRIES;
        let key = format!("m{k:015}").into_bytes();
        if k.is_multiple_of(2) {
            client.put(CACHE, &key, b"x").await.is_ok()
        } else {
            client.get(CACHE, &key).await.is_ok()
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let rebalance = cli.clone();
    let out = tokio::task::spawn_blocking(move || rebalance(vec!["rebalance".into()]))
        .await
        .unwrap();
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (acked, failed, longest) = workers.stop().await;
    for line in out.lines() {
        println!("slot_move: {line}");
    }
    println!(
        "slot_move: rebalance of a stripe holding {SLOT_MOVE_ENTRIES} entries of {MEMORY_VALUE_BYTES} B to a new stripe took {:.1} s; meanwhile 4 clients: {acked} requests answered, {failed} failed, longest gap {:.0} ms",
        took.as_secs_f64(),
        longest.as_secs_f64() * 1e3
    );
}
