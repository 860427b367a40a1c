//! Structured fuzzing of what the network and the operator feed the root crate (proptest, stable
//! Rust): the frame decoder, the codec, the server side of the handshake, the cluster config and
//! the credentials file. Every input must give a value or an error, never a panic, a hang or an
//! allocation out of proportion to the input.
//!
//! The plain tests run a bounded number of cases in the normal suite. The `fuzz_*` tests run the
//! same properties for longer: `FERROCOTTA_FUZZ_CASES=200000 cargo test --release --test
//! fuzz_decoders -- --ignored fuzz_` (default 50,000 cases each). A failing case is printed
//! (minimized) and becomes a plain test here.

mod fuzz_support;

use std::time::Duration;

use bytes::BytesMut;
use ferrocotta::config::ClusterConfig;
use ferrocotta::handshake::{self, Authority, ServerIdentity};
use ferrocotta::protocol::{
    self, ClientMessage, ConnectionRole, ErrorReply, Hello, PeerRpc, Refusal, Reply, Request, Response, ServerMessage,
    NONCE_BYTES,
};
use ferrocotta::security::Credentials;
use fuzz_support::{bytes, fuzz_cases, mutated, mutations, op, run, text, SUITE_CASES};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        (any::<u64>(), any::<u32>(), op()).prop_map(|(id, timeout_ms, op)| ClientMessage::Request(Request {
            id,
            timeout_ms,
            op
        })),
        (any::<u64>(), bytes(64)).prop_map(|(id, payload)| ClientMessage::PeerCall {
            id,
            rpc: PeerRpc::AppendEntries,
            payload
        }),
        hello().prop_map(ClientMessage::Hello),
    ]
}

fn role() -> impl Strategy<Value = ConnectionRole> {
    prop_oneof![
        Just(ConnectionRole::Client),
        text(8).prop_map(|from| ConnectionRole::Peer { from }),
        text(8).prop_map(|name| ConnectionRole::Credential { name }),
    ]
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u32>(),
        text(8),
        text(8),
        role(),
        any::<[u8; NONCE_BYTES]>(),
        any::<[u8; 32]>(),
    )
        .prop_map(
            |(protocol_version, software_version, array_name, role, client_nonce, proof)| Hello {
                protocol_version,
                software_version,
                array_name,
                role,
                client_nonce,
                proof,
            },
        )
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    let reply = prop_oneof![
        Just(Ok(Reply::Done)),
        any::<Option<Vec<u8>>>().prop_map(|v| Ok(Reply::Value(v))),
        prop::collection::vec(any::<Option<Vec<u8>>>(), 0..4).prop_map(|v| Ok(Reply::Values(v))),
        (prop::collection::vec(bytes(8), 0..4), any::<bool>()).prop_map(|(keys, more)| Ok(Reply::Keys { keys, more })),
        any::<i64>().prop_map(|n| Ok(Reply::Counter(n))),
        any::<Option<String>>().prop_map(|leader| Err(ErrorReply::NotLeader { leader })),
        text(16).prop_map(|why| Err(ErrorReply::Forbidden(why))),
    ];
    prop_oneof![
        (any::<u64>(), any::<u64>(), reply)
            .prop_map(|(id, generation, result)| { ServerMessage::Response(Response { id, generation, result }) }),
        any::<[u8; NONCE_BYTES]>().prop_map(|server_nonce| ServerMessage::Challenge { server_nonce }),
        text(16).prop_map(|why| ServerMessage::Refused(Refusal::Busy(why))),
        text(16).prop_map(ServerMessage::Fatal),
    ]
}

fn frames_property(cases: u32) {
    run(cases, bytes(256), |raw| {
        let _ = protocol::decode::<ClientMessage>(&raw);
        let _ = protocol::decode::<ServerMessage>(&raw);
        Ok(())
    });
    run(cases, (client_message(), mutations()), |(msg, damage)| {
        let valid = protocol::encode(&msg).to_vec();
        // An undamaged frame decodes to what was sent.
        match (&msg, protocol::decode::<ClientMessage>(&valid)) {
            (ClientMessage::Request(a), Ok(ClientMessage::Request(b))) => prop_assert_eq!(&a.op, &b.op),
            (_, Ok(_)) => {}
            (_, Err(e)) => return Err(TestCaseError::fail(format!("a valid frame failed to decode: {e}"))),
        }
        let _ = protocol::decode::<ClientMessage>(&mutated(valid, &damage));
        Ok(())
    });
    run(cases, (server_message(), mutations()), |(msg, damage)| {
        let valid = protocol::encode(&msg).to_vec();
        prop_assert!(protocol::decode::<ServerMessage>(&valid).is_ok());
        let _ = protocol::decode::<ServerMessage>(&mutated(valid, &damage));
        Ok(())
    });
}

fn codec_property(cases: u32) {
    // Arbitrary byte streams through the length-delimited codec with a small bound: frames are
    // yielded or refused, never larger than the bound, and the buffer is never grown to a length
    // prefix's word.
    run(cases, prop::collection::vec(bytes(64), 1..8), |chunks| {
        let mut codec = protocol::codec(256);
        let mut buf = BytesMut::new();
        for chunk in chunks {
            buf.extend_from_slice(&chunk);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(frame)) => prop_assert!(frame.len() <= 256),
                    Ok(None) => break,
                    Err(_) => return Ok(()),
                }
            }
            prop_assert!(buf.capacity() < 64 * 1024);
        }
        Ok(())
    });
}

