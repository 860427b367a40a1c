//! The Redis-protocol front end (docs/redis.md) against real array servers: the `redis` crate
//! (RESP2 and RESP3, pipelines, its cluster client), `redis-cli` (with `-c`, `-3`, `--pipe`) and
//! `redis-benchmark --cluster`. redis-cli and redis-benchmark come from Debian's `redis-tools`
//! (.ci/run installs it); without them those parts say SKIPPED (and fail in CI).

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_ports, phase, tool_available, TestArray};
use ferrocotta::slots::{slot_of_key, stripe_of_slot};
use redis::AsyncCommands;

/// A plain (no TLS) array of `stripes` x `per` servers, each with a Redis-protocol port, with an
/// active in every stripe; the actives' names by stripe.
async fn resp_array(stripes: usize, per: usize) -> (TestArray, Vec<String>) {
    resp_array_tls(stripes, per, false).await
}

/// [`resp_array`], with TLS on every port or not.
async fn resp_array_tls(stripes: usize, per: usize, tls: bool) -> (TestArray, Vec<String>) {
    let ports = free_ports(stripes * per);
    let mut array = TestArray::configured_tls(stripes, per, tls, |c| {
        let servers = c.stripes.iter_mut().flat_map(|s| s.servers.iter_mut());
        for (server, port) in servers.zip(&ports) {
            server.resp_port = Some(*port);
        }
    });
    let names: Vec<String> = array.config.servers().map(|(_, s)| s.name.clone()).collect();
    for name in &names {
        array.spawn(name);
    }
    let client = array.client().await;
    let mut actives = Vec::new();
    for s in 0..stripes {
        actives.push(array.wait_active(&client, s, Duration::from_secs(30)).await);
    }
    (array, actives)
}

/// `127.0.0.1:port` of a server's Redis-protocol port.
fn resp_addr(array: &TestArray, name: &str) -> String {
    let (_, s) = array.config.servers().find(|(_, s)| s.name == name).expect("server");
    s.resp_addr().expect("a resp port")
}

fn secret(array: &TestArray) -> String {
    String::from_utf8(array.secret.clone()).unwrap()
}

fn url(addr: &str, password: Option<&str>, resp3: bool) -> String {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let proto = if resp3 { "?protocol=resp3" } else { "" };
    format!("redis://{auth}{addr}/{proto}")
}

