//! ttl, tti, the sweep and LRU eviction, on real processes: every server gives the same answer, and
//! so does a new active after a failover.

mod common;

use std::time::{Duration, Instant};

use common::{phase, read_on, TestArray};
use ferrocotta::config::CacheConfig;
use ferrocotta::protocol::{CacheSettings, Op, PutOptions, ReadConsistency, ReadOp, Reply};

const CACHE: &str = "ferrocotta.expiry";
const LRU: &str = "ferrocotta.lru";

fn eventual_get(key: &[u8]) -> Op {
    Op::Read(
        ReadOp::Get {
            cache: CACHE.into(),
            key: key.to_vec(),
        },
        ReadConsistency::Eventual,
    )
}

async fn on_every_server(array: &TestArray, names: &[String], key: &[u8]) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::new();
    for n in names {
        match read_on(array, n, eventual_get(key)).await {
            Reply::Value(v) => out.push(v),
            other => panic!("{other:?}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_tti_sweep_and_lru_agree_on_every_server_and_across_failover() {
    let mut array = TestArray::start_with(1, 3, |c| {
        c.caches.insert(
            LRU.into(),
            CacheConfig {
                max_entries: Some(3),
                ..Default::default()
            },
        );
    });
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let servers = array.stripe_servers(0);

    phase("ttl: present everywhere before it passes, absent everywhere after");
    let ttl = |ms| PutOptions {
        ttl_ms: Some(ms),
        ..Default::default()
    };
    let written = Instant::now();
    client.put_with(CACHE, b"ttl", b"v", ttl(2000)).await.unwrap();
    client.put(CACHE, b"plain", b"v").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while on_every_server(&array, &servers, b"ttl")
        .await
        .iter()
        .any(Option::is_none)
    {
        assert!(Instant::now() < deadline, "every server applies the write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(2300).saturating_sub(written.elapsed())).await;
    assert_eq!(on_every_server(&array, &servers, b"ttl").await, vec![None, None, None]);
    assert_eq!(client.get(CACHE, b"ttl").await.unwrap(), None);
    assert!(!client.contains(CACHE, b"ttl").await.unwrap());
    assert_eq!(
        on_every_server(&array, &servers, b"plain").await,
        vec![Some(b"v".to_vec()); 3]
    );

    phase("tti: reads through the active keep the entry alive, also across a failover");
    let tti = PutOptions {
        tti_ms: Some(6000),
        ..Default::default()
    };
    client.put_with(CACHE, b"tti", b"v", tti).await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(
            client.get(CACHE, b"tti").await.unwrap(),
            Some(b"v".to_vec()),
            "read keeps it idle-alive"
        );
    }
    // 8 s since the write, past its 6 s tti: only the replicated access times keep it alive.
    array.kill9(&active);
    let failover = Instant::now();
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    eprintln!("failover took {:?}", failover.elapsed());
    let survivors: Vec<String> = servers.iter().filter(|s| **s != active).cloned().collect();
    assert_eq!(
        client.get(CACHE, b"tti").await.unwrap(),
        Some(b"v".to_vec()),
        "the new active knows the recent accesses"
    );
    assert_eq!(
        on_every_server(&array, &survivors, b"tti").await,
        vec![Some(b"v".to_vec()); 2]
    );

    phase("without reads it expires and the sweep removes it: entry counts fall on every server");
    // Watched through admin status only: a read through the active would count as an access.
    let last_read = Instant::now();
    for s in &survivors {
        array
            .wait_status(s, Duration::from_secs(15), |v| v["caches"][CACHE].as_u64() == Some(1))
            .await;
    }
    eprintln!(
        "tti entry swept {:?} after its last read (tti 6 s)",
        last_read.elapsed()
    );
    assert!(last_read.elapsed() >= Duration::from_millis(4500), "expired too early");
    assert_eq!(on_every_server(&array, &survivors, b"tti").await, vec![None, None]);
    assert_eq!(
        on_every_server(&array, &survivors, b"plain").await,
        vec![Some(b"v".to_vec()); 2]
    );

    phase("max_entries evicts the least recently used");
    for k in [b"a", b"b", b"c"] {
        client.put(LRU, k, b"1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(client.get(LRU, b"a").await.unwrap(), Some(b"1".to_vec()));
    // Let the access batch reach the log (at most every second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.put(LRU, b"d", b"1").await.unwrap();
    assert_eq!(client.get(LRU, b"b").await.unwrap(), None, "b was least recently used");
    for k in [b"a", b"c", b"d"] {
        assert!(client.get(LRU, k).await.unwrap().is_some());
    }
    assert_eq!(client.size(LRU).await.unwrap(), 3);

    phase("settings given at creation apply to every entry of the cache");
    let created = CacheSettings {
        ttl_ms: Some(500),
        ..Default::default()
    };
    assert!(client.create_cache("ferrocotta.created", created).await.unwrap());
    assert!(
        !client.create_cache("ferrocotta.created", created).await.unwrap(),
        "exists already"
    );
    client.put("ferrocotta.created", b"k", b"v").await.unwrap();
    assert!(client.get("ferrocotta.created", b"k").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        client.get("ferrocotta.created", b"k").await.unwrap(),
        None,
        "the cache's ttl applied"
    );
    for s in &survivors {
        array
            .wait_status(s, Duration::from_secs(5), |v| v["caches"][LRU].as_u64() == Some(3))
            .await;
    }
}
