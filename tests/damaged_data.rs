//! Damaged and lost data folders, on real processes: a damaged log or snapshot is refused with a
//! message naming the folder and what to do, never served; a server that lost its data joins its
//! stripe instead of founding a new one, and votes only once it has been caught up; when most of a
//! stripe lost its data, nothing is served until an operator says otherwise.

mod common;

use std::time::Duration;

use common::{phase, TestArray};
use ferrocotta::protocol::{Op, ReadConsistency, ReadOp, Reply};
use ferrocotta::ArrayClient;

const CACHE: &str = "durable";

fn entries(n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("k{i:05}").into_bytes(), format!("v{i}").into_bytes()))
        .collect()
}

/// Writes every entry, one put at a time (one log entry each), each acknowledged.
async fn write_all(client: &ArrayClient, entries: &[(Vec<u8>, Vec<u8>)]) {
    for (k, v) in entries {
        common::put_retrying(client, CACHE, k, v).await;
    }
}

/// How many entries a linearizable read finds with their value (any other value is a failure).
async fn count_present(client: &ArrayClient, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<usize, ferrocotta::ClientError> {
    let keys: Vec<Vec<u8>> = entries.iter().map(|(k, _)| k.clone()).collect();
    let mut found = 0;
    for (chunk_keys, chunk) in keys.chunks(200).zip(entries.chunks(200)) {
        let values = client.get_all(CACHE, chunk_keys).await?;
        for (v, (k, want)) in values.iter().zip(chunk) {
            if let Some(v) = v {
                assert_eq!(v, want, "key {} holds another value", String::from_utf8_lossy(k));
                found += 1;
            }
        }
    }
    Ok(found)
}

/// Waits until a server's log holds `event` (a stable event name).
async fn wait_logged(array: &TestArray, name: &str, event: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while !array.log_text(name).contains(event) {
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never logged {event}:\n{}",
            array.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An eventual read on one server (what it has applied).
async fn read_on(array: &TestArray, name: &str, key: &[u8]) -> Reply {
    common::read_on(
        array,
        name,
        Op::Read(
            ReadOp::Get {
                cache: CACHE.into(),
                key: key.to_vec(),
            },
            ReadConsistency::Eventual,
        ),
    )
    .await
}

/// The sled database file of a server.
fn sled_file(array: &TestArray, name: &str) -> std::path::PathBuf {
    array.data_dir(name).join("raft").join("db")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_log_is_refused_and_the_repaired_server_is_caught_up_by_its_peers() {
    let mut array = TestArray::start(1, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let data = entries(300);

    phase("300 acknowledged writes; then a3 is stopped and its log database truncated to a third");
    write_all(&client, &data).await;
    let victim = "a3";
    array.kill9(victim);
    let db = sled_file(&array, victim);
    let len = std::fs::metadata(&db).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    eprintln!("truncated {} from {len} to {} bytes", db.display(), len / 3);

    phase("a3 refuses to start: it names its folder, the damage and the repair command");
    array.spawn(victim);
    let code = array.wait_exit(victim, Duration::from_secs(30));
    let log = array.log_text(victim);
    assert_eq!(code, Some(2), "a3 must refuse to start:\n{log}");
    assert!(
        log.contains("is damaged") && log.contains("cache-array repair"),
        "{log}"
    );
    assert!(log.contains(&array.data_dir(victim).display().to_string()), "{log}");

    phase("the stripe keeps serving on a1 and a2, every acknowledged write intact");
    assert_eq!(count_present(&client, &data).await.unwrap(), data.len());

    phase("repair: the check says damaged (exit 1); --wipe sets the folder aside (exit 0)");
    let (code, out) = array.repair(victim, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("damaged") && out.contains("--wipe"), "{out}");
    let (code, out) = array.repair(victim, &["--wipe"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("set aside"), "{out}");
    let (code, out) = array.repair(victim, &[]);
    assert_eq!(code, 0, "a wiped folder is healthy (and joining): {out}");
    assert!(out.contains("Joining"), "{out}");

    phase("a3 starts empty, joins, is caught up, and votes again");
    array.spawn(victim);
    wait_logged(&array, victim, "stripe.joined", Duration::from_secs(60)).await;
    let (last_key, last_value) = data.last().unwrap();
    assert_eq!(
        read_on(&array, victim, last_key).await,
        Reply::Value(Some(last_value.clone()))
    );
    assert_eq!(
        array.wait_exit(victim, Duration::from_millis(10)),
        None,
        "a3 keeps running"
    );

    phase("a2 stopped and 64 KiB of random bytes written into the middle of its log database");
    let victim = "a2";
    array.kill9(victim);
    let db = sled_file(&array, victim);
    let len = std::fs::metadata(&db).unwrap().len();
    let noise: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&db).unwrap(),
        &noise,
        len / 2,
    )
    .unwrap();

    phase("a2 either refuses to start, or (the noise fell where sled keeps nothing) serves every write");
    array.spawn(victim);
    match array.wait_exit(victim, Duration::from_secs(15)) {
        Some(code) => {
            let log = array.log_text(victim);
            assert_eq!(code, 2, "a clear refusal, not a crash:\n{log}");
            assert!(
                log.contains("is damaged") && log.contains("cache-array repair"),
                "{log}"
            );
            eprintln!("a2 refused its damaged log");
        }
        None => {
            eprintln!("a2 started: the noise hit no live data; checking that it holds everything");
            let (k, v) = data.last().unwrap();
            assert_eq!(read_on(&array, victim, k).await, Reply::Value(Some(v.clone())));
        }
    }
    assert_eq!(count_present(&client, &data).await.unwrap(), data.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_missing_snapshot_is_refused() {
    // Small snapshots, so that a server's log is compacted behind one quickly.
    let mut array = TestArray::start_with(1, 3, |c| c.storage.snapshot_every_entries = 100);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let data = entries(1400);

    phase("1400 writes: every server takes snapshots and compacts its log behind them");
    write_all(&client, &data).await;
    let victim = "a2";
    let snapshot = array.data_dir(victim).join("snapshots").join("snapshot.bin");
    array
        .wait_status(victim, Duration::from_secs(30), |s| {
            s["purged_index"].as_u64().is_some_and(|p| p > 0)
        })
        .await;
    array.kill9(victim);
    assert!(snapshot.exists());

    phase("one byte of a2's snapshot flipped: a2 refuses to start, naming the snapshot");
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&snapshot, &bytes).unwrap();
    array.spawn(victim);
    assert_eq!(array.wait_exit(victim, Duration::from_secs(30)), Some(2));
    let log = array.log_text(victim);
    assert!(
        log.contains("snapshot") && log.contains("checksum") && log.contains("cache-array repair"),
        "{log}"
    );

    phase("the snapshot deleted while the log was compacted behind it: refused too");
    std::fs::remove_file(&snapshot).unwrap();
    array.spawn(victim);
    assert_eq!(array.wait_exit(victim, Duration::from_secs(30)), Some(2));
    let log = array.log_text(victim);
    assert!(
        log.contains("snapshot that holds those entries") && log.contains("missing"),
        "{log}"
    );

    phase("repaired, a2 is caught up from a snapshot of the active");
    let (code, out) = array.repair(victim, &["--wipe"]);
    assert_eq!(code, 0, "{out}");
    array.spawn(victim);
    wait_logged(&array, victim, "stripe.joined", Duration::from_secs(60)).await;
    let (k, v) = data.last().unwrap();
    assert_eq!(read_on(&array, victim, k).await, Reply::Value(Some(v.clone())));
    assert_eq!(count_present(&client, &data).await.unwrap(), data.len());
}

/// The probe's scenario: two of three data folders deleted while the third server is down. A
/// stripe is founded once: the two empty servers found nothing and serve nothing; when the third
/// comes back they know the stripe exists, but they lost whatever votes they had cast, so they
/// withhold their votes until an operator lets one of them vote. Then the third server's data is
/// served, every acknowledged write of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_wiped_servers_never_found_a_second_stripe() {
    let mut array = TestArray::start(1, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let data = entries(200);

    phase("200 acknowledged writes; all three stop; a2's and a3's data folders are deleted");
    write_all(&client, &data).await;
    for name in ["a1", "a2", "a3"] {
        array.kill9(name);
    }
    for name in ["a2", "a3"] {
        std::fs::remove_dir_all(array.data_dir(name)).unwrap();
    }

    phase("a2 and a3 start empty: no stripe is founded, nothing is served (no empty answers)");
    array.spawn("a2");
    array.spawn("a3");
    let mut settings = array.settings();
    settings.request_timeout = Duration::from_secs(2);
    settings.connect_timeout = Duration::from_secs(20);
    let empty_pair = ArrayClient::bootstrap(settings.clone()).await.expect("bootstrap");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (k0, _) = &data[0];
    match empty_pair.get(CACHE, k0).await {
        Err(e) => eprintln!("as it must, the empty pair does not serve: {e}"),
        Ok(v) => panic!("two wiped servers served {v:?}: a second stripe was founded"),
    }

    phase("a1 returns with the data: a2 and a3 join, but withhold their votes (they may have lost some)");
    array.spawn("a1");
    wait_logged(&array, "a2", "stripe.joining", Duration::from_secs(20)).await;
    wait_logged(&array, "a3", "stripe.joining", Duration::from_secs(20)).await;
    wait_logged(&array, "a2", "stripe.vote_withheld", Duration::from_secs(20)).await;
    let probes = empty_pair.probe_all(Duration::from_secs(1)).await;
    assert!(
        common::claimed_actives(&probes, 0).is_empty(),
        "no active without an operator: {probes:?}"
    );

    phase("the operator lets a2 vote (cache-array repair --allow-vote): a1 is elected, all its data served");
    array.kill9("a2");
    let (code, out) = array.repair("a2", &["--allow-vote"]);
    assert_eq!(code, 0, "{out}");
    array.spawn("a2");
    let client = ArrayClient::connect(settings).await.expect("connect");
    let active = array.wait_active(&client, 0, Duration::from_secs(30)).await;
    assert_eq!(active, "a1", "only a1 holds the data");
    let present = common::retry_until(
        "every acknowledged write is back",
        Duration::from_secs(20),
        || count_present(&client, &data),
        |n| matches!(n, Ok(n) if *n == data.len()),
    )
    .await
    .unwrap_or_else(|n| panic!("{n:?} of {} writes are served", data.len()));
    assert_eq!(present.unwrap(), data.len());
    wait_logged(&array, "a2", "stripe.joined", Duration::from_secs(30)).await;
    wait_logged(&array, "a3", "stripe.joined", Duration::from_secs(30)).await;
}
