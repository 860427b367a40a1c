//! The seed's table "Putting It All Together", one test per row: checkpoint restart
//! (`demo:checkpointed`, or the same service keeping no checkpoint), clustering (two nodes and the
//! failover client, or one node) and guaranteed delivery (`NodeClient::invoke_gd`, or a plain
//! invoke). The node running the service is killed (kill -9) part-way; each row asserts who
//! restarts the service (the test by hand, or the client by itself, and on which node) and where
//! it restarts (the beginning, or the last checkpoint), as the table says.

mod common;

use std::time::Duration;

use common::{phase, TestArray, TestNode};
use ferrocotta::config::ConfigDuration;
use ferrocotta::node_client::{NodeClient, NodeClientError, NodeClientSettings};
use serde_json::{json, Value};

/// Every node lets a taken-over `demo:checkpointed` run again (it keeps its state in the array).
const NODE_TOML: &str = "member_refresh_interval = \"500ms\"\nclient_keepalive_interval = \"250ms\"\n\
                         \n[gd_takeover]\n\"demo:checkpointed\" = \"rerun\"\n";

/// 30 steps of 100 ms; the runner is killed after about 0.8 s.
fn job(id: &str, checkpoint: bool) -> Value {
    json!({"jobId": id, "steps": 30, "stepMillis": 100, "checkpoint": checkpoint})
}

/// Who restarted the service, and the answer of the run that completed.
#[derive(Debug, PartialEq)]
enum Restart {
    /// The client's own call failed; the test invoked again by hand.
    Manual,
    /// The client's call came back with the result by itself.
    Client,
}

fn row(name: &str, checkpoint: bool, clustered: bool, gd: bool) -> (Restart, Value) {
    let array = TestArray::start_with(1, 3, |c| {
        c.timing.client_reconnect_window = ConfigDuration(Duration::from_secs(3))
    });
    let state = array.path().join("a-state");
    let a_args = ["--logical-name", "a", "--state-dir", state.to_str().unwrap()];
    let mut a = TestNode::spawn(&array, "a", name, &a_args, NODE_TOML);
    a.wait_ready(Duration::from_secs(30));
    let mut nodes = a.service.clone();
    let mut b = None;
    if clustered {
        let mut n = TestNode::spawn(&array, "b", name, &["--logical-name", "b"], NODE_TOML);
        n.wait_ready(Duration::from_secs(30));
        nodes = format!("{nodes},{}", n.service);
        b = Some(n);
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut settings = NodeClientSettings::new(&nodes).unwrap();
    settings.discover = false;
    settings.request_timeout = Duration::from_secs(10);
    let client = std::sync::Arc::new(runtime.block_on(NodeClient::connect(settings)));
    let input = job(&format!("{name}-job"), checkpoint);

    phase(&format!("{name}: the service starts on a; a is killed part-way"));
    let call = {
        let (client, input) = (client.clone(), input.clone());
        runtime.spawn(async move {
            if gd {
                let start = json!({});
                client
                    .invoke_gd("demo:checkpointed", &input, None, &start, Duration::from_secs(60))
                    .await
                    .map(|(_, answer)| answer.value["result"].clone())
            } else {
                client
                    .invoke("demo:checkpointed", &input)
                    .await
                    .map(|answer| answer.value)
            }
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    a.kill9();
    if !clustered {
        phase(&format!("{name}: a becomes available again"));
        std::thread::sleep(Duration::from_secs(1));
        let (service, admin) = (a.service.clone(), a.admin.clone());
        a = TestNode::spawn_at(&array, "a-again", name, &a_args, NODE_TOML, service, admin);
        a.wait_ready(Duration::from_secs(30));
    }
    let outcome = runtime.block_on(call).unwrap();
    let (restart, result) = match outcome {
        Ok(result) => (Restart::Client, result),
        Err(NodeClientError::NoNode(why)) => {
            phase(&format!("{name}: the client gave up ({why:?}); restarted by hand"));
            let by_hand = runtime
                .block_on(client.invoke("demo:checkpointed", &input))
                .expect("the manual restart runs");
            (Restart::Manual, by_hand.value)
        }
        Err(e) => panic!("{name}: {e}"),
    };
    eprintln!("{name}: {restart:?} {result}");
    drop(b);
    (restart, result)
}

fn resumed_from(result: &Value) -> u64 {
    result["resumedFrom"].as_u64().unwrap()
}

fn node_of(result: &Value) -> &str {
    result["node"].as_str().unwrap()
}

#[test]
fn row_1_nothing_a_manual_restart_at_the_beginning() {
    let (restart, result) = row("r1", false, false, false);
    assert_eq!(restart, Restart::Manual);
    assert_eq!((resumed_from(&result), node_of(&result)), (0, "a"));
}

#[test]
fn row_2_guaranteed_delivery_the_client_restarts_it_at_the_beginning_once_the_server_is_back() {
    let (restart, result) = row("r2", false, false, true);
    assert_eq!(restart, Restart::Client);
    assert_eq!((resumed_from(&result), node_of(&result)), (0, "a"));
}

#[test]
fn row_3_clustering_the_client_retries_on_the_next_server_at_the_beginning() {
    let (restart, result) = row("r3", false, true, false);
    assert_eq!(restart, Restart::Client);
    assert_eq!((resumed_from(&result), node_of(&result)), (0, "b"));
}

#[test]
fn row_4_clustering_and_guaranteed_delivery_the_next_server_at_the_beginning() {
    let (restart, result) = row("r4", false, true, true);
    assert_eq!(restart, Restart::Client);
    assert_eq!((resumed_from(&result), node_of(&result)), (0, "b"));
}

#[test]
fn row_5_checkpoints_a_manual_restart_at_the_checkpoint() {
    let (restart, result) = row("r5", true, false, false);
    assert_eq!(restart, Restart::Manual);
    assert!(resumed_from(&result) > 0, "{result}");
    assert_eq!(node_of(&result), "a");
}

#[test]
fn row_6_checkpoints_and_guaranteed_delivery_the_client_restarts_it_at_the_checkpoint() {
    let (restart, result) = row("r6", true, false, true);
    assert_eq!(restart, Restart::Client);
    assert!(resumed_from(&result) > 0, "{result}");
    assert_eq!(node_of(&result), "a");
}

#[test]
fn row_7_checkpoints_and_clustering_the_next_server_at_the_checkpoint() {
    let (restart, result) = row("r7", true, true, false);
    assert_eq!(restart, Restart::Client);
    assert!(resumed_from(&result) > 0, "{result}");
    assert_eq!(node_of(&result), "b");
}

#[test]
fn row_8_all_three_the_next_server_at_the_checkpoint_until_it_succeeds() {
    let (restart, result) = row("r8", true, true, true);
    assert_eq!(restart, Restart::Client);
    assert!(resumed_from(&result) > 0, "{result}");
    assert_eq!(node_of(&result), "b");
}
