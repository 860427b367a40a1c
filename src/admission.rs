//! Admission of new connections: how many a listener holds, how many one IP address may hold, and
//! how many may be in their handshake at once. Every listener of the array and of the nodes goes
//! through one [`Admission`], so a flood of connections from one host (idle, slow, or never
//! finishing its handshake) cannot take what other clients need.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Pause after a failed accept before the next.
const ACCEPT_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Connections held at most.
    pub connections_max: u32,
    /// Connections from one IP address at most.
    pub connections_per_ip_max: u32,
    /// Connections in their handshake at most.
    pub pending_handshakes_max: u32,
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    pending: u32,
    /// Connections and connections in their handshake, by address.
    by_ip: HashMap<IpAddr, (u32, u32)>,
}

impl AdmissionLimits {
    /// Connections in their handshake one address may have: a quarter of the listener's, so one
    /// host that never finishes its handshakes cannot keep everyone else out.
    pub fn pending_per_ip_max(&self) -> u32 {
        (self.pending_handshakes_max / 4).max(1)
    }
}

/// Connection counts of one listener.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    counts: Arc<Mutex<Counts>>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The listener holds `connections_max` connections.
    #[error("the server holds its maximum of {0} connections")]
    Full(u32),
    /// This address holds `connections_per_ip_max` connections.
    #[error("this address holds its maximum of {0} connections")]
    PerIp(u32),
    /// `pending_handshakes_max` connections are in their handshake.
    #[error("{0} connections are already in their handshake")]
    Pending(u32),
    /// This address has its share of connections in their handshake.
    #[error("this address has {0} connections in their handshake already")]
    PendingPerIp(u32),
}

/// An admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Admitted {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
    pending: bool,
}

impl Admission {
    /// Counts for a listener with these bounds.
    pub fn new(limits: AdmissionLimits) -> Admission {
        Admission {
            limits,
            counts: Arc::default(),
        }
    }

    /// Admits a connection from `ip` in its handshake, or says why not.
    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, Refused> {
        let mut c = self.counts.lock().expect("admission lock");
        if c.total >= self.limits.connections_max {
            return Err(Refused::Full(self.limits.connections_max));
        }
        if c.pending >= self.limits.pending_handshakes_max {
            return Err(Refused::Pending(self.limits.pending_handshakes_max));
        }
        let (per_ip, pending_per_ip) = c.by_ip.get(&ip).copied().unwrap_or((0, 0));
        if per_ip >= self.limits.connections_per_ip_max {
            return Err(Refused::PerIp(self.limits.connections_per_ip_max));
        }
        if pending_per_ip >= self.limits.pending_per_ip_max() {
            return Err(Refused::PendingPerIp(self.limits.pending_per_ip_max()));
        }
        c.total += 1;
        c.pending += 1;
        let entry = c.by_ip.entry(ip).or_default();
        entry.0 += 1;
        entry.1 += 1;
        Ok(Admitted {
            counts: self.counts.clone(),
            ip,
            pending: true,
        })
    }

    /// The next connection on `listener` with its admission (or why it was refused); `None` once
    /// `shutdown` is cancelled. A failed accept (out of file descriptors) is logged with `port`
    /// and tried again after a pause, so a full table never spins the loop.
    pub async fn next(
        &self,
        listener: &tokio::net::TcpListener,
        shutdown: &tokio_util::sync::CancellationToken,
        port: &'static str,
    ) -> Option<(tokio::net::TcpStream, std::net::SocketAddr, Result<Admitted, Refused>)> {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return None,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((tcp, remote)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some((tcp, remote, self.admit(remote.ip())));
                }
                Err(e) => {
                    tracing::warn!(event = "listener.accept_failed", port, error = %e);
                    tokio::time::sleep(ACCEPT_RETRY_PAUSE).await;
                }
            }
        }
    }

    /// Connections held now.
    pub fn connections(&self) -> u32 {
        self.counts.lock().expect("admission lock").total
    }
}

impl Admitted {
    /// The handshake is done: the connection no longer counts as pending.
    pub fn handshake_done(&mut self) {
        if self.pending {
            self.pending = false;
            let mut c = self.counts.lock().expect("admission lock");
            c.pending -= 1;
            if let Some(e) = c.by_ip.get_mut(&self.ip) {
                e.1 -= 1;
            }
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("admission lock");
        c.total -= 1;
        if self.pending {
            c.pending -= 1;
        }
        if let Some(e) = c.by_ip.get_mut(&self.ip) {
            e.0 -= 1;
            if self.pending {
                e.1 -= 1;
            }
            if e.0 == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}

/// Raises this process's soft limit of open files to its hard limit, so a server can hold the
/// connections its limits allow; returns the limit in force (logged by the caller).
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bound_holds_and_places_come_back() {
        let a = Admission::new(AdmissionLimits {
            connections_max: 4,
            connections_per_ip_max: 2,
            pending_handshakes_max: 8,
        });
        let (one, two, three): (IpAddr, IpAddr, IpAddr) = (
            "127.0.0.2".parse().unwrap(),
            "127.0.0.3".parse().unwrap(),
            "127.0.0.4".parse().unwrap(),
        );
        let mut c1 = a.admit(one).unwrap();
        let mut c2 = a.admit(one).unwrap();
        assert_eq!(a.admit(one).unwrap_err(), Refused::PerIp(2));
        c1.handshake_done();
        c2.handshake_done();
        let c3 = a.admit(two).unwrap();
        let c4 = a.admit(two).unwrap();
        assert_eq!(a.admit(three).unwrap_err(), Refused::Full(4));
        drop(c1);
        drop(c3);
        assert_eq!(a.connections(), 2);
        assert!(a.admit(three).is_ok());
        drop(c4);
        // A quarter of the pending handshakes per address.
        let b = Admission::new(AdmissionLimits {
            connections_max: 100,
            connections_per_ip_max: 100,
            pending_handshakes_max: 8,
        });
        let _p: Vec<_> = (0..2).map(|_| b.admit(one).unwrap()).collect();
        assert_eq!(b.admit(one).unwrap_err(), Refused::PendingPerIp(2));
        let _q: Vec<_> = (0..2).map(|_| b.admit(two).unwrap()).collect();
        let _r: Vec<_> = (0..2).map(|_| b.admit(three).unwrap()).collect();
        let _s: Vec<_> = (0..2).map(|_| b.admit("127.0.0.5".parse().unwrap()).unwrap()).collect();
        assert_eq!(b.admit("127.0.0.6".parse().unwrap()).unwrap_err(), Refused::Pending(8));
    }
}
