//! Bootstrap from the URL list (SPEC 3.1) and the wire protocol's defences (SPEC 2.6), against
//! real array servers.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{free_ports, phase, TestArray};
use ferrocotta::handshake::{self, ClientIdentity};
use ferrocotta::protocol::{ConnectionRole, SOFTWARE_VERSION};
use ferrocotta::{ArrayClient, ClientError};

const CACHE: &str = "ferrocotta.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_follows_the_url_list_and_refuses_with_reasons() {
    let array = TestArray::start(1, 3);
    let dead = format!("127.0.0.1:{}", free_ports(1)[0]);
    let alive = array.client_addr("a2");

    phase("first URL dead, second alive: the config comes from the second");
    let mut s = array.settings();
    s.array_urls = vec![dead.clone(), alive.clone()];
    let client = ArrayClient::connect(s).await.expect("bootstrap through the second URL");
    assert_eq!(client.config_source(), (alive.as_str(), "a2"));
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    client.put(CACHE, b"k", b"v").await.unwrap();

    phase("every URL dead: an error naming each URL, within connect_timeout");
    let dead2 = format!("127.0.0.1:{}", free_ports(1)[0]);
    let mut s = array.settings();
    s.array_urls = vec![dead.clone(), dead2.clone()];
    s.connect_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let err = ArrayClient::connect(s).await.err().expect("no URL answers");
    let took = started.elapsed();
    let text = err.to_string();
    assert!(matches!(err, ClientError::Bootstrap { .. }), "{err:?}");
    assert!(
        text.contains(&dead) && text.contains(&dead2),
        "the error names each URL: {text}"
    );
    assert!(
        took < Duration::from_secs(4),
        "gave up after {took:?}, connect_timeout was 2s"
    );
    eprintln!("all URLs dead: {text} (after {took:?})");

    phase("version mismatch: the exact message");
    let mut s = array.settings();
    s.software_version = "9.9.0".into();
    let err = ArrayClient::connect(s).await.err().expect("mismatch refused");
    assert_eq!(
        err.to_string(),
        format!("Client/Server Version Mismatch Error: Client Version: 9.9.0, Server Version: {SOFTWARE_VERSION}")
    );

    phase("wrong array name: refused with the reason");
    let mut s = array.settings();
    s.array_name = Some("another-array".into());
    let err = ArrayClient::connect(s).await.err().expect("wrong name refused");
    assert!(matches!(err, ClientError::WrongArrayName { .. }), "{err:?}");
    assert!(
        err.to_string().contains("another-array") && err.to_string().contains("test-array"),
        "{err}"
    );

    phase("wrong secret: refused with the reason");
    let mut s = array.settings();
    s.secret = b"not-the-secret-at-all".to_vec();
    let err = ArrayClient::connect(s).await.err().expect("bad secret refused");
    assert!(matches!(err, ClientError::AuthenticationFailed(_)), "{err:?}");

    phase("a refusal is final: it does not wait for connect_timeout");
    let mut s = array.settings();
    s.secret = b"not-the-secret-at-all".to_vec();
    s.connect_timeout = Duration::from_secs(30);
    let started = Instant::now();
    assert!(ArrayClient::connect(s).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_the_configs_servers_retries_then_gives_up_or_succeeds() {
    let mut array = TestArray::start(2, 3);
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    array.wait_active(&client, 1, Duration::from_secs(20)).await;
    drop(client);

    phase("every server of stripe 1 is down; the URL list reaches stripe 0 only");
    let stripe1 = array.stripe_servers(1);
    for n in &stripe1 {
        array.kill9(n);
    }
    let mut s = array.settings();
    s.array_urls = vec![array.client_addr("a1")];
    s.max_connect_retries = Some(2);
    s.reconnect_wait_interval = Duration::from_millis(200);
    let err = ArrayClient::connect(s.clone())
        .await
        .err()
        .expect("stripe 1 is unreachable");
    match &err {
        ClientError::ConnectRetriesExhausted { retries, failures } => {
            assert_eq!(*retries, 2);
            for n in &stripe1 {
                assert!(failures.iter().any(|(who, _)| who.contains(n.as_str())), "{err}");
            }
        }
        other => panic!("expected ConnectRetriesExhausted, got {other:?}"),
    }

    phase("with max_connect_retries unset the client waits until a server of stripe 1 returns");
    s.max_connect_retries = None;
    let waiting = tokio::spawn(ArrayClient::connect(s));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "still waiting for stripe 1");
    array.spawn(&stripe1[0]);
    let client = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("connects once a stripe-1 server is back")
        .unwrap()
        .expect("connect succeeds");
    assert_eq!(client.config().stripes.len(), 2);
}

