//! The attack suite, on real processes: what a stranger, a hostile client or a careless one can
//! send, and that each gets its clear error while the array keeps serving everyone else. The fake
//! peer on the group port is `cache-array/tests/fake_peer.rs`; damaged data folders are
//! `tests/damaged_data.rs`; docs/security.md lists what is covered where.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{phase, TestArray, TestNode};
use ferrocotta::config::ConfigDuration;
use ferrocotta::handshake::{self, HandshakeError};
use ferrocotta::protocol::{
    self, client_proof, ClientMessage, ConnectionRole, ErrorReply, Hello, Op, ReadConsistency, ReadOp, Refusal,
    Request, ServerMessage, NONCE_BYTES, PROTOCOL_VERSION, SOFTWARE_VERSION,
};
use ferrocotta::{ArrayClient, ClientError};

const CACHE: &str = "attacks";

/// Reads one frame (length prefix and body) from a blocking stream.
fn read_frame(s: &mut std::net::TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body)?;
    Ok(body)
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// Connects, reads the challenge, sends `bytes`, and says what the server did then.
fn after_challenge(addr: &str, bytes: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let challenge = read_frame(&mut s).expect("the server speaks first");
    assert!(matches!(
        protocol::decode::<ServerMessage>(&challenge),
        Ok(ServerMessage::Challenge { .. })
    ));
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    loop {
        match read_frame(&mut s) {
            Ok(body) => out.push(match protocol::decode::<ServerMessage>(&body) {
                Ok(ServerMessage::Fatal(why)) => format!("fatal: {why}"),
                Ok(ServerMessage::Refused(r)) => format!("refused: {r}"),
                Ok(other) => format!("{other:?}"),
                Err(e) => format!("undecodable: {e}"),
            }),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("the server neither answered nor closed: {out:?}")
            }
            Err(_) => return format!("{} then closed", out.join(", ")),
        }
    }
}

