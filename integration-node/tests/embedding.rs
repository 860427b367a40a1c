//! An application embeds the node library and registers its own service (stand-alone here, so the
//! test needs no array; the same registry serves a clustered node).

use std::time::Duration;

use clap::Parser;
use integration_node::services::{load_session, save_session, Registry};
use integration_node::settings::{Args, NodeSettings};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn post(addr: &str, path: &str, cookie: Option<&str>) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let cookie = cookie.map(|c| format!("Cookie: {c}\r\n")).unwrap_or_default();
    let body = r#"{"item":"book"}"#;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{cookie}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

#[tokio::test]
async fn an_application_registers_its_own_service() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let args = Args::parse_from([
        "embedded",
        "--array-urls",
        &dead,
        "--cluster-name",
        "embedded",
        "--connect-timeout",
        "300ms",
        "--on-startup-error",
        "standalone",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let settings = NodeSettings::from_args(args).unwrap();
    let mut registry = Registry::with_builtins();
    registry.register("shop:addToCart", |node, ssnid, input| {
        Box::pin(async move {
            let mut session = load_session(node, ssnid).await?;
            let mut cart = session.get("cart").cloned().unwrap_or_else(|| json!([]));
            cart.as_array_mut().unwrap().push(input["item"].clone());
            session.insert("cart".into(), cart.clone());
            save_session(node, &session).await?;
            Ok(json!({"cart": cart}))
        })
    });
    let running = integration_node::start(settings, registry).await.unwrap();
    let addr = running.node.service_addr.clone();
    let (head, body) = post(&addr, "/invoke/shop:addToCart", None).await;
    assert!(head.contains("200"), "{head}");
    assert_eq!(body, r#"{"cart":["book"]}"#);
    let cookie = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|v| v.split(';').next())
        .unwrap()
        .to_string();
    let (_, body) = post(&addr, "/invoke/shop:addToCart", Some(&cookie)).await;
    assert_eq!(body, r#"{"cart":["book","book"]}"#, "the session carries the cart");
    running.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.done)
        .await
        .unwrap()
        .unwrap();
}