/// Accepts only `Client` with a fixed secret.
struct OneSecret;

impl Authority for OneSecret {
    fn secret_for(&self, role: &ConnectionRole) -> Result<Option<Vec<u8>>, Refusal> {
        match role {
            ConnectionRole::Client => Ok(Some(b"fuzz-secret-0123456789".to_vec())),
            ConnectionRole::Credential { .. } => Ok(None),
            ConnectionRole::Peer { .. } => Err(Refusal::WrongPort("peers use the group port".into())),
        }
    }
}

fn identity() -> ServerIdentity {
    ServerIdentity {
        server_name: "fuzz".into(),
        array_name: "fuzz-array".into(),
        config_toml: ferrocotta::handshake::no_document(),
        authority: std::sync::Arc::new(OneSecret),
    }
}

/// Drives the server side of the handshake with `send` after the challenge; it must end (with an
/// error, since nothing random proves the secret) within its deadline.
fn handshake_with(rt: &tokio::runtime::Runtime, send: Vec<u8>) -> Result<(), TestCaseError> {
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let accept =
            tokio::spawn(
                async move { handshake::accept(server, &identity(), Duration::from_millis(300), 1 << 20).await },
            );
        let mut challenge = [0u8; 4 + 1 + NONCE_BYTES];
        let _ = client.read_exact(&mut challenge).await;
        let _ = client.write_all(&send).await;
        let _ = client.shutdown().await;
        let result = tokio::time::timeout(Duration::from_secs(5), accept)
            .await
            .map_err(|_| TestCaseError::fail("the handshake did not end within its deadline"))?
            .map_err(|e| TestCaseError::fail(format!("the handshake panicked: {e}")))?;
        prop_assert!(result.is_err(), "a random hello was accepted");
        Ok(())
    })
}

fn handshake_property(cases: u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    run(cases, bytes(128), |raw| handshake_with(&rt, raw));
    // Well-framed hellos with random fields (roles, versions, names, proofs), whole or damaged.
    run(cases, (hello(), mutations()), |(h, damage)| {
        let body = mutated(protocol::encode(&ClientMessage::Hello(h)).to_vec(), &damage);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        handshake_with(&rt, frame)
    });
}

const CONFIG: &str = r#"
array_name = "fuzz"
[security]
secret_file = "secret"
peer_secret_file = "peer-secret"
[limits]
max_frame_bytes = 1048576
[[stripes]]
name = "s1"
[[stripes.servers]]
name = "a1"
host = "127.0.0.1"
port = 9510
group_port = 9530
admin_port = 9540
data_dir = "data/a1"
[caches."c"]
ttl = "10s"
max_entries = 5
"#;

const CREDENTIALS: &str = r#"
[[credential]]
name = "reports"
secret = "0123456789abcdef0123"
access = [{ prefix = "reports.", mode = "read" }]
"#;

/// A text damaged by line: lines dropped, doubled, or a value swapped for random text.
fn mutated_lines(text: &str, ops: &[(usize, u8, String)]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for (at, kind, junk) in ops {
        if lines.is_empty() {
            break;
        }
        let i = at % lines.len();
        match kind % 4 {
            0 => {
                lines.remove(i);
            }
            1 => {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            2 => {
                if let Some((k, _)) = lines[i].split_once('=') {
                    lines[i] = format!("{k}= {junk}");
                }
            }
            _ => lines[i].push_str(junk),
        }
    }
    lines.join("\n")
}

fn config_property(cases: u32) {
    run(cases, text(256), |raw| {
        let _ = ClusterConfig::parse(&raw);
        let _ = Credentials::parse(&raw);
        Ok(())
    });
    let line_ops = prop::collection::vec((any::<usize>(), any::<u8>(), text(12)), 0..4);
    run(cases, line_ops.clone(), |ops| {
        if let Ok(c) = ClusterConfig::parse(&mutated_lines(CONFIG, &ops)) {
            // Whatever parses is valid and survives its own round trip.
            prop_assert!(c.validate().is_ok());
            prop_assert_eq!(ClusterConfig::parse(&c.to_toml()).ok(), Some(c));
        }
        Ok(())
    });
    run(cases, line_ops, |ops| {
        let _ = Credentials::parse(&mutated_lines(CREDENTIALS, &ops));
        Ok(())
    });
}

#[test]
fn frames_decode_or_fail_and_never_panic() {
    frames_property(SUITE_CASES);
}

#[test]
fn the_codec_bounds_every_frame() {
    codec_property(SUITE_CASES);
}

#[test]
fn the_server_side_of_the_handshake_refuses_every_random_hello() {
    handshake_property(SUITE_CASES / 4);
}

#[test]
fn config_and_credentials_parse_or_fail_and_never_panic() {
    config_property(SUITE_CASES);
}

#[test]
#[ignore = "long fuzz run: cargo test --release --test fuzz_decoders -- --ignored fuzz_"]
fn fuzz_frames() {
    frames_property(fuzz_cases());
    codec_property(fuzz_cases());
}

#[test]
#[ignore = "long fuzz run: cargo test --release --test fuzz_decoders -- --ignored fuzz_"]
fn fuzz_handshake() {
    handshake_property(fuzz_cases());
}

#[test]
#[ignore = "long fuzz run: cargo test --release --test fuzz_decoders -- --ignored fuzz_"]
fn fuzz_config() {
    config_property(fuzz_cases());
}