/// A background client doing puts and gets until told to stop; how many it did and how long.
fn good_client(
    client: ArrayClient,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Duration)> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut done = 0;
        while !stop.load(Ordering::Relaxed) || done == 0 {
            let k = format!("good-{done}");
            client.put(CACHE, k.as_bytes(), b"v").await.expect("a well-behaved put");
            assert_eq!(
                client.get(CACHE, k.as_bytes()).await.expect("a well-behaved get"),
                Some(b"v".to_vec())
            );
            done += 1;
        }
        (done, started.elapsed())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_get_clear_refusals_and_learn_nothing() {
    let array = TestArray::start(1, 3);
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let addr = array.client_addr(&active);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good = good_client(client.clone(), stop.clone());

    phase("before the handshake: garbage, an oversized length, a request instead of a hello");
    let request = protocol::encode(&ClientMessage::Request(Request {
        id: 1,
        timeout_ms: 1000,
        op: Op::Ping,
    }));
    for (what, bytes) in [
        ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("a 4 GiB length", vec![0xff, 0xff, 0xff, 0xf0]),
        ("a request first", frame(&request)),
    ] {
        let addr = addr.clone();
        let outcome = tokio::task::spawn_blocking(move || after_challenge(&addr, &bytes))
            .await
            .unwrap();
        eprintln!("{what}: {outcome}");
        assert!(outcome.ends_with("closed"), "{what}: {outcome}");
    }

    phase("wrong or missing secrets, another array's name, another version: 'authentication failed', nothing more");
    let mut stranger = array.identity(b"not-the-secret-0123456789", ConnectionRole::Client);
    stranger.array_name = Some("another-array".into());
    stranger.software_version = "9.9.9".into();
    for secret in [b"not-the-secret-0123456789".to_vec(), Vec::new()] {
        stranger.secret = secret;
        match handshake::connect(&addr, &stranger, Duration::from_secs(5), 1 << 20).await {
            Err(HandshakeError::Refused(Refusal::AuthenticationFailed)) => {}
            other => panic!("a stranger got {:?}", other.map(|_| ())),
        }
    }
    let refusal = Refusal::AuthenticationFailed.to_string();
    assert!(!refusal.contains(&array.config.array_name) && !refusal.contains(SOFTWARE_VERSION));
    let unknown = array.identity(
        b"whatever-secret-0123456789",
        ConnectionRole::Credential { name: "nobody".into() },
    );
    assert!(matches!(
        handshake::connect(&addr, &unknown, Duration::from_secs(5), 1 << 20).await,
        Err(HandshakeError::Refused(Refusal::AuthenticationFailed))
    ));
    let peer_here = array.identity(&array.secret, ConnectionRole::Peer { from: "a2".into() });
    assert!(matches!(
        handshake::connect(&addr, &peer_here, Duration::from_secs(5), 1 << 20).await,
        Err(HandshakeError::Refused(Refusal::WrongPort(_)))
    ));

    phase("a hello replayed on another connection fails: its proof was for the other challenge");
    let (addr2, secret, name) = (addr.clone(), array.secret.clone(), array.config.array_name.clone());
    let outcome = tokio::task::spawn_blocking(move || {
        let mut first = std::net::TcpStream::connect(&addr2).unwrap();
        let Ok(ServerMessage::Challenge { server_nonce }) = protocol::decode(&read_frame(&mut first).unwrap()) else {
            panic!("no challenge")
        };
        let client_nonce = [7u8; NONCE_BYTES];
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            software_version: SOFTWARE_VERSION.to_string(),
            array_name: name.clone(),
            role: ConnectionRole::Client,
            client_nonce,
            proof: client_proof(&secret, &server_nonce, &client_nonce, &name, &ConnectionRole::Client),
        };
        let recorded = frame(&protocol::encode(&ClientMessage::Hello(hello)));
        after_challenge(&addr2, &recorded)
    })
    .await
    .unwrap();
    assert!(outcome.contains("authentication failed"), "{outcome}");

    phase("300 failed handshakes: each refused, and the log holds a few throttled lines, not 300");
    let before = array.log_text(&active).matches("client.handshake_failed").count();
    let stranger = Arc::new(array.identity(b"not-the-secret-0123456789", ConnectionRole::Client));
    let tries = (0..300).map(|_| {
        let (addr, stranger) = (addr.clone(), stranger.clone());
        async move {
            handshake::connect(&addr, &stranger, Duration::from_secs(10), 1 << 20)
                .await
                .is_err()
        }
    });
    let refused = futures::future::join_all(tries)
        .await
        .into_iter()
        .filter(|r| *r)
        .count();
    assert_eq!(refused, 300);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lines = array.log_text(&active).matches("client.handshake_failed").count() - before;
    eprintln!("300 failed handshakes left {lines} log lines");
    assert!(lines <= 40, "{lines} lines for 300 failed handshakes");

    phase("the well-behaved client was served all along");
    stop.store(true, Ordering::Relaxed);
    let (done, took) = good.await.unwrap();
    eprintln!("the good client did {done} put+get in {took:.2?}");
}

/// A connection from a chosen loopback source address (so a test can act as several hosts).
async fn from(source: &str, to: &str) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse::<SocketAddr>().unwrap())?;
    socket.connect(to.parse().unwrap()).await
}

/// Waits until the server closes `s` (or `within` passes); how long it took.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(within.saturating_sub(started.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