async fn connect(
    addr: &str,
    password: Option<&str>,
    resp3: bool,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    // A pipeline that reads after each write waits for a commit per command: more than the
    // client's default half second in all.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(20)));
    redis::Client::open(url(addr, password, resp3))?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// A reply as text, the same for RESP2 and RESP3: `nil`, numbers, strings, `[a, b]`, `{k: v}`, and
/// errors as `!CODE text`.
fn show(v: &redis::Value) -> String {
    use redis::Value as V;
    match v {
        V::Nil => "nil".into(),
        V::Int(n) => n.to_string(),
        V::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        V::SimpleString(s) => s.clone(),
        V::Okay => "OK".into(),
        V::Array(items) | V::Set(items) => format!("[{}]", items.iter().map(show).collect::<Vec<_>>().join(", ")),
        V::Map(pairs) => format!(
            "{{{}}}",
            pairs
                .iter()
                .map(|(k, v)| format!("{}: {}", show(k), show(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        V::VerbatimString { text, .. } => text.clone(),
        V::Double(d) => d.to_string(),
        V::Boolean(b) => b.to_string(),
        V::ServerError(e) => format!("!{e:?}"),
        other => format!("{other:?}"),
    }
}

/// Runs a command; the reply as [`show`] writes it, an error as `!` and its text.
async fn q(con: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> String {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match cmd.query_async::<redis::Value>(con).await {
        Ok(v) => show(&v),
        Err(e) => error_line(&e),
    }
}

/// An error as the server's line: `!CODE detail`.
fn error_line(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("!{code} {detail}"),
        (Some(code), None) => format!("!{code}"),
        _ => format!("!{e}"),
    }
}

/// A hash tag whose keys live on `stripe` of `stripes`.
fn tag_on(stripe: usize, stripes: usize, seed: &str) -> String {
    (0..)
        .map(|i| format!("{seed}{i}"))
        .find(|t| stripe_of_slot(slot_of_key(t.as_bytes()), stripes) == stripe)
        .unwrap()
}

/// Checks each (command, expected reply); an expected reply ending in `*` matches by prefix.
async fn expect_all(con: &mut redis::aio::MultiplexedConnection, cases: &[(&[&str], &str)]) {
    for (args, expected) in cases {
        let got = q(con, args).await;
        let ok = match expected.strip_suffix('*') {
            Some(prefix) => got.starts_with(prefix),
            None => got == *expected,
        };
        assert!(ok, "{args:?}: expected {expected:?}, got {got:?}");
    }
}

/// Every supported string command with its edge cases, on keys of the connection's stripe
/// (tag `t`).
async fn string_commands(con: &mut redis::aio::MultiplexedConnection, t: &str) {
    let k = format!("{{{t}}}k");
    let (a, b, c, d, none) = (
        format!("{{{t}}}a"),
        format!("{{{t}}}b"),
        format!("{{{t}}}c"),
        format!("{{{t}}}d"),
        format!("{{{t}}}none"),
    );
    let (n, s, ap) = (format!("{{{t}}}n"), format!("{{{t}}}s"), format!("{{{t}}}ap"));
    expect_all(
        con,
        &[
            (&["SET", &k, "v1"], "OK"),
            (&["GET", &k], "v1"),
            (&["SET", &k, "v2", "NX"], "nil"),
            (&["SET", &k, "v3", "XX"], "OK"),
            (&["SET", &none, "v", "XX"], "nil"),
            (&["GET", &none], "nil"),
            (&["SET", &k, "v4", "GET"], "v3"),
            (&["SET", &none, "v", "NX", "GET"], "nil"),
            (&["DEL", &none], "1"),
            (&["SET", &k, "x", "NX", "XX"], "!ERR syntax error*"),
            (
                &["SET", &k, "x", "EX", "0"],
                "!ERR invalid expire time in 'set' command*",
            ),
            (
                &["SET", &k, "x", "EX", "abc"],
                "!ERR value is not an integer or out of range*",
            ),
            (&["SET", &k, "x", "PX", "100", "KEEPTTL"], "!ERR syntax error*"),
            (
                &["SET", &k, "x", "EX", "9223372036854775807"],
                "!ERR invalid expire time in 'set' command*",
            ),
            (&["GET", &k], "v4"),
            // TTLs: -1 without, -2 when absent, kept by KEEPTTL, dropped by a plain SET.
            (&["TTL", &k], "-1"),
            (&["TTL", &none], "-2"),
            (&["PTTL", &none], "-2"),
            (&["EXPIRE", &k, "100"], "1"),
            (&["TTL", &k], "100"),
            (&["PERSIST", &k], "1"),
            (&["TTL", &k], "-1"),
            (&["PERSIST", &k], "0"),
            (&["EXPIRE", &none, "10"], "0"),
            (&["EXPIRE", &k, "10", "GT"], "!ERR EXPIRE GT is not supported*"),
            (&["EXPIRE", &k, "ten"], "!ERR value is not an integer or out of range*"),
            (
                &["EXPIRE", &k, "10000000000000000"],
                "!ERR invalid expire time in 'expire' command*",
            ),
            (&["SET", &k, "v", "EX", "100"], "OK"),
            (&["SET", &k, "v5", "KEEPTTL"], "OK"),
            (&["TTL", &k], "100"),
            (&["SET", &k, "v6"], "OK"),
            (&["TTL", &k], "-1"),
            (&["SETEX", &k, "100", "v7"], "OK"),
            (&["TTL", &k], "100"),
            (
                &["SETEX", &k, "0", "v7"],
                "!ERR invalid expire time in 'setex' command*",
            ),
            (&["EXPIRE", &k, "-1"], "1"),
            (&["EXISTS", &k], "0"),
            // SETNX, GETSET, GETDEL, GETEX.
            (&["SETNX", &a, "1"], "1"),
            (&["SETNX", &a, "2"], "0"),
            (&["GETSET", &a, "3"], "1"),
            (&["GETDEL", &a], "3"),
            (&["GETDEL", &a], "nil"),
            (&["SET", &a, "x"], "OK"),
            (&["GETEX", &a, "EX", "100"], "x"),
            (&["TTL", &a], "100"),
            (&["GETEX", &a, "PERSIST"], "x"),
            (&["TTL", &a], "-1"),
            (&["GETEX", &a], "x"),
            (&["GETEX", &none], "nil"),
            (&["GETEX", &a, "FOO"], "!ERR syntax error*"),
            // Counters.
            (&["INCR", &n], "1"),
            (&["INCRBY", &n, "10"], "11"),
            (&["DECR", &n], "10"),
            (&["DECRBY", &n, "5"], "5"),
            (&["INCRBY", &n, "x"], "!ERR value is not an integer or out of range*"),
            (&["SET", &n, "9223372036854775807"], "OK"),
            (&["INCR", &n], "!ERR increment or decrement would overflow*"),
            (
                &["DECRBY", &n, "-9223372036854775808"],
                "!ERR decrement would overflow*",
            ),
            (&["SET", &s, "abc"], "OK"),
            (&["INCR", &s], "!ERR value is not an integer or out of range*"),
            (&["SET", &s, " 1"], "OK"),
            (&["INCR", &s], "!ERR value is not an integer or out of range*"),
            (&["GET", &s], " 1"),
            // APPEND and STRLEN.
            (&["APPEND", &ap, "hello"], "5"),
            (&["APPEND", &ap, " world"], "11"),
            (&["GET", &ap], "hello world"),
            (&["STRLEN", &ap], "11"),
            (&["STRLEN", &none], "0"),
            // Several keys of one slot.
            (&["MSET", &a, "1", &b, "2"], "OK"),
            (&["MGET", &a, &b, &none], "[1, 2, nil]"),
            (&["MSETNX", &a, "5", &c, "6"], "0"),
            (&["GET", &c], "nil"),
            (&["MSETNX", &c, "6", &d, "7"], "1"),
            (&["MSET", &a], "!ERR wrong number of arguments for 'mset' command*"),
            (
                &["MSET", &a, "1", &b],
                "!ERR wrong number of arguments for 'mset' command*",
            ),
            (&["MSET", &a, "1", "other-slot", "2"], "!CROSSSLOT*"),
            (&["DEL", &a, &b, &none], "2"),
            (&["EXISTS", &c, &c, &none], "2"),
            (&["UNLINK", &c], "1"),
            (&["TYPE", &d], "string"),
            (&["TYPE", &none], "none"),
            // Arity, unknown commands and the small ones.
            (&["GET"], "!ERR wrong number of arguments for 'get' command*"),
            (
                &["GET", &k, "extra"],
                "!ERR wrong number of arguments for 'get' command*",
            ),
            (
                &["FOOBAR", "x"],
                "!ERR unknown command 'FOOBAR', with args beginning with: 'x'*",
            ),
            (&["PING"], "PONG"),
            (&["PING", "hi"], "hi"),
            (&["ECHO", "hi"], "hi"),
            (&["WAIT", "1", "0"], "1"),
            (&["CLIENT", "SETNAME", "tester"], "OK"),
            (&["CLIENT", "GETNAME"], "tester"),
            (
                &["CLIENT", "SETNAME", "two words"],
                "!ERR Client names cannot contain spaces*",
            ),
            (
                &["CLIENT", "NOSUCH"],
                "!ERR unknown subcommand 'NOSUCH'. Try CLIENT HELP.*",
            ),
            (&["CLUSTER", "KEYSLOT", "foo"], "12182"),
            (&["CLUSTER", "KEYSLOT", "{foo}bar"], "12182"),
            (
                &["COMMAND", "INFO", "get"],
                "[[get, 2, [readonly, fast], 1, 1, 1, [], [], [], []]]",
            ),
            (&["HELLO", "4"], "!NOPROTO*"),
            (&["SELECT", "other-cache"], "OK"),
            (&["GET", &d], "nil"),
            (&["SELECT", "0"], "OK"),
            (&["GET", &d], "7"),
        ],
    )
    .await;
    // A short expiry ends on time.
    assert_eq!(q(con, &["SET", &k, "soon", "PX", "150"]).await, "OK");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(q(con, &["GET", &k]).await, "nil");
    let ttl: i64 = q(con, &["PTTL", &k]).await.parse().unwrap();
    assert_eq!(ttl, -2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_clients_speak_to_a_two_stripe_array() {
    let (array, actives) = resp_array(2, 3).await;
    let pass = secret(&array);
    let active0 = resp_addr(&array, &actives[0]);
    let active1 = resp_addr(&array, &actives[1]);

    phase("AUTH refused and accepted");
    let refused = connect(&active0, Some("wrong-password"), false).await.err();
    assert!(
        refused
            .as_ref()
            .is_some_and(|e| e.kind() == redis::ErrorKind::AuthenticationFailed),
        "a wrong password is refused: {refused:?}"
    );
    let mut anon = connect(&active0, None, false).await.expect("connect without auth");
    assert_eq!(q(&mut anon, &["PING"]).await, "PONG");
    assert!(q(&mut anon, &["GET", "x"]).await.starts_with("!NOAUTH"));
    assert!(q(&mut anon, &["AUTH", "nope"]).await.starts_with("!WRONGPASS"));
    assert_eq!(q(&mut anon, &["AUTH", &pass]).await, "OK");
    assert_eq!(q(&mut anon, &["AUTH", "default", &pass]).await, "OK");

    let tag = tag_on(0, 2, "t");
    for resp3 in [false, true] {
        phase(&format!("every command, RESP{}", if resp3 { 3 } else { 2 }));
        let mut con = connect(&active0, Some(&pass), resp3).await.expect("connect");
        let tag = format!("{tag}-{}", if resp3 { 3 } else { 2 });
        let tag = tag_on(0, 2, &tag);
        string_commands(&mut con, &tag).await;
        let hello = q(&mut con, &["HELLO", if resp3 { "3" } else { "2" }]).await;
        let proto = if resp3 { "proto: 3" } else { "proto, 2" };
        assert!(hello.contains(proto) && hello.contains("cluster"), "{hello}");
    }

    phase("pipelining: a SET then a GET of the same key, in order");
    let mut con = connect(&active0, Some(&pass), false).await.unwrap();
    let mut pipe = redis::pipe();
    for i in 0..200 {
        let key = format!("{{{tag}}}p{}", i % 7);
        pipe.set(&key, i).get(&key);
    }
    let replies: Vec<redis::Value> = pipe.query_async(&mut con).await.expect("pipeline");
    for (i, pair) in replies.chunks(2).enumerate() {
        assert_eq!(show(&pair[1]), i.to_string(), "GET after SET {i} in one pipeline");
    }
    phase("pipelining: 1000 writes in one pipeline share commits, and apply in order");
    let mut pipe = redis::pipe();
    for i in 0..1000 {
        pipe.set(format!("{{{tag}}}q{}", i % 10), i).ignore();
    }
    pipe.incr(format!("{{{tag}}}qn"), 1)
        .ignore()
        .get(format!("{{{tag}}}q9"));
    let started = Instant::now();
    let (last,): (i64,) = pipe.query_async(&mut con).await.expect("pipeline of writes");
    eprintln!("1000 pipelined SETs in {:?}", started.elapsed());
    assert_eq!(last, 999, "the last SET of the key is what stays");

    phase("keys of the other stripe get MOVED to its active; a mirror sends writes to its active");
    let other = tag_on(1, 2, "o");
    let slot = slot_of_key(other.as_bytes());
    let moved = format!("!MOVED {slot} {active1}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = q(&mut con, &["SET", &other, "v"]).await;
        if got.starts_with(&moved) {
            break;
        }
        assert!(Instant::now() < deadline, "expected {moved}, got {got}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let key0 = format!("{{{tag}}}k0");
    assert_eq!(q(&mut con, &["SET", &key0, "on-stripe-0"]).await, "OK");
    let mirror = array.stripe_servers(0).into_iter().find(|n| *n != actives[0]).unwrap();
    let mut on_mirror = connect(&resp_addr(&array, &mirror), Some(&pass), false).await.unwrap();
    let to_active = format!("!MOVED {} {active0}", slot_of_key(key0.as_bytes()));
    assert!(q(&mut on_mirror, &["GET", &key0]).await.starts_with(&to_active));
    assert_eq!(q(&mut on_mirror, &["READONLY"]).await, "OK");
    let deadline = Instant::now() + Duration::from_secs(5);
    while q(&mut on_mirror, &["GET", &key0]).await != "on-stripe-0" {
        assert!(Instant::now() < deadline, "READONLY reads on a mirror");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(q(&mut on_mirror, &["SET", &key0, "x"]).await.starts_with(&to_active));
    assert!(q(&mut on_mirror, &["INFO", "replication"]).await.contains("role:slave"));
    assert!(q(&mut con, &["INFO", "replication"]).await.contains("role:master"));

    phase("the cluster map");
    let slots = q(&mut con, &["CLUSTER", "SLOTS"]).await;
    let port = |addr: &str| addr.rsplit_once(':').unwrap().1.to_string();
    assert!(
        slots.starts_with(&format!("[[0, 8191, [127.0.0.1, {}, ", port(&active0)))
            && slots.contains(&format!("[8192, 16383, [127.0.0.1, {}, ", port(&active1))),
        "{slots}"
    );
    let nodes = q(&mut con, &["CLUSTER", "NODES"]).await;
    assert_eq!(nodes.lines().count(), 6, "{nodes}");
    assert_eq!(nodes.lines().filter(|l| l.contains("master")).count(), 2, "{nodes}");
    assert!(q(&mut con, &["CLUSTER", "INFO"]).await.contains("cluster_state:ok"));
    let shards = q(&mut con, &["CLUSTER", "SHARDS"]).await;
    assert_eq!(shards.matches("role, master").count(), 2, "{shards}");

    phase("SCAN and KEYS walk this stripe's keys");
    let scan_tag = tag_on(0, 2, "scan");
    for i in 0..7 {
        assert_eq!(q(&mut con, &["SET", &format!("{{{scan_tag}}}s{i}"), "v"]).await, "OK");
    }
    let pattern = format!("{{{scan_tag}}}s*");
    let mut cursor = "0".to_string();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let (next, keys): (String, Vec<String>) = redis::cmd("SCAN")
            .arg(&cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(2)
            .query_async(&mut con)
            .await
            .unwrap();
        seen.extend(keys);
        cursor = next;
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(seen.len(), 7, "{seen:?}");
    let keys: Vec<String> = con.keys(&pattern).await.unwrap();
    assert_eq!(keys.len(), 7);
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut con).await.unwrap();
    assert!(size >= 7, "{size}");

    phase("ArrayClient::txn: one step over two caches, guards, and the keys Redis sees");
    {
        use ferrocotta::protocol::{Expiry, Guard, Step, StepReply, Txn};
        let client = array.client().await;
        let order = format!("{{{}}}", tag_on(0, 2, "order"));
        let (lines, total) = (format!("{order}.lines"), format!("{order}.total"));
        let put = |cache: &str, key: &str, value: &str| Step::Put {
            cache: cache.into(),
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            expiry: Expiry::Default,
        };
        let first = Txn {
            guards: vec![Guard::Absent {
                cache: "orders".into(),
                key: lines.as_bytes().to_vec(),
            }],
            then: vec![put("orders", &lines, "2 lines"), put("redis", &total, "42")],
            otherwise: vec![Step::Get {
                cache: "orders".into(),
                key: lines.as_bytes().to_vec(),
            }],
        };
        let (applied, results) = client.txn(first.clone()).await.expect("txn");
        assert!(applied && results.len() == 2, "{results:?}");
        let (applied, results) = client.txn(first).await.expect("txn again");
        assert!(!applied, "the guard fails the second time");
        assert!(matches!(&results[..], [StepReply::Entry(Some(e))] if e.value == b"2 lines"));
        let mut con = connect(&active0, Some(&pass), false).await.unwrap();
        assert_eq!(
            q(&mut con, &["GET", &total]).await,
            "42",
            "Redis sees the cache `redis`"
        );
        let spread = Txn {
            then: vec![put("orders", &key0, "1"), put("orders", &other, "2")],
            ..Txn::default()
        };
        let refused = client.txn(spread).await.expect_err("keys of two stripes");
        assert!(refused.to_string().contains("one stripe"), "{refused}");
        let counter = Txn {
            then: vec![Step::Increment {
                cache: "orders".into(),
                key: lines.as_bytes().to_vec(),
                delta: 1,
            }],
            ..Txn::default()
        };
        let refused = client.txn(counter).await.expect_err("not a counter");
        assert!(refused.to_string().contains("counter"), "{refused}");
    }

    if tool_available("redis-cli", ".ci/run installs Debian's redis-tools", "redis-cli") {
        phase("redis-cli: -c follows MOVED, -3, --pipe");
        let cli = |args: &[&str]| {
            let out = Command::new("redis-cli")
                .arg("--no-auth-warning")
                .args(args)
                .output()
                .expect("redis-cli");
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
        };
        let p0 = port(&active0);
        let p1 = port(&active1);
        assert_eq!(cli(&["-p", &p0, "ping"]).trim(), "PONG");
        assert!(cli(&["-p", &p0, "get", "x"]).contains("NOAUTH"));
        assert!(cli(&["-p", &p0, "-a", "wrong", "get", "x"]).contains("WRONGPASS"));
        for (from, key) in [(&p0, other.as_str()), (&p1, key0.as_str())] {
            assert_eq!(
                cli(&["-c", "-p", from, "-a", &pass, "set", key, "via-cli"]).trim(),
                "OK"
            );
            assert_eq!(cli(&["-c", "-p", from, "-a", &pass, "get", key]).trim(), "via-cli");
        }
        assert_eq!(
            cli(&["-3", "-c", "-p", &p1, "-a", &pass, "get", key0.as_str()]).trim(),
            "via-cli"
        );
        assert!(cli(&["-c", "-p", &p0, "-a", &pass, "mget", "a", "b"]).contains("CROSSSLOT"));
        let mut raw = Vec::new();
        for i in 0..1000 {
            let key = format!("{{{tag}}}pipe{i}");
            raw.extend(format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$1\r\nv\r\n", key.len()).into_bytes());
        }
        let mut child = Command::new("redis-cli")
            .args(["--no-auth-warning", "-p", &p0, "-a", &pass, "--pipe"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&raw).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("errors: 0, replies: 1000"), "{text}");
    }

    if tool_available(
        "redis-benchmark",
        ".ci/run installs Debian's redis-tools",
        "redis-benchmark",
    ) {
        phase("redis-benchmark --cluster -t set,get");
        let out = Command::new("redis-benchmark")
            .args([
                "--cluster",
                "-p",
                &port(&active0),
                "-a",
                &pass,
                "-t",
                "set,get",
                "-n",
                "2000",
                "-c",
                "10",
                "-q",
            ])
            .output()
            .expect("redis-benchmark");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("SET:") && text.contains("GET:") && !text.to_lowercase().contains("error"),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_client_follows_moved_and_loses_no_acknowledged_set_in_a_failover() {
    let (mut array, actives) = resp_array(2, 3).await;
    let pass = secret(&array);
    let nodes: Vec<String> = array
        .config
        .servers()
        .map(|(_, s)| format!("redis://:{pass}@{}", s.resp_addr().unwrap()))
        .collect();
    let cluster = redis::cluster::ClusterClientBuilder::new(nodes)
        .retries(10)
        .min_retry_wait(100)
        .max_retry_wait(1000)
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(6))
        .build()
        .unwrap();

    phase("keys on both stripes through one cluster connection");
    let mut con = cluster.get_async_connection().await.expect("cluster connection");
    let mut by_stripe = [0; 2];
    for i in 0..100 {
        let key = format!("warm{i}");
        by_stripe[stripe_of_slot(slot_of_key(key.as_bytes()), 2)] += 1;
        let _: () = con.set(&key, i).await.unwrap();
        let back: i64 = con.get(&key).await.unwrap();
        assert_eq!(back, i);
    }
    assert!(by_stripe[0] > 0 && by_stripe[1] > 0, "{by_stripe:?}");

    phase("writers through a kill -9 of stripe 0's active");
    let run_for = Duration::from_secs(10);
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut con = cluster.get_async_connection().await.unwrap();
        writers.push(tokio::spawn(async move {
            let (mut acked, mut failed) = (BTreeMap::new(), 0u32);
            let mut i = 0u32;
            while started.elapsed() < run_for {
                let key = format!("w{w}-{i}");
                match con.set::<_, _, ()>(&key, i).await {
                    Ok(()) => {
                        acked.insert(key, (i, started.elapsed()));
                    }
                    Err(_) => failed += 1,
                }
                i += 1;
            }
            (acked, failed)
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed_at = started.elapsed();
    array.kill9(&actives[0]);
    let mut acked = BTreeMap::new();
    let mut failed = 0;
    for w in writers {
        let (a, f) = w.await.unwrap();
        acked.extend(a);
        failed += f;
    }
    let after_kill_on_0 = acked
        .iter()
        .filter(|(k, (_, at))| *at > killed_at && stripe_of_slot(slot_of_key(k.as_bytes()), 2) == 0)
        .count();
    eprintln!(
        "{} SETs acknowledged, {failed} failed; {after_kill_on_0} acknowledged on stripe 0 after the kill at {killed_at:?}",
        acked.len()
    );
    assert!(after_kill_on_0 > 0, "the client went on with stripe 0's new active");

    phase("every acknowledged SET is there");
    let mut check = cluster.get_async_connection().await.unwrap();
    for (key, (value, _)) in &acked {
        let got: Option<u32> = check.get(key).await.unwrap();
        assert_eq!(got, Some(*value), "{key} was acknowledged");
    }
}

/// Cases from Redis' own test suite (`tests/unit/type/string.tcl`, `tests/unit/expire.tcl`,
/// `tests/unit/keyspace.tcl`), re-expressed in Rust: the tcl runner needs a `redis-server` it
/// starts itself, so the cases for the supported commands are kept here under their names. Cases
/// for commands the front end does not have (SETRANGE, GETRANGE, LCS, RENAME, COPY, OBJECT, ...)
/// and for Redis internals (encodings, DEBUG) are left out. A one-stripe array, as the keyspace
/// cases see every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_from_the_redis_test_suite() {
    let (array, actives) = resp_array(1, 3).await;
    let pass = secret(&array);
    let mut r = connect(&resp_addr(&array, &actives[0]), Some(&pass), false)
        .await
        .unwrap();
    let big = "x".repeat(500_000);
    expect_all(
        &mut r,
        &[
            // string.tcl
            (&["SET", "x", "foobar"], "OK"), // SET and GET an item
            (&["GET", "x"], "foobar"),
            (&["SET", "x", ""], "OK"), // SET and GET an empty item
            (&["GET", "x"], ""),
            (&["SET", "foo", &big], "OK"), // Very big payload in GET/SET
            (&["STRLEN", "foo"], "500000"),
            (&["DEL", "novar"], "0"), // SETNX target key missing
            (&["SETNX", "novar", "foobared"], "1"),
            (&["GET", "novar"], "foobared"),
            (&["SET", "novar", "foobared"], "OK"), // SETNX target key exists
            (&["SETNX", "novar", "blabla"], "0"),
            (&["GET", "novar"], "foobared"),
            (&["SET", "x", "10"], "OK"), // SETNX against not-expired volatile key
            (&["EXPIRE", "x", "10000"], "1"),
            (&["SETNX", "x", "20"], "0"),
            (&["GET", "x"], "10"),
            (&["SET", "foo", "bar"], "OK"), // GETEX EX option
            (&["GETEX", "foo", "ex", "10"], "bar"),
            (&["TTL", "foo"], "10"),
            (&["GETEX", "foo", "persist"], "bar"), // GETEX PERSIST option
            (&["TTL", "foo"], "-1"),
            (&["GETEX", "foo", "px", "10000", "persist"], "!ERR syntax error*"), // GETEX syntax errors
            (&["GETEX", "foo", "non-existent-option"], "!ERR syntax error*"),
            (
                &["GETEX", "foo", "ex", "-1"],
                "!ERR invalid expire time in 'getex' command*",
            ),
            (
                &["GETEX", "foo", "ex", "9223372036854775807"],
                "!ERR invalid expire time in 'getex' command*",
            ), // GETEX with big integer
            (&["DEL", "foo"], "1"), // GETDEL command
            (&["SET", "foo", "bar"], "OK"),
            (&["GETDEL", "foo"], "bar"),
            (&["GETDEL", "foo"], "nil"),
            // Several keys in one command must share a slot, as in Redis Cluster: those cases use
            // a hash tag.
            (&["SET", "{s}foo", "BAR"], "OK"), // MGET
            (&["SET", "{s}bar", "FOO"], "OK"),
            (&["MGET", "{s}foo", "{s}bar"], "[BAR, FOO]"),
            (&["MGET", "{s}foo", "{s}baazz", "{s}bar"], "[BAR, nil, FOO]"), // MGET against non existing key
            (
                &["MSET", "{s}x", "10", "{s}y", "foo bar", "{s}z", "x x x x x x x\n\n\r\n"],
                "OK",
            ), // MSET base case
            (
                &["MGET", "{s}x", "{s}y", "{s}z"],
                "[10, foo bar, x x x x x x x\n\n\r\n]",
            ),
            (
                &["MSET", "x", "10", "y", "foo bar", "z"],
                "!ERR wrong number of arguments for 'mset' command*",
            ), // MSET/MSETNX wrong number of args
            (
                &["MSETNX", "x", "20", "y", "foo bar", "z"],
                "!ERR wrong number of arguments for 'msetnx' command*",
            ),
            (&["DEL", "{s}x1", "{s}y2"], "0"), // MSETNX with not existing keys
            (&["MSETNX", "{s}x1", "xxx", "{s}y2", "yyy"], "1"),
            (&["MGET", "{s}x1", "{s}y2"], "[xxx, yyy]"),
            (&["DEL", "{s}x1"], "1"), // MSETNX with not existing keys - same key twice
            (&["MSETNX", "{s}x1", "xxx", "{s}x1", "yyy"], "1"),
            (&["GET", "{s}x1"], "yyy"),
            (&["MSETNX", "{s}x1", "xxx", "{s}y2", "yyy"], "0"), // MSETNX with already existing keys - same key twice
            (&["MGET", "{s}x1", "{s}y2"], "[yyy, yyy]"),
            (&["STRLEN", "notakey"], "0"),         // STRLEN against non-existing key
            (&["SET", "myinteger", "-555"], "OK"), // STRLEN against integer-encoded value
            (&["STRLEN", "myinteger"], "4"),
            (&["SET", "mystring", "foozzz0123456789 baz"], "OK"), // STRLEN against plain string
            (&["STRLEN", "mystring"], "20"),
            (&["DEL", "foo"], "0"), // GETSET (set new value)
            (&["GETSET", "foo", "xyz"], "nil"),
            (&["GET", "foo"], "xyz"),
            (&["SET", "foo", "bar"], "OK"), // GETSET (replace old value)
            (&["GETSET", "foo", "xyz"], "bar"),
            (&["GET", "foo"], "xyz"),
            (&["SET", "foo", "bar", "non-existing-option"], "!ERR syntax error*"), // Extended SET can detect syntax errors
            (&["DEL", "foo"], "1"),                                                // Extended SET NX option
            (&["SET", "foo", "1", "nx"], "OK"),
            (&["SET", "foo", "2", "nx"], "nil"),
            (&["GET", "foo"], "1"),
            (&["DEL", "foo"], "1"), // Extended SET XX option
            (&["SET", "foo", "1", "xx"], "nil"),
            (&["SET", "foo", "bar"], "OK"),
            (&["SET", "foo", "2", "xx"], "OK"),
            (&["GET", "foo"], "2"),
            (&["SET", "foo", "bar"], "OK"), // Extended SET GET option
            (&["SET", "foo", "bar2", "GET"], "bar"),
            (&["GET", "foo"], "bar2"),
            (&["DEL", "foo"], "1"), // Extended SET GET option with no previous value
            (&["SET", "foo", "bar", "GET"], "nil"),
            (&["GET", "foo"], "bar"),
            (&["SET", "foo", "bar"], "OK"), // Extended SET GET option with XX
            (&["SET", "foo", "baz", "GET", "XX"], "bar"),
            (&["GET", "foo"], "baz"),
            (&["DEL", "foo"], "1"), // Extended SET GET option with XX and no previous value
            (&["SET", "foo", "bar", "GET", "XX"], "nil"),
            (&["GET", "foo"], "nil"),
            (&["SET", "foo", "bar", "ex", "10"], "OK"), // Extended SET EX option
            (&["TTL", "foo"], "10"),
            (&["SET", "foo", "bar", "px", "10000"], "OK"), // Extended SET PX option
            (&["TTL", "foo"], "10"),
            (
                &["SET", "foo", "bar", "ex", "-10"],
                "!ERR invalid expire time in 'set' command*",
            ), // Extended SET EX with negative
            (&["SET", "foo", "bar", "xx", "px", "10000"], "OK"), // Extended SET using multiple options at once
            (&["TTL", "foo"], "10"),
            (&["DEL", "foo"], "1"), // APPEND basics
            (&["APPEND", "foo", "bar"], "3"),
            (&["GET", "foo"], "bar"),
            (&["APPEND", "foo", "100"], "6"),
            (&["GET", "foo"], "bar100"),
            (&["SET", "foo", "1"], "OK"), // APPEND basics, integer encoded values
            (&["APPEND", "foo", "2"], "2"),
            (&["GET", "foo"], "12"),
            // type/incr.tcl (the counters INCR and friends use)
            (&["DEL", "novar"], "1"), // INCR against non existing key
            (&["INCR", "novar"], "1"),
            (&["INCR", "novar"], "2"),        // INCR against key created by incr itself
            (&["SET", "novar", "100"], "OK"), // INCR against key originally set with SET
            (&["INCR", "novar"], "101"),
            (&["SET", "novar", "17179869184"], "OK"), // INCR over 32bit value
            (&["INCR", "novar"], "17179869185"),
            (&["INCRBY", "novar", "17179869184"], "34359738369"), // INCRBY over 32bit value with over 32bit increment
            (&["SET", "novar", "    11"], "OK"),                  // INCR fails against key with spaces (left)
            (&["INCR", "novar"], "!ERR value is not an integer or out of range*"),
            (&["SET", "novar", "11    "], "OK"), // INCR fails against key with spaces (right)
            (&["INCR", "novar"], "!ERR value is not an integer or out of range*"),
            (&["SET", "novar", "    11    "], "OK"), // INCR fails against key with spaces (both)
            (&["INCR", "novar"], "!ERR value is not an integer or out of range*"),
            (
                &["DECRBY", "novar", "-9223372036854775808"],
                "!ERR decrement would overflow*",
            ), // DECRBY negation overflow
            (&["SET", "novar", "-9223372036854775808"], "OK"), // INCR fails against a key holding a list — no lists; overflow instead
            (&["DECR", "novar"], "!ERR increment or decrement would overflow*"),
            (&["SET", "foo", "1"], "OK"), // INCR uses shared objects in the 0-9999 range (value only)
            (&["INCR", "foo"], "2"),
            (&["SET", "novar", "1"], "OK"), // DECRBY over 32bit value with over 32bit increment, negative res
            (&["DECRBY", "novar", "17179869185"], "-17179869184"),
            // keyspace.tcl
            (&["FLUSHDB"], "OK"),
            (&["SET", "x", "foobar"], "OK"), // DEL against a single item
            (&["DEL", "x"], "1"),
            (&["GET", "x"], "nil"),
            (&["SET", "foo1", "a"], "OK"), // Vararg DEL
            (&["SET", "foo2", "b"], "OK"),
            (&["SET", "foo3", "c"], "OK"),
            (&["DEL", "foo1", "foo2", "foo3", "foo4"], "!CROSSSLOT*"), // (cluster: one slot per call)
            (&["DEL", "foo1"], "1"),
            (&["DEL", "foo2"], "1"),
            (&["DEL", "foo3"], "1"),
            (&["MGET", "foo1", "foo2", "foo3"], "!CROSSSLOT*"),
            (&["MSET", "{t}foo1", "a", "{t}foo2", "b", "{t}foo3", "c"], "OK"), // the same with a hash tag
            (&["DEL", "{t}foo1", "{t}foo2", "{t}foo3", "{t}foo4"], "3"),
            (&["MGET", "{t}foo1", "{t}foo2", "{t}foo3"], "[nil, nil, nil]"),
            (&["FLUSHDB"], "OK"),
            (&["SET", "foo_a", "hello"], "OK"), // KEYS with pattern
            (&["SET", "foo_b", "hello"], "OK"),
            (&["SET", "foo_c", "hello"], "OK"),
            (&["SET", "key_x", "hello"], "OK"),
            (&["SET", "key_y", "hello"], "OK"),
            (&["SET", "key_z", "hello"], "OK"),
            (&["KEYS", "foo*"], "[foo_a, foo_b, foo_c]"),
            (&["KEYS", "*"], "[foo_a, foo_b, foo_c, key_x, key_y, key_z]"), // KEYS to get all keys
            (&["DBSIZE"], "6"),                                             // DBSIZE
            (&["KEYS", "key_[xy]"], "[key_x, key_y]"),
            (&["FLUSHDB"], "OK"), // DEL all keys
            (&["DBSIZE"], "0"),
            (&["MSET", "{a}x", "1", "{a}y", "2", "{a}z", "3"], "OK"), // KEYS with hashtag
            (&["KEYS", "{a}*"], "[{a}x, {a}y, {a}z]"),
            (&["KEYS", "{a}[xy]"], "[{a}x, {a}y]"),
            (&["SET", "newkey", "test"], "OK"), // EXISTS
            (&["EXISTS", "newkey"], "1"),
            (&["DEL", "newkey"], "1"),
            (&["EXISTS", "newkey"], "0"),
            (&["SET", "emptykey", ""], "OK"), // Zero length value in key. SET/GET/EXISTS
            (&["GET", "emptykey"], ""),
            (&["EXISTS", "emptykey"], "1"),
            (&["DEL", "emptykey"], "1"),
            (&["EXISTS", "emptykey"], "0"),
            (&["FOOBAREDCOMMAND"], "!ERR unknown command*"), // Non existing command
            (&["SET", "mystring", "foo"], "OK"),             // TYPE
            (&["TYPE", "mystring"], "string"),
            (&["TYPE", "nokey"], "none"),
            // expire.tcl
            (&["SET", "x", "foobar"], "OK"), // EXPIRE - set timeouts multiple times
            (&["EXPIRE", "x", "5"], "1"),
            (&["TTL", "x"], "5"),
            (&["EXPIRE", "x", "10"], "1"),
            (&["TTL", "x"], "10"),
            (&["EXPIRE", "x", "2"], "1"),
            (&["GET", "x"], "foobar"),    // EXPIRE - It should be still possible to read 'x'
            (&["SET", "x", "foo"], "OK"), // EXPIRE - write on expire should work
            (&["EXPIRE", "x", "100"], "1"),
            (&["APPEND", "x", "bar"], "6"),
            (&["GET", "x"], "foobar"),
            (&["TTL", "x"], "100"),
            (&["SET", "x", "somevalue"], "OK"), // SETEX - Set + Expire combo operation
            (&["SETEX", "y", "12", "somevalue"], "OK"),
            (&["TTL", "y"], "12"),
            (&["GET", "y"], "somevalue"),
            (
                &["SETEX", "z", "-10", "foo"],
                "!ERR invalid expire time in 'setex' command*",
            ), // SETEX - Wrong time parameter
            (&["SET", "x", "foo"], "OK"), // PERSIST can undo an EXPIRE
            (&["EXPIRE", "x", "50"], "1"),
            (&["TTL", "x"], "50"),
            (&["PERSIST", "x"], "1"),
            (&["TTL", "x"], "-1"),
            (&["GET", "x"], "foo"),
            (&["PERSIST", "nokeyatall"], "0"), // PERSIST returns 0 against non existing or non volatile keys
            (&["PERSIST", "x"], "0"),
            (&["SET", "x", "somevalue"], "OK"), // TTL returns time to live in seconds
            (&["EXPIRE", "x", "10"], "1"),
            (&["TTL", "x"], "10"),
            (&["SET", "x", "somevalue"], "OK"), // TTL / PTTL return -1 if key has no expire
            (&["TTL", "x"], "-1"),
            (&["PTTL", "x"], "-1"),
            (&["DEL", "x"], "1"), // TTL / PTTL return -2 if key does not exit
            (&["TTL", "x"], "-2"),
            (&["PTTL", "x"], "-2"),
            (&["SET", "foo", "bar"], "OK"), // EXPIRE with big integer overflows when converted to milliseconds
            (
                &["EXPIRE", "foo", "10000000000000000"],
                "!ERR invalid expire time in 'expire' command*",
            ),
            (
                &["EXPIRE", "foo", "9223370399119966"],
                "!ERR invalid expire time in 'expire' command*",
            ),
            (
                &["PEXPIRE", "foo", "9223372036854770000"],
                "!ERR invalid expire time in 'pexpire' command*",
            ), // PEXPIRE with big integer overflow when basetime is added
            (&["TTL", "foo"], "-1"),
            (
                &["SET", "foo", "bar", "EX", "10000000000000000"],
                "!ERR invalid expire time in 'set' command*",
            ), // SET with EX with big integer should report an error
            (
                &["SET", "foo", "bar", "EX", "-9999999999999999"],
                "!ERR invalid expire time in 'set' command*",
            ), // SET with EX with smallest integer should report an error
            (&["EXPIRE", "foo", "-1"], "1"), // EXPIRE with negative expiry: the key is deleted
            (&["GET", "foo"], "nil"),
            (&["SET", "foo", "bar"], "OK"), // EXPIRE with non-existed key
            (&["EXPIRE", "none", "100"], "0"),
            (&["EXPIRE", "foo", "100", "NX"], "!ERR EXPIRE NX is not supported*"), // EXPIRE NX/XX/GT/LT: not supported (docs/redis.md)
        ],
    )
    .await;

    // EXPIREAT / PEXPIREAT with a time in the future, and the precision of milliseconds
    // (PEXPIRE/PSETEX/PEXPIREAT can set sub-second expires).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let at = (now / 1000 + 100).to_string();
    expect_all(&mut r, &[(&["EXPIREAT", "foo", &at], "1")]).await;
    let ttl: i64 = q(&mut r, &["TTL", "foo"]).await.parse().unwrap();
    assert!((99..=100).contains(&ttl), "{ttl}");
    let pat = (now + 300).to_string();
    expect_all(
        &mut r,
        &[
            (&["PSETEX", "x", "100", "somevalue"], "OK"),
            (&["SET", "y", "somevalue"], "OK"),
            (&["PEXPIREAT", "y", &pat], "1"),
            (&["GET", "x"], "somevalue"),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    expect_all(&mut r, &[(&["GET", "x"], "nil"), (&["GET", "y"], "nil")]).await;
    // EXPIRE - After 2.1 seconds the key should no longer be here (shortened: 1 s).
    expect_all(&mut r, &[(&["SET", "x", "foobar"], "OK"), (&["EXPIRE", "x", "1"], "1")]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    expect_all(&mut r, &[(&["GET", "x"], "nil"), (&["EXISTS", "x"], "0")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_port_speaks_tls_when_the_array_does() {
    if !tool_available(
        "redis-cli",
        ".ci/run installs Debian's redis-tools",
        "the Redis-protocol port over TLS",
    ) {
        return;
    }
    let (array, actives) = resp_array_tls(1, 3, true).await;
    let pass = secret(&array);
    let (tls_dir, _) = array.tls.as_ref().expect("a TLS array");
    let ca = ferrocotta::tls::LocalCa::cert_path(tls_dir);
    let addr = resp_addr(&array, &actives[0]);
    let port = addr.rsplit_once(':').unwrap().1.to_string();
    let cli = |tls: bool, args: &[&str]| {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["--no-auth-warning", "-p", &port, "-a", &pass]);
        if tls {
            cmd.arg("--tls").arg("--cacert").arg(&ca);
        }
        let out = cmd.args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert_eq!(cli(true, &["set", "k", "over-tls"]).trim(), "OK");
    assert_eq!(cli(true, &["get", "k"]).trim(), "over-tls");
    let plain = cli(false, &["get", "k"]);
    assert!(
        !plain.contains("over-tls"),
        "a plain client gets nothing from a TLS port: {plain}"
    );
}