/// A raw TCP connection that has passed the handshake (so it can send frames the client library
/// never would).
async fn authenticated_stream(array: &TestArray, name: &str) -> std::net::TcpStream {
    let identity = ClientIdentity {
        software_version: SOFTWARE_VERSION.to_string(),
        array_name: Some(array.config.array_name.clone()),
        secret: array.secret.clone(),
        role: ConnectionRole::Client,
        tls: None,
    };
    let (framed, _) = handshake::connect(&array.client_addr(name), &identity, Duration::from_secs(5), 1 << 20)
        .await
        .expect("handshake");
    let stream = framed.into_inner().into_plain().expect("plain TCP").into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

/// Sends raw bytes and reports what the server did: closed the connection, or sent something.
fn poke(mut stream: std::net::TcpStream, bytes: &[u8]) -> String {
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = stream.write_all(bytes);
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return format!("closed after {} bytes of reply", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                panic!(
                    "the server neither answered nor closed within 5s (got {} bytes)",
                    got.len()
                )
            }
            Err(_) => return format!("reset after {} bytes of reply", got.len()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_do_not_disturb_other_clients() {
    let array = TestArray::start(1, 3);
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;

    phase("a well-behaved client writes and reads all along");
    let good = client.clone();
    let good_task = tokio::spawn(async move {
        let mut done = 0;
        for i in 0..400 {
            let k = format!("good-{i}");
            good.put(CACHE, k.as_bytes(), b"v").await.expect("well-behaved put");
            assert_eq!(
                good.get(CACHE, k.as_bytes()).await.expect("well-behaved get"),
                Some(b"v".to_vec())
            );
            done += 1;
        }
        done
    });

    let addr = array.client_addr(&active);
    phase("before the handshake: garbage, an oversized length, a truncated frame");
    for bytes in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff, 0xff, 0xff, 0xf0],
        [&200u32.to_be_bytes()[..], &[1, 2, 3]].concat(),
    ] {
        let stream = std::net::TcpStream::connect(&addr).unwrap();
        let outcome = tokio::task::spawn_blocking(move || poke(stream, &bytes)).await.unwrap();
        eprintln!("unauthenticated poke: {outcome}");
    }

    phase("after the handshake: a malformed frame and an oversized one");
    let stream = authenticated_stream(&array, &active).await;
    let malformed = [&6u32.to_be_bytes()[..], &[0xde, 0xad, 0xbe, 0xef, 0x99, 0x99]].concat();
    let outcome = tokio::task::spawn_blocking(move || poke(stream, &malformed))
        .await
        .unwrap();
    assert!(
        outcome.starts_with("closed") || outcome.starts_with("reset"),
        "{outcome}"
    );
    let stream = authenticated_stream(&array, &active).await;
    let oversized = (array.config.limits.max_frame_bytes + 1).to_be_bytes().to_vec();
    let outcome = tokio::task::spawn_blocking(move || poke(stream, &oversized))
        .await
        .unwrap();
    assert!(
        outcome.starts_with("closed") || outcome.starts_with("reset"),
        "{outcome}"
    );

    phase("many garbage connections at once");
    let mut pokes = Vec::new();
    for i in 0..50u32 {
        let addr = addr.clone();
        pokes.push(tokio::task::spawn_blocking(move || {
            let stream = std::net::TcpStream::connect(&addr).unwrap();
            let bytes: Vec<u8> = (0..64u32).map(|j| (i * 31 + j * 7) as u8).collect();
            poke(stream, &bytes)
        }));
    }
    for p in pokes {
        p.await.unwrap();
    }

    phase("the well-behaved client finished every operation, and the server still serves");
    assert_eq!(good_task.await.unwrap(), 400);
    let (code, body) = common::http_get(&array.admin_addr(&active), "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("ferrocotta_rejected_connections_total"), "{body}");
    client.put(CACHE, b"after", b"ok").await.unwrap();
}