async fn puts_and_gets(client: &ArrayClient, n: usize, tag: &str) -> f64 {
    let started = Instant::now();
    for i in 0..n {
        let k = format!("{tag}-{i}");
        client.put(CACHE, k.as_bytes(), b"v").await.expect("put");
        assert_eq!(client.get(CACHE, k.as_bytes()).await.expect("get"), Some(b"v".to_vec()));
    }
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_idle_and_slow_connections_do_not_starve_a_real_client() {
    ferrocotta::admission::raise_open_files_limit().expect("raise the open files limit");
    let array = TestArray::start_with(1, 3, |c| {
        c.limits.max_connections_per_ip = 200;
        c.limits.handshake_timeout = ConfigDuration(Duration::from_secs(2));
        c.limits.frame_timeout = ConfigDuration(Duration::from_secs(2));
        c.limits.idle_timeout = ConfigDuration(Duration::from_secs(3));
    });
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let addr = array.client_addr(&active);
    let baseline = puts_and_gets(&client, 200, "before").await;
    eprintln!("a real client alone: {baseline:.0} put+get/s");

    phase("1000 connections from 127.0.0.2 that never say hello; 50 silent ones that did, from 127.0.0.3; one that sends a byte every 300 ms, from 127.0.0.4");
    let mut lurkers = Vec::new();
    let mut refused_at_once = 0;
    for _ in 0..1000 {
        match from("127.0.0.2", &addr).await {
            Ok(s) => lurkers.push(s),
            Err(_) => refused_at_once += 1,
        }
    }
    let idle_identity = array.identity(&array.secret, ConnectionRole::Client);
    let mut idle = Vec::new();
    for _ in 0..50 {
        let tcp = from("127.0.0.3", &addr).await.unwrap();
        let (framed, _) = handshake::handshake_on(tcp, "127.0.0.1", &idle_identity, 1 << 20)
            .await
            .expect("handshake");
        idle.push(framed.into_inner().into_plain().expect("plain"));
    }
    let slow = {
        let tcp = from("127.0.0.4", &addr).await.unwrap();
        let (framed, _) = handshake::handshake_on(tcp, "127.0.0.1", &idle_identity, 1 << 20)
            .await
            .expect("handshake");
        framed.into_inner().into_plain().expect("plain")
    };
    let slow = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut slow = slow;
        let started = Instant::now();
        let _ = slow.write_all(&100u32.to_be_bytes()).await;
        for _ in 0..100 {
            if slow.write_all(&[0]).await.is_err() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        None
    });

    phase("meanwhile the real client is served");
    let under_attack = puts_and_gets(&client, 200, "during").await;
    eprintln!("the same client under attack: {under_attack:.0} put+get/s");

    phase("the server closed every lurker within its deadlines");
    let counted = Arc::new(AtomicUsize::new(0));
    let mut closers = Vec::new();
    for mut s in lurkers {
        let counted = counted.clone();
        closers.push(tokio::spawn(async move {
            if closed_within(&mut s, Duration::from_secs(10)).await.is_some() {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for c in closers {
        c.await.unwrap();
    }
    let unanswered = counted.load(Ordering::Relaxed);
    eprintln!("connections without a hello: {refused_at_once} refused at connect, {unanswered} closed by the server");
    assert_eq!(unanswered + refused_at_once, 1000, "every lurker is closed");
    for mut s in idle {
        let took = closed_within(&mut s, Duration::from_secs(10)).await;
        assert!(
            took.is_some(),
            "an idle authenticated connection was kept past the idle timeout"
        );
    }
    let slow_took = slow.await.unwrap();
    eprintln!("the slow client was cut off after {slow_took:?}");
    assert!(
        slow_took.is_some(),
        "a client sending a byte every 300 ms was never cut off"
    );

    phase("afterwards the server holds only the real client's connection");
    let (_, metrics) = common::http_get(&array.admin_addr(&active), "/metrics");
    let open: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ferrocotta_client_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(u64::MAX);
    assert!(open <= 3, "{open} client connections left open");
    puts_and_gets(&client, 20, "after").await;
}

fn rss_kib_of_server(array: &TestArray, name: &str) -> u64 {
    common::rss_kib_of(array.pid(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_bounded_by_bytes_and_a_client_that_does_not_read_is_not_read() {
    let array = TestArray::start(1, 3);
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let big = vec![b'x'; 4 * 1024 * 1024];
    common::put_retrying(&client, CACHE, b"big", &big).await;

    phase("one get_all naming a 4 MiB key 100 times is refused before anything is copied");
    let rss_before = rss_kib_of_server(&array, &active);
    let keys = vec![b"big".to_vec(); 100];
    match client.get_all(CACHE, &keys).await {
        Err(ClientError::Server(ErrorReply::Invalid(why))) => assert!(why.contains("more than the limit"), "{why}"),
        other => panic!("a 400 MiB reply was not refused: {:?}", other.map(|v| v.len())),
    }
    let grown = rss_kib_of_server(&array, &active).saturating_sub(rss_before);
    eprintln!("the active grew by {grown} KiB answering it");
    assert!(grown < 64 * 1024, "the active grew by {grown} KiB");
    assert_eq!(
        client.get_all(CACHE, &keys[..3]).await.unwrap().len(),
        3,
        "12 MiB still fit"
    );

    phase("keys pages end by bytes: 5000 keys of 4000 bytes (20 MB) come in several pages");
    let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..5000)
        .map(|i| {
            let mut k = format!("long-{i:05}-").into_bytes();
            k.resize(4000, b'k');
            (k, b"v".to_vec())
        })
        .collect();
    for chunk in entries.chunks(500) {
        common::put_all_retrying(&client, "long-keys", chunk).await;
    }
    let page = client.keys("long-keys", b"long-", None, 10_000).await.unwrap();
    eprintln!("the first page holds {} keys", page.keys.len());
    assert!(page.keys.len() < 5000 && page.next.is_some());
    assert_eq!(
        client.all_keys("long-keys", b"long-", 10_000).await.unwrap().len(),
        5000
    );

    phase("a value over the limit, and a request over the frame limit, are definite refusals");
    match client.put(CACHE, b"huge", &vec![0u8; 5 * 1024 * 1024]).await {
        Err(ClientError::Server(ErrorReply::Invalid(_))) => {}
        other => panic!("a 5 MiB value: {other:?}"),
    }
    let over: Vec<(Vec<u8>, Vec<u8>)> = (0..5).map(|i| (format!("o{i}").into_bytes(), big.clone())).collect();
    match client.put_all(CACHE, &over).await {
        Err(ClientError::Invalid(why)) => assert!(why.contains("not sent"), "{why}"),
        other => panic!("a 20 MiB request: {other:?}"),
    }

    phase("a client that sends 300 gets of the 4 MiB value and reads nothing holds little memory");
    let rss_before = rss_kib_of_server(&array, &active);
    let tcp = tokio::net::TcpStream::connect(array.client_addr(&active))
        .await
        .unwrap();
    let me = array.identity(&array.secret, ConnectionRole::Client);
    let (framed, _) = handshake::handshake_on(tcp, "127.0.0.1", &me, 1 << 24).await.unwrap();
    let mut raw = framed.into_inner().into_plain().unwrap();
    {
        use tokio::io::AsyncWriteExt;
        for id in 0..300u64 {
            let req = protocol::encode(&ClientMessage::Request(Request {
                id,
                timeout_ms: 30_000,
                op: Op::Read(
                    ReadOp::Get {
                        cache: CACHE.into(),
                        key: b"big".to_vec(),
                    },
                    ReadConsistency::Eventual,
                ),
            }));
            let _ = tokio::time::timeout(Duration::from_secs(2), raw.write_all(&frame(&req))).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = rss_kib_of_server(&array, &active).saturating_sub(rss_before);
    eprintln!("300 unread 4 MiB replies: the active grew by {grown} KiB (1.2 GiB unbounded)");
    assert!(grown < 256 * 1024, "the active grew by {grown} KiB");
    puts_and_gets(&client, 20, "while-unread").await;
    drop(raw);
}

/// Writes a credentials file next to the config and points the config at it.
fn with_credentials(c: &mut ferrocotta::config::ClusterConfig) {
    c.security.credentials_file = Some("credentials.toml".into());
}

const CREDENTIALS: &str = r#"
[[credential]]
name = "reader"
secret = "reader-secret-0123456789"
access = [{ prefix = "reports.", mode = "read" }]

[[credential]]
name = "writer"
secret = "writer-secret-0123456789"
access = [{ prefix = "orders.", mode = "read_write" }]

[[credential]]
name = "writer2"
secret = "writer2-secret-0123456789"
access = [{ prefix = "orders.", mode = "read_write" }]
"#;

async fn as_credential(array: &TestArray, name: &str, secret: &str) -> Result<ArrayClient, ClientError> {
    let mut s = array.settings();
    s.credential = Some(name.into());
    s.secret = secret.as_bytes().to_vec();
    s.connect_timeout = Duration::from_secs(5);
    ArrayClient::connect(s).await
}

fn forbidden<T: std::fmt::Debug>(r: Result<T, ClientError>) {
    match r {
        Err(ClientError::Server(ErrorReply::Forbidden(why))) => eprintln!("forbidden: {why}"),
        other => panic!("expected forbidden, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_grant_only_what_their_rules_say() {
    let mut array = TestArray::configured(1, 3, with_credentials);
    std::fs::write(array.path().join("credentials.toml"), CREDENTIALS).unwrap();
    for name in array.stripe_servers(0) {
        array.spawn(&name);
    }
    let admin = array.client().await;
    array.wait_active(&admin, 0, Duration::from_secs(20)).await;
    common::put_retrying(&admin, "reports.daily", b"k", b"42").await;
    common::put_retrying(&admin, "orders.eu", b"k", b"1").await;

    phase("a read-only credential reads its prefix and nothing else, and cannot write");
    let reader = as_credential(&array, "reader", "reader-secret-0123456789")
        .await
        .unwrap();
    assert_eq!(reader.get("reports.daily", b"k").await.unwrap(), Some(b"42".to_vec()));
    forbidden(reader.put("reports.daily", b"k", b"43").await);
    forbidden(reader.get("orders.eu", b"k").await);
    forbidden(
        reader
            .lock(
                "reports.daily",
                b"k",
                ferrocotta::protocol::LockMode::Exclusive,
                ferrocotta::client::LockWait::NoWait,
            )
            .await,
    );

    phase("a read-write credential writes its prefix only; its locks are its own");
    let writer = as_credential(&array, "writer", "writer-secret-0123456789")
        .await
        .unwrap();
    writer.put("orders.eu", b"k", b"2").await.unwrap();
    forbidden(writer.get("reports.daily", b"k").await);
    forbidden(writer.put("reports.daily", b"k", b"x").await);
    let lock = writer
        .lock(
            "orders.eu",
            b"k",
            ferrocotta::protocol::LockMode::Exclusive,
            ferrocotta::client::LockWait::NoWait,
        )
        .await
        .unwrap();
    let writer2 = as_credential(&array, "writer2", "writer2-secret-0123456789")
        .await
        .unwrap();
    forbidden(writer2.unlock_session("orders.eu", b"k", lock.session).await);
    let listed = writer.list_locks(None).await.unwrap();
    assert!(listed.iter().all(|l| l.cache.starts_with("orders.")), "{listed:?}");
    assert!(
        reader.list_locks(None).await.unwrap().is_empty(),
        "a reader of reports. sees no lock of orders."
    );
    writer.unlock(&lock).await.unwrap();

    phase("a wrong secret or an unknown credential: authentication failed");
    for (name, secret) in [
        ("writer", "not-the-secret-0123456789"),
        ("nobody", "writer-secret-0123456789"),
    ] {
        match as_credential(&array, name, secret).await {
            Err(ClientError::AuthenticationFailed(_)) => {}
            other => panic!("{name}: {:?}", other.map(|_| ())),
        }
    }

    phase("the credentials file is re-read on SIGHUP: the reader may now write reports.");
    std::fs::write(
        array.path().join("credentials.toml"),
        CREDENTIALS.replace(
            r#"{ prefix = "reports.", mode = "read" }"#,
            r#"{ prefix = "reports.", mode = "read_write" }"#,
        ),
    )
    .unwrap();
    for name in array.stripe_servers(0) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(array.pid(&name) as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }
    let reloaded = common::retry_until(
        "a new connection of the reader writes",
        Duration::from_secs(10),
        || async {
            match as_credential(&array, "reader", "reader-secret-0123456789").await {
                Ok(c) => c.put("reports.daily", b"k", b"43").await.is_ok(),
                Err(_) => false,
            }
        },
        |ok| *ok,
    )
    .await;
    assert!(reloaded.is_ok(), "the reloaded credentials were never used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ports_bound_their_input_and_keep_administration_to_the_token() {
    let array = TestArray::start(1, 3);
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let mut node = TestNode::spawn(&array, "n1", "attacked", &[], "locks_held_max = 5\n");
    node.wait_ready(Duration::from_secs(30));
    let svc = node.service.clone();
    let post = |path: &str, headers: &[(&str, &str)], body: &str| common::http(&svc, "POST", path, headers, body);

    phase("bodies, headers and JSON nesting beyond their limits");
    let (code, _, _) = post(
        "/invoke/demo:echo",
        &[],
        &format!("{{\"x\":\"{}\"}}", "a".repeat(2 * 1024 * 1024)),
    );
    assert_eq!(code, 413, "a 2 MiB body");
    let long_header = "h".repeat(20 * 1024);
    let code = std::panic::catch_unwind(|| post("/invoke/demo:echo", &[("X-Long", &long_header)], "").0).unwrap_or(0);
    assert!(code == 431 || code == 0, "a 20 KiB header: {code}");
    let many: Vec<(String, String)> = (0..100).map(|i| (format!("X-H{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let code = std::panic::catch_unwind(|| post("/invoke/demo:echo", &many, "").0).unwrap_or(0);
    assert!(code == 431 || code == 0, "100 headers: {code}");
    let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
    assert_eq!(post("/invoke/demo:echo", &[], &deep).0, 400, "JSON nested 300 deep");

    phase("odd service names");
    for (name, want) in [
        ("x".repeat(200), 400),
        ("a%20b:c".to_string(), 400),
        ("..%2F..%2Fetc:passwd".to_string(), 400),
        ("no:such".to_string(), 404),
    ] {
        let (code, _, body) = post(&format!("/invoke/{name}"), &[], "");
        assert_eq!(code, want, "{name}: {body}");
    }

    phase("session ids: one the client made up is never taken, a cookie of 100 characters is ignored");
    for planted in ["attacker123", &"a".repeat(100)] {
        let cookie = format!("ssnid={planted}");
        let (code, headers, body) = post("/invoke/demo:counter", &[("Cookie", &cookie)], "");
        assert_eq!(code, 200, "{body}");
        let issued = headers
            .iter()
            .find(|(k, _)| k == "set-cookie")
            .map(|(_, v)| v.split(';').next().unwrap().to_string())
            .expect("a new session id is issued");
        assert_ne!(issued, cookie, "the planted id was taken");
        assert!(body.contains("\"counter\":1"), "{body}");
        let (_, _, body) = post("/invoke/demo:counter", &[("Cookie", &issued)], "");
        assert!(body.contains("\"counter\":2"), "the issued id continues: {body}");
    }

    phase("administrative services and the admin port need the token; public listings hide admin addresses");
    assert_eq!(post("/invoke/wm.server.cluster:clearClusterMemberList", &[], "").0, 401);
    let wrong = "Bearer not-the-token-0123456789";
    assert_eq!(
        post(
            "/invoke/wm.server.cluster:clearClusterMemberList",
            &[("Authorization", wrong)],
            ""
        )
        .0,
        401
    );
    let right = format!("Bearer {}", node.token);
    assert_eq!(
        post(
            "/invoke/wm.server.cluster:clearClusterMemberList",
            &[("Authorization", &right)],
            ""
        )
        .0,
        200
    );
    let (_, _, members) = post("/invoke/wm.server.cluster:getMembers", &[], "");
    assert!(
        !members.contains("\"admin\"") && !members.contains("instance"),
        "{members}"
    );
    for (headers, what) in [(vec![], "no token"), (vec![("Authorization", wrong)], "a wrong token")] {
        let (code, _, _) = common::http(&node.admin, "GET", "/admin/status", &headers, "");
        assert_eq!(code, 401, "the admin port with {what}");
    }

    phase("locks: never on the node's own caches, at most locks_held_max, holds counted");
    let lock = |cache: &str, key: &str| format!(r#"{{"cacheName":"{cache}","key":"{key}"}}"#);
    let (code, _, _) = post(
        "/invoke/pub.cache.lock:acquireLock",
        &[],
        &lock("ferrocotta.node.members.attacked", "n1"),
    );
    assert_eq!(code, 403);
    for i in 0..5 {
        assert_eq!(
            post(
                "/invoke/pub.cache.lock:acquireLock",
                &[],
                &lock("app", &format!("k{i}"))
            )
            .0,
            200
        );
    }
    assert_eq!(
        post("/invoke/pub.cache.lock:acquireLock", &[], &lock("app", "k5")).0,
        429
    );
    assert_eq!(
        post("/invoke/pub.cache.lock:acquireLock", &[], &lock("app", "k0")).0,
        200,
        "reentrant"
    );
    assert_eq!(
        post("/invoke/pub.cache.lock:releaseLock", &[], &lock("app", "k0")).0,
        200
    );
    assert_eq!(
        post("/invoke/pub.cache.lock:releaseLock", &[], &lock("app", "k0")).0,
        200,
        "two holds, two releases"
    );
    assert_eq!(
        post("/invoke/pub.cache.lock:releaseLock", &[], &lock("app", "k0")).0,
        409
    );
    let held = client.list_locks(Some("app")).await.unwrap();
    assert!(held.iter().all(|l| l.key != b"k0"), "the array freed k0: {held:?}");

    phase("store names cannot reach another store's locks");
    let store = |name: &str, body: &str| format!(r#"{{"storeName":"{name}",{body}}}"#);
    assert_eq!(
        post("/invoke/pub.storage:lock", &[], &store("orders", r#""key":"k""#)).0,
        200
    );
    let (_, _, body) = post("/invoke/pub.storage:get", &[], &store("orders.locks", r#""key":"k""#));
    assert!(
        body.contains("\"value\":null"),
        "store orders.locks reached the locks of orders: {body}"
    );
    assert_eq!(
        post("/invoke/pub.storage:unlock", &[], &store("orders", r#""key":"k""#)).0,
        200
    );

    phase("a 5000-byte key is bad input (400); a cache name with a newline never reaches /metrics");
    let key = "k".repeat(5000);
    let (code, _, body) = post(
        "/invoke/pub.cache:put",
        &[],
        &format!(r#"{{"cacheName":"app","key":"{key}","value":"v"}}"#),
    );
    assert_eq!(code, 400, "{body}");
    let (code, _, body) = post(
        "/invoke/pub.cache:put",
        &[],
        r#"{"cacheName":"a\nferrocotta_forged 1","key":"k","value":"v"}"#,
    );
    assert_eq!(code, 400, "{body}");
    let (_, metrics) = common::http_get(&array.admin_addr(&active), "/metrics");
    for line in metrics.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let ok = line
            .rsplit_once(' ')
            .is_some_and(|(name, value)| !name.is_empty() && value.parse::<f64>().is_ok());
        assert!(ok, "an unparseable metrics line: {line}");
        assert!(!line.starts_with("ferrocotta_forged"), "{line}");
    }
}
