//! TLS on every port, on real processes: clients verify the array against its CA and a client
//! without it (or with another) is refused; peers show each other certificates that name them;
//! client certificates when the array requires them; certificates rotated without a restart.
//! (The array and node test suites also run whole over TLS: `FERROCOTTA_TEST_TLS=1`, in CI.)

mod common;

use std::time::Duration;

use common::{phase, TestArray, TestNode, PEER_SECRET};
use ferrocotta::handshake::{self, ClientIdentity};
use ferrocotta::pipelined::Connection;
use ferrocotta::protocol::{ConnectionRole, PeerRpc, SOFTWARE_VERSION};
use ferrocotta::tls::{ClientTls, LocalCa, TlsFiles};
use ferrocotta::{ArrayClient, ClientError};

const CACHE: &str = "tls";

fn client_tls(
    ca: std::path::PathBuf,
    cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> std::sync::Arc<ClientTls> {
    let (cert_file, key_file) = match cert {
        Some((c, k)) => (Some(c), Some(k)),
        None => (None, None),
    };
    ClientTls::load(
        "test",
        TlsFiles {
            cert_file,
            key_file,
            ca_file: ca,
        },
    )
    .expect("client TLS")
}

/// The CA folder of a TLS test array.
fn tls_dir(array: &TestArray) -> std::path::PathBuf {
    array.tls.as_ref().expect("a TLS array").0.clone()
}

async fn connect_fails(array: &TestArray, tls: Option<std::sync::Arc<ClientTls>>) -> String {
    let mut s = array.settings();
    s.tls = tls;
    s.connect_timeout = Duration::from_secs(3);
    match ArrayClient::connect(s).await {
        Ok(_) => panic!("connected without trusting the array"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_port_speaks_tls_and_refuses_plain_or_untrusting_clients() {
    let mut array = TestArray::configured_tls(1, 3, true, |_| {});
    for name in array.stripe_servers(0) {
        array.spawn(&name);
    }
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;

    phase("a client that trusts the CA works over TLS");
    common::put_retrying(&client, CACHE, b"k", b"over tls").await;
    assert_eq!(client.get(CACHE, b"k").await.unwrap(), Some(b"over tls".to_vec()));

    phase("a plain client gets no answer (and a hint), one trusting another CA a certificate error");
    let plain = connect_fails(&array, None).await;
    assert!(plain.contains("--tls-ca-file"), "{plain}");
    let other_ca_dir = array.path().join("other-ca");
    LocalCa::in_dir(&other_ca_dir).unwrap();
    let stranger = connect_fails(&array, Some(client_tls(LocalCa::cert_path(&other_ca_dir), None))).await;
    assert!(
        stranger.contains("TLS") || stranger.contains("certificate"),
        "{stranger}"
    );

    phase("the admin port speaks HTTPS; plain HTTP gets nothing useful");
    let admin = array.admin_addr("a1");
    let (code, body) = common::http_get(&admin, "/v1/status");
    assert_eq!(code, 200, "{body}");
    let plain_http = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(!plain_http.contains("200 OK"), "plain HTTP was served: {plain_http}");

    phase("an integration node reaches the array over TLS and serves HTTPS; sessions work");
    let mut node = TestNode::spawn(&array, "n1", "tls", &[], "");
    node.wait_ready(Duration::from_secs(30));
    let (code, cookie, out) = node.invoke("demo:counter", None, "");
    assert_eq!(code, 200, "{out}");
    let (_, _, out) = node.invoke("demo:counter", cookie.as_deref(), "");
    assert_eq!(out["counter"], 2, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_must_show_a_certificate_that_names_them() {
    let mut array = TestArray::configured_tls(1, 3, true, |_| {});
    for name in array.stripe_servers(0) {
        array.spawn(&name);
    }
    let client = array.client().await;
    let active = array.wait_active(&client, 0, Duration::from_secs(20)).await;
    let target = array.stripe_servers(0).into_iter().find(|s| *s != active).unwrap();
    let group = array.config.find_server(&target).unwrap().1.group_addr();
    let dir = tls_dir(&array);
    let claimed = active.clone();
    let as_peer = |tls| ClientIdentity {
        software_version: SOFTWARE_VERSION.to_string(),
        array_name: Some(array.config.array_name.clone()),
        secret: PEER_SECRET.to_vec(),
        role: ConnectionRole::Peer { from: claimed.clone() },
        tls: Some(tls),
    };

    phase("without a client certificate, the group port's TLS handshake fails");
    let no_cert = client_tls(LocalCa::cert_path(&dir), None);
    let err = handshake::connect(&group, &as_peer(no_cert), Duration::from_secs(5), 1 << 20)
        .await
        .err()
        .expect("refused");
    eprintln!("no certificate: {err}");

    phase("a certificate of the CA that names another process: the peer secret is not enough");
    let ca = LocalCa::in_dir(&dir).unwrap();
    let wrong = ca
        .issue_files(&dir, "intruder", &["intruder".to_string(), "127.0.0.1".to_string()])
        .unwrap();
    let tls = client_tls(LocalCa::cert_path(&dir), Some(wrong));
    let (framed, welcome) = handshake::connect(&group, &as_peer(tls), Duration::from_secs(5), 1 << 20)
        .await
        .expect("the protocol handshake itself passes (the secret is right)");
    let conn = Connection::start(framed, welcome, None);
    assert!(
        conn.call_peer(PeerRpc::Probe, Vec::new(), Duration::from_secs(5))
            .await
            .is_err(),
        "a peer with another's certificate was served"
    );
    common::retry_until(
        "the mismatch is logged",
        Duration::from_secs(5),
        || async { array.log_text(&target) },
        |log| log.contains("peer.certificate_mismatch"),
    )
    .await
    .expect("logged");

    phase("the server's own certificate, with the peer secret: served");
    let own = (dir.join(format!("{claimed}.crt")), dir.join(format!("{claimed}.key")));
    let tls = client_tls(LocalCa::cert_path(&dir), Some(own));
    let (framed, welcome) = handshake::connect(&group, &as_peer(tls), Duration::from_secs(5), 1 << 20)
        .await
        .expect("handshake");
    let conn = Connection::start(framed, welcome, None);
    conn.call_peer(PeerRpc::Probe, Vec::new(), Duration::from_secs(5))
        .await
        .expect("a peer with its own certificate is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_must_show_a_certificate_when_the_array_requires_one() {
    let mut array = TestArray::configured_tls(1, 3, true, |c| {
        c.security.tls.as_mut().unwrap().require_client_cert = true;
    });
    for name in array.stripe_servers(0) {
        array.spawn(&name);
    }
    let dir = tls_dir(&array);

    phase("without a certificate: refused");
    let err = connect_fails(&array, Some(client_tls(LocalCa::cert_path(&dir), None))).await;
    eprintln!("without a client certificate: {err}");

    phase("with one the CA signed: served");
    let cert = LocalCa::in_dir(&dir)
        .unwrap()
        .issue_files(&dir, "app", &["app".to_string()])
        .unwrap();
    let mut s = array.settings();
    s.tls = Some(client_tls(LocalCa::cert_path(&dir), Some(cert)));
    let client = ArrayClient::connect(s)
        .await
        .expect("a client with a certificate connects");
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    common::put_retrying(&client, CACHE, b"mtls", b"ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_restart() {
    let mut array = TestArray::configured_tls(1, 3, true, |_| {});
    for name in array.stripe_servers(0) {
        array.spawn(&name);
    }
    let client = array.client().await;
    array.wait_active(&client, 0, Duration::from_secs(20)).await;
    common::put_retrying(&client, CACHE, b"before", b"rotation").await;
    let dir = tls_dir(&array);
    let old_ca = array.path().join("old-ca.crt");
    std::fs::copy(LocalCa::cert_path(&dir), &old_ca).unwrap();

    phase("a new CA and new certificates replace the files; the servers are told with SIGHUP");
    let fresh = array.path().join("fresh");
    let ca = LocalCa::in_dir(&fresh).unwrap();
    for (_, s) in array.config.servers() {
        let (cert, key) = ca
            .issue_files(&fresh, &s.name, &ferrocotta::tls::names_for(&s.name, &s.host))
            .unwrap();
        std::fs::rename(cert, dir.join(format!("{}.crt", s.name))).unwrap();
        std::fs::rename(key, dir.join(format!("{}.key", s.name))).unwrap();
    }
    std::fs::copy(LocalCa::cert_path(&fresh), LocalCa::cert_path(&dir)).unwrap();
    let names = array.stripe_servers(0);
    for name in &names {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(array.pid(name) as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }
    for name in &names {
        common::retry_until(
            "the server reloads its certificates",
            Duration::from_secs(10),
            || async { array.log_text(name) },
            |log| log.contains("tls.reloaded"),
        )
        .await
        .unwrap_or_else(|_| panic!("{name} never reloaded"));
    }

    phase("new connections: the new CA is trusted, the old one not; the data is all there");
    let mut s = array.settings();
    s.tls = Some(client_tls(LocalCa::cert_path(&fresh), None));
    let rotated = ArrayClient::connect(s.clone()).await.expect("a client of the new CA");
    assert_eq!(rotated.get(CACHE, b"before").await.unwrap(), Some(b"rotation".to_vec()));
    let refused = connect_fails(&array, Some(client_tls(old_ca, None))).await;
    eprintln!("a client of the old CA: {refused}");

    phase("peers dial each other with the new certificates: a failover still elects and serves");
    let active = array.wait_active(&rotated, 0, Duration::from_secs(20)).await;
    let mut array = array;
    array.kill9(&active);
    let rotated = ArrayClient::connect(s).await.expect("reconnect");
    let next = array.wait_active(&rotated, 0, Duration::from_secs(30)).await;
    assert_ne!(next, active);
    common::put_retrying(&rotated, CACHE, b"after", b"rotation").await;
    match rotated.get(CACHE, b"after").await {
        Ok(v) => assert_eq!(v, Some(b"rotation".to_vec())),
        Err(ClientError::NoQuorum { .. }) => panic!("no quorum after the failover"),
        Err(e) => panic!("{e}"),
    }
}
