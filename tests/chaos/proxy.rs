//! A userspace TCP proxy that delays or drops traffic (the kernel here has no netem): the test's
//! array clients dial the servers through one proxy each.
//!
//! Delay: every chunk is delivered `delay` after it was read, in order, without limiting how much
//! is in flight. Drop: each chunk is lost with probability `drop`; a TCP stream that lost bytes
//! cannot go on, so the connection then freezes (nothing passes either way, no error) until the
//! fault is healed, when it is closed, which is what a client sees on a lossy link whose
//! retransmissions never get through.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkFault {
    /// Added one-way latency.
    pub delay: Duration,
    /// Probability that a chunk is lost (0 to 1).
    pub drop: f64,
}

/// A proxy to one target.
pub struct LinkProxy {
    /// Address to dial instead of the target.
    pub addr: String,
    fault: watch::Sender<LinkFault>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    /// Starts a proxy on `bind_ip` (a free port) to `target`.
    pub async fn start(bind_ip: &str, target: String) -> LinkProxy {
        let listener = TcpListener::bind((bind_ip, 0)).await.expect("bind proxy");
        let addr = listener.local_addr().unwrap().to_string();
        let (fault, fault_rx) = watch::channel(LinkFault::default());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let target = target.clone();
                let fault_rx = fault_rx.clone();
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&target).await {
                        relay(inbound, outbound, fault_rx).await;
                    }
                });
            }
        });
        LinkProxy { addr, fault, task }
    }

    /// Sets the fault (a default `LinkFault` heals).
    pub fn set(&self, fault: LinkFault) {
        let _ = self.fault.send(fault);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(a: TcpStream, b: TcpStream, fault: watch::Receiver<LinkFault>) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let frozen = Arc::new(AtomicBool::new(false));
    let up = tokio::spawn(direction(ar, bw, fault.clone(), frozen.clone()));
    direction(br, aw, fault, frozen).await;
    let _ = up.await;
}

/// Waits until the drop fault is healed (the end of a frozen connection).
async fn healed(fault: &mut watch::Receiver<LinkFault>) {
    let _ = fault.wait_for(|f| f.drop == 0.0).await;
}

/// Copies one direction, delaying chunks; a lost chunk freezes the connection (both directions
/// hold their sockets open and silent) until the fault is healed.
async fn direction(
    mut from: OwnedReadHalf,
    to: OwnedWriteHalf,
    mut fault: watch::Receiver<LinkFault>,
    frozen: Arc<AtomicBool>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = {
        let frozen = frozen.clone();
        let mut fault = fault.clone();
        tokio::spawn(async move {
            let mut to = to;
            while let Some((at, bytes)) = rx.recv().await {
                tokio::time::sleep_until(at).await;
                if frozen.load(Ordering::Relaxed) {
                    healed(&mut fault).await;
                    return;
                }
                if to.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            if frozen.load(Ordering::Relaxed) {
                healed(&mut fault).await;
            }
            let _ = to.shutdown().await;
        })
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = async { while !frozen.load(Ordering::Relaxed) { tokio::time::sleep(Duration::from_millis(50)).await } } => break,
        };
        let f = *fault.borrow();
        if f.drop > 0.0 && rand::thread_rng().gen_bool(f.drop.min(1.0)) {
            frozen.store(true, Ordering::Relaxed);
            break;
        }
        if tx
            .send((tokio::time::Instant::now() + f.delay, buf[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    if frozen.load(Ordering::Relaxed) {
        healed(&mut fault).await;
    }
    drop(tx);
    let _ = writer.await;
}
