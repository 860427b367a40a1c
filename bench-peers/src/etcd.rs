//! The etcd v3 target: puts, ranges and transactions over gRPC.
//!
//! Reads map onto etcd's two read modes: a linearizable range (etcd's default, which confirms
//! leadership through a ReadIndex round before answering) for `get`, a serializable range (served
//! from the local state of whichever member the request lands on) for `get-eventual`. The
//! compare-and-swap is one Txn: compare the value, put on success.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, Txn, TxnOp};
use ferrocotta::loadgen::{OpError, Target};

use crate::{deadline, PeerArgs};

/// Operations per Txn when preloading: etcd refuses larger transactions unless the server was
/// started with a higher `--max-txn-ops` (default 128); benches/peers/run.sh keeps the default.
const TXN_OPS_MAX: usize = 128;

/// etcd through one or more clients, used round-robin.
pub struct EtcdTarget {
    /// One per `--connections`; each balances over every member with one HTTP/2 connection to
    /// each, so `--connections` multiplies the connections per member.
    clients: Vec<KvClient>,
    /// Round-robin cursor over `clients`.
    next: AtomicUsize,
    /// Deadline of each operation.
    timeout: Duration,
}

impl EtcdTarget {
    /// Clients to the members' client URLs (`host:port`; `http://` is added when missing).
    pub async fn connect(endpoints: &[String], connections: usize, args: &PeerArgs) -> anyhow::Result<EtcdTarget> {
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections {
            let options = ConnectOptions::new()
                .with_connect_timeout(args.connect_timeout)
                .with_timeout(args.timeout);
            let client = Client::connect(endpoints, Some(options))
                .await
                .with_context(|| format!("cannot connect to etcd at {}", endpoints.join(",")))?;
            clients.push(client.kv_client());
        }
        Ok(EtcdTarget {
            clients,
            next: AtomicUsize::new(0),
            timeout: args.timeout,
        })
    }

    /// The next client. A `KvClient` call takes `&mut self`, so each operation works on a clone:
    /// a handle onto the same channel, not a new connection.
    fn client(&self) -> KvClient {
        self.clients[self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len()].clone()
    }
}

/// The stable name of an etcd error in the error table.
fn error_kind(e: etcd_client::Error) -> OpError {
    use tonic::Code;
    OpError::new(match &e {
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            Code::DeadlineExceeded | Code::Cancelled => "timeout",
            Code::Unavailable => "unavailable",
            Code::ResourceExhausted => "resource_exhausted",
            Code::InvalidArgument => "invalid_argument",
            _ => "grpc_other",
        },
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => "connection",
        _ => "other",
    })
}

impl Target for EtcdTarget {
    async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), OpError> {
        let mut client = self.client();
        deadline(self.timeout, async {
            client.put(key, value, None).await.map(drop).map_err(error_kind)
        })
        .await
    }

    async fn get(&self, key: &[u8], linearizable: bool) -> Result<Option<Vec<u8>>, OpError> {
        let mut client = self.client();
        let options = if linearizable {
            None
        } else {
            Some(GetOptions::new().with_serializable())
        };
        deadline(self.timeout, async {
            let response = client.get(key, options).await.map_err(error_kind)?;
            Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
        })
        .await
    }

    async fn cas(&self, key: &[u8], expected: &[u8], new: &[u8]) -> Result<bool, OpError> {
        let mut client = self.client();
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key, new, None)]);
        deadline(self.timeout, async {
            client.txn(txn).await.map(|r| r.succeeded()).map_err(error_kind)
        })
        .await
    }

    async fn put_many(&self, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), OpError> {
        let mut client = self.client();
        for chunk in entries.chunks(TXN_OPS_MAX) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| TxnOp::put(k.as_slice(), v.as_slice(), None))
                .collect();
            deadline(self.timeout, async {
                client.txn(Txn::new().and_then(ops)).await.map(drop).map_err(error_kind)
            })
            .await?;
        }
        Ok(())
    }
}
