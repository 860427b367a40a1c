//! Embedding the node library: an application registers its own service next to the built-ins.
//!
//! ```sh
//! cargo run -p integration-node --example embedded -- --array-urls 127.0.0.1:9510 \
//!     --cluster-name local --secret-file ferrocotta-local/secret --listen 127.0.0.1:5600 --admin-listen 127.0.0.1:10600
//! curl -s -c jar -b jar -X POST -d '{"item":"book"}' http://127.0.0.1:5600/invoke/shop:addToCart
//! ```

use clap::Parser;
use integration_node::services::{load_session, save_session, Registry};
use integration_node::settings::{Args, NodeSettings};
use serde_json::{json, Value};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = NodeSettings::from_args(Args::parse())?;
    let mut registry = Registry::with_builtins();
    // A stateful service of the application: a cart in the clustered session, so any node of the
    // cluster can continue the conversation.
    registry.register("shop:addToCart", |node, ssnid, input| {
        Box::pin(async move {
            let mut session = load_session(node, ssnid).await?;
            let mut cart = session.get("cart").cloned().unwrap_or_else(|| json!([]));
            if let (Some(items), Some(item)) = (cart.as_array_mut(), input.get("item")) {
                items.push(item.clone());
            }
            session.insert("cart".into(), cart.clone());
            save_session(node, &session).await?;
            Ok::<Value, _>(json!({"cart": cart, "node": node.logical_name}))
        })
    });
    let running = integration_node::start(settings, registry)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("embedded node serving on {}", running.node.service_addr);
    tokio::signal::ctrl_c().await?;
    running.shutdown.cancel();
    let _ = running.done.await;
    Ok(())
}
