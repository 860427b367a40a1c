//! Stripes added and removed while the array serves (`ferrocotta array add-stripe`, `rebalance`,
//! `remove-stripe`), on loopback: every key keeps its last value through both moves, a client
//! connected before the change follows the keys to their new stripe, and what belongs to a
//! session (an ephemeral entry, a lock) moves with its key to the client's session on the other
//! stripe, still its, and goes when the client closes. Under load and faults: the chaos scenario
//! `stripe_changes`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{free_ports, TestArray};
use ferrocotta::client::LockWait;
use ferrocotta::protocol::LockMode;

const CACHE: &str = "stripes";

/// Runs `ferrocotta array ARGS` against the array; (exit code, stdout).
fn array_cli(array: &TestArray, args: &[&str]) -> (i32, String) {
    let dir = array.path();
    let out = std::process::Command::new(common::binary("ferrocotta"))
        .arg("array")
        .args(args)
        .arg("--array-urls")
        .arg(array.urls())
        .arg("--array-name")
        .arg(&array.config.array_name)
        .arg("--secret-file")
        .arg(dir.join("secret"))
        .arg("--peer-secret-file")
        .arg(dir.join("peer-secret"))
        .output()
        .expect("ferrocotta array");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!(
        "ferrocotta array {}: {:?}\n{stdout}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

fn key(i: usize) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

async fn check_every_key(client: &ferrocotta::ArrayClient, keys: usize, round: usize) {
    for i in 0..keys {
        let v = client.get(CACHE, &key(i)).await.expect("a read");
        assert_eq!(v, Some(format!("v{round}-{i}").into_bytes()), "key {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_is_added_filled_and_drained_with_every_key_kept() {
    let resp_port = free_ports(1)[0];
    let mut array = TestArray::start_with(1, 1, |c| c.stripes[0].servers[0].resp_port = Some(resp_port));
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    const KEYS: usize = 400;
    for i in 0..KEYS {
        client.put(CACHE, &key(i), format!("v0-{i}").as_bytes()).await.unwrap();
    }
    // A session's ephemeral entry and lock, in slots that move.
    let holder = array.client().await;
    let moving = |prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}-{i}").into_bytes())
            .find(|k| ferrocotta::slots::slot_of_key(k) > 12_000)
            .unwrap()
    };
    let (high, locked) = (moving("eph"), moving("lock"));
    holder.put_ephemeral(CACHE, &high, b"mine").await.unwrap();
    let lock = holder
        .lock(CACHE, &locked, LockMode::Exclusive, LockWait::NoWait)
        .await
        .unwrap();

    // The new stripe's file, its server, its registration.
    let file = array.path().join("cluster-2.toml");
    let ports = free_ports(3);
    let server = format!("b1=127.0.0.1:{}:{}:{}", ports[0], ports[1], ports[2]);
    let (code, _) = array_cli(
        &array,
        &[
            "add-stripe",
            "--name",
            "stripe-b",
            "--server",
            &server,
            "--out",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0);
    array.spawn_from("b1", Path::new(&file));
    let (code, _) = array_cli(&array, &["add-stripe", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 0);

    // The holder learns of the new stripe and opens its session there (its keep-alive does).
    let deadline = Instant::now() + Duration::from_secs(30);
    while holder.session_ids().iter().flatten().count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no session on the new stripe: {:?}",
            holder.session_ids()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Half the slots move, the session's entry and lock with theirs.
    let (code, out) = array_cli(&array, &["rebalance", "--batch-slots", "1024"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("stripe 1 `stripe-b`: 8192 slots"), "{out}");
    assert!(out.contains("longest pause"), "{out}");
    check_every_key(&client, KEYS, 0).await;
    assert!(
        client.config().stripes.len() == 2,
        "the old client follows the new layout"
    );
    // Writes go to the new stripe now, and the session's entry and lock are as they were.
    for i in 0..KEYS {
        client.put(CACHE, &key(i), format!("v1-{i}").as_bytes()).await.unwrap();
    }
    let fresh = array.client().await;
    check_every_key(&fresh, KEYS, 1).await;
    let on_b = (0..KEYS).filter(|&i| fresh.stripe_of(&key(i)) == 1).count();
    assert!(on_b > KEYS / 4, "only {on_b} of {KEYS} keys on the new stripe");
    // The Redis-protocol port of stripe 0 answers from the live state: its keys, a moved key
    // (on a stripe it has no address for: TRYAGAIN), and its slots as they are now.
    let pass = String::from_utf8(array.secret.clone()).unwrap();
    let mut redis = redis::Client::open(format!("redis://:{pass}@127.0.0.1:{resp_port}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (a_key, b_key) = (
        (0..KEYS).find(|&i| fresh.stripe_of(&key(i)) == 0).unwrap(),
        (0..KEYS).find(|&i| fresh.stripe_of(&key(i)) == 1).unwrap(),
    );
    let () = redis::cmd("SET")
        .arg(key(a_key))
        .arg("r")
        .query_async(&mut redis)
        .await
        .unwrap();
    let got: Option<String> = redis::cmd("GET").arg(key(a_key)).query_async(&mut redis).await.unwrap();
    assert_eq!(got.as_deref(), Some("r"));
    let moved = redis::cmd("SET")
        .arg(key(b_key))
        .arg("r")
        .query_async::<()>(&mut redis)
        .await
        .unwrap_err();
    assert_eq!(moved.code(), Some("TRYAGAIN"), "{moved}");
    let slots: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut redis)
        .await
        .unwrap();
    let slots = format!("{slots:?}");
    assert!(
        slots.contains("int(0), int(8191)") && !slots.contains("int(16383)"),
        "{slots}"
    );
    // The session's entry and lock live on the new stripe now, and are still its.
    assert_eq!((fresh.stripe_of(&high), fresh.stripe_of(&locked)), (1, 1));
    assert_eq!(holder.get(CACHE, &high).await.unwrap(), Some(b"mine".to_vec()));
    assert_eq!(fresh.get(CACHE, &high).await.unwrap(), Some(b"mine".to_vec()));
    let holder_on_b = holder.session_ids()[1].unwrap();
    let locks = fresh.list_locks(Some(CACHE)).await.unwrap();
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(
        locks[0].holders.iter().map(|h| h.0).collect::<Vec<_>>(),
        vec![holder_on_b]
    );
    let taken = fresh.try_lock(CACHE, &locked, LockMode::Exclusive).await.unwrap();
    assert!(taken.is_none(), "the moved lock is still held");

    // The new stripe is drained and leaves; every key is still there, on stripe 0, and so are
    // the session's entry and lock.
    let (code, out) = array_cli(&array, &["remove-stripe", "stripe-b", "--batch-slots", "2048"]);
    assert_eq!(code, 0, "{out}");
    array.kill9("b1");
    check_every_key(&client, KEYS, 1).await;
    assert_eq!(client.config().stripes.len(), 1);
    let last = array.client().await;
    check_every_key(&last, KEYS, 1).await;
    assert_eq!(last.get(CACHE, &high).await.unwrap(), Some(b"mine".to_vec()));
    assert!(last
        .try_lock(CACHE, &locked, LockMode::Exclusive)
        .await
        .unwrap()
        .is_none());
    // The holder releases the lock it took before both moves, and its entry goes when it closes.
    holder.unlock(&lock).await.unwrap();
    let mine = last.try_lock(CACHE, &locked, LockMode::Exclusive).await.unwrap();
    assert!(mine.is_some(), "the lock is free once its holder released it");
    holder.close().await;
    assert_eq!(last.get(CACHE, &high).await.unwrap(), None);
    // A stripe that is not the last one cannot be removed.
    let (code, _) = array_cli(&array, &["remove-stripe", "stripe-1"]);
    assert_ne!(code, 0);
}
