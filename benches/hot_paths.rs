//! Micro benchmarks of the client's hot paths (`cargo bench --bench hot_paths`): encoding and
//! decoding a typical request and its reply, with and without the length-delimited codec, and
//! routing a key to its stripe. Bounded: each benchmark measures for about three seconds.
//!
//! The server side (state machine apply, log append with fsync) is in
//! `cache-array/benches/hot_paths.rs`.

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrocotta::config::{local_array, Security, ServerPorts};
use ferrocotta::protocol::{
    self, ClientMessage, Op, PutOptions, Reply, Request, Response, ServerMessage, WriteOp, HANDSHAKE_FRAME_BYTES_MAX,
};
use tokio_util::codec::{Decoder, Encoder};

/// The cache `ferrocotta bench` writes to; its name's length is typical of real cache names.
const CACHE: &str = "ferrocotta.bench";
/// Key length of the benchmarked request.
const KEY_BYTES: usize = 16;
/// Value length of the benchmarked request (the default of `ferrocotta bench`).
const VALUE_BYTES: usize = 100;
/// Distinct keys the routing benchmark cycles through, so it does not measure one key's branch
/// pattern over and over.
const ROUTING_KEYS: usize = 1024;

/// Measurement time of each benchmark: long enough for a stable mean of operations that take
/// nanoseconds to microseconds, short enough that the whole file runs in well under a minute.
const MEASUREMENT_TIME: Duration = Duration::from_secs(3);
/// Warm-up of each benchmark.
const WARM_UP_TIME: Duration = Duration::from_secs(1);
/// Samples of each benchmark (criterion's default of 100 only adds run time here).
const SAMPLE_SIZE: usize = 30;

fn key(i: usize) -> Vec<u8> {
    let k = format!("session-{i:08}").into_bytes();
    assert_eq!(k.len(), KEY_BYTES);
    k
}

/// The frame a client sends for `ArrayClient::put`: `Connection::call` wraps the op in a
/// `Request` with its id and deadline, inside `ClientMessage::Request`.
fn put_request() -> ClientMessage {
    ClientMessage::Request(Request {
        id: 1_234_567,
        timeout_ms: 5_000,
        op: Op::Write(WriteOp::Put {
            cache: CACHE.into(),
            key: key(42),
            value: vec![b'v'; VALUE_BYTES],
            opts: PutOptions::default(),
        }),
    })
}

/// The server's answer to that put when the key already held a value: the previous value comes
/// back, so this is the larger of the two usual replies (the other is `Value(None)`).
fn put_reply() -> ServerMessage {
    ServerMessage::Response(Response {
        id: 1_234_567,
        generation: 3,
        result: Ok(Reply::Value(Some(vec![b'p'; VALUE_BYTES]))),
    })
}

fn frames(c: &mut Criterion) {
    let request = put_request();
    let reply = put_reply();
    let request_bytes = protocol::encode(&request);
    let reply_bytes = protocol::encode(&reply);
    // The frame bound the server applies after the handshake is the config's; any bound above the
    // frame size costs the same, so the handshake bound stands in for it.
    let mut codec = protocol::codec(HANDSHAKE_FRAME_BYTES_MAX);
    let mut request_wire = BytesMut::new();
    codec
        .encode(request_bytes.clone(), &mut request_wire)
        .expect("a small frame encodes");
    let mut reply_wire = BytesMut::new();
    codec
        .encode(reply_bytes.clone(), &mut reply_wire)
        .expect("a small frame encodes");

    let mut g = c.benchmark_group("client_frame");
    g.throughput(Throughput::Elements(1));
    println!(
        "put request: {} bytes body, {} on the wire; reply: {} bytes body, {} on the wire",
        request_bytes.len(),
        request_wire.len(),
        reply_bytes.len(),
        reply_wire.len()
    );

    g.bench_function("encode_put_request", |b| {
        b.iter(|| protocol::encode(black_box(&request)))
    });
    g.bench_function("decode_put_request", |b| {
        b.iter(|| protocol::decode::<ClientMessage>(black_box(&request_bytes)).expect("decodes"))
    });
    g.bench_function("encode_put_reply", |b| b.iter(|| protocol::encode(black_box(&reply))));
    g.bench_function("decode_put_reply", |b| {
        b.iter(|| protocol::decode::<ServerMessage>(black_box(&reply_bytes)).expect("decodes"))
    });

    // Through the codec, as `Connection` and the server's reader and writer do: the message becomes
    // a frame appended to the write buffer, and a frame is split off the read buffer and decoded.
    // The buffers are reused, as a connection's are.
    g.bench_function("put_request_to_wire", |b| {
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            buf.clear();
            codec
                .encode(protocol::encode(black_box(&request)), &mut buf)
                .expect("encodes");
            black_box(buf.len())
        })
    });
    g.bench_function("put_request_from_wire", |b| {
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            // Stands for the socket read filling the buffer.
            buf.extend_from_slice(black_box(&request_wire));
            let frame = codec.decode(&mut buf).expect("decodes").expect("a whole frame");
            protocol::decode::<ClientMessage>(&frame).expect("decodes")
        })
    });
    g.bench_function("put_reply_to_wire", |b| {
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            buf.clear();
            codec
                .encode(protocol::encode(black_box(&reply)), &mut buf)
                .expect("encodes");
            black_box(buf.len())
        })
    });
    g.bench_function("put_reply_from_wire", |b| {
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            buf.extend_from_slice(black_box(&reply_wire));
            let frame = codec.decode(&mut buf).expect("decodes").expect("a whole frame");
            protocol::decode::<ServerMessage>(&frame).expect("decodes")
        })
    });
    g.finish();
}

fn routing(c: &mut Criterion) {
    // `ArrayClient::stripe_of` needs a connected client (the config is downloaded from a server
    // at bootstrap, there is no offline constructor), so this measures what it calls:
    // `ClusterConfig::stripe_of_key` on a 2-stripe config. The client adds one read of its
    // routing `RwLock` and an `Arc` clone per call; `stripe_of_key_behind_rwlock` models that.
    let config = local_array("bench", "127.0.0.1", 2, 3, Security::default(), |i| {
        let base = 7000 + 3 * i as u16;
        ServerPorts {
            port: base,
            group_port: base + 1,
            admin_port: base + 2,
            resp_port: None,
        }
    });
    let keys: Vec<Vec<u8>> = (0..ROUTING_KEYS).map(key).collect();
    let on_stripe_0 = keys.iter().filter(|k| config.stripe_of_key(k) == 0).count();
    println!("routing: {on_stripe_0} of {ROUTING_KEYS} keys on stripe 0 of 2");

    let mut g = c.benchmark_group("client_routing");
    g.throughput(Throughput::Elements(ROUTING_KEYS as u64));
    g.bench_function("stripe_of_key_2_stripes", |b| {
        b.iter(|| {
            let mut sum = 0usize;
            for k in black_box(&keys) {
                sum += config.stripe_of_key(k);
            }
            sum
        })
    });
    let routing = std::sync::RwLock::new(std::sync::Arc::new(config));
    g.bench_function("stripe_of_key_behind_rwlock", |b| {
        b.iter(|| {
            let mut sum = 0usize;
            for k in black_box(&keys) {
                let config = routing.read().expect("routing lock").clone();
                sum += config.stripe_of_key(k);
            }
            sum
        })
    });
    g.finish();
}

fn criterion_config() -> Criterion {
    Criterion::default()
        .measurement_time(MEASUREMENT_TIME)
        .warm_up_time(WARM_UP_TIME)
        .sample_size(SAMPLE_SIZE)
}

criterion_group! {
    name = hot_paths;
    config = criterion_config();
    targets = frames, routing
}
criterion_main!(hot_paths);
