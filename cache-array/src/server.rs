//! Wiring of one array server: secrets and TLS, storage (verified), Raft, the three listeners,
//! stripe formation, and shutdown.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use ferrocotta::admission::{Admission, AdmissionLimits};
use ferrocotta::config::{ClusterConfig, ServerPosition};
use ferrocotta::handshake::{ClientIdentity, FrameDeadlines, HandshakeError, ServerIdentity};
use ferrocotta::protocol::{ConnectionRole, Refusal, SOFTWARE_VERSION};
use ferrocotta::security::{read_secret_file, Credentials};
use ferrocotta::tls::{ClientTls, Reloadable, ServerTls, TlsError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::console::Recorder;
use crate::data_folder::{self, FolderError, OpenedFolder};
use crate::elections::{Elections, REACH_PROBE_TIMEOUT};
use crate::formation::{Formation, Prober, VoteGate};
use crate::listener::{self, Listening};
use crate::log_store::LogStore;
use crate::membership::Changes;
use crate::metrics::Metrics;
use crate::network::{fetch_roster, probe_peer, PeerAuthority, PeerNetworkFactory, PeerService, PEER_FRAME_BYTES_MAX};
use crate::roster::{LiveRoster, Roster};
use crate::service::{ClientAuthority, ClientService};
use crate::state_machine::StateMachineStore;
use crate::stripe::Stripe;
use crate::types::{NodeId, Raft};

/// Connections the group port takes at most: a stripe has at most 7 servers, each holding one
/// connection to each peer, plus short-lived probes and reconnects.
pub const GROUP_CONNECTIONS_MAX: u32 = 256;

/// Group-port connections from one address at most (several servers may share a host).
pub const GROUP_CONNECTIONS_PER_IP_MAX: u32 = 64;

/// Group-port connections in their handshake at most.
pub const GROUP_PENDING_HANDSHAKES_MAX: u32 = 32;

/// Longest a probe of a peer may take during stripe formation.
/// How often certificate files are looked at when the config sets no interval (with no TLS there
/// is nothing to reload).
const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(60);

/// Longest a stopping server waits for its connections and tasks to finish.
const STOP_DRAIN_MAX: Duration = Duration::from_secs(5);

/// Entries kept behind a snapshot, so a briefly lagging mirror catches up from the log.
const LOG_KEPT_BEHIND_SNAPSHOT: u64 = 1000;

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes of a snapshot sent in one call (well below `PEER_FRAME_BYTES_MAX`).
const SNAPSHOT_CHUNK_BYTES: u64 = 8 * 1024 * 1024;

/// Longest one snapshot chunk may take to be sent, written and acknowledged.
const SNAPSHOT_CHUNK_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything needed to start a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Path of the cluster config file.
    pub config_path: PathBuf,
    /// Name of this server in the config.
    pub name: String,
}

/// The secrets of a server, read from the files the config names.
pub struct Secrets {
    /// The cluster secret (empty when the array has none).
    pub cluster: Vec<u8>,
    /// The peer secret.
    pub peer: Vec<u8>,
    /// The credentials file, if any, and its current content.
    pub credentials: Option<(PathBuf, Arc<RwLock<Credentials>>)>,
}

impl Secrets {
    /// Reads every secret the config names; errors name the field and file.
    pub fn load(config_path: &Path, config: &ClusterConfig) -> anyhow::Result<Secrets> {
        let sec = &config.security;
        let cluster = match &sec.secret_file {
            None => Vec::new(),
            Some(f) => {
                read_secret_file(&ClusterConfig::resolve_path(config_path, f)).context("security.secret_file")?
            }
        };
        let peer_file = sec
            .peer_secret_file
            .as_ref()
            .context("security.peer_secret_file is required")?;
        let peer = read_secret_file(&ClusterConfig::resolve_path(config_path, peer_file))
            .context("security.peer_secret_file")?;
        if ferrocotta::security::constant_time_eq(&peer, &cluster) {
            bail!("security.peer_secret_file holds the same secret as secret_file: a client credential must never be a peer's");
        }
        let credentials = match &sec.credentials_file {
            None => None,
            Some(f) => {
                let path = ClusterConfig::resolve_path(config_path, f);
                let c = Credentials::load(&path).context("security.credentials_file")?;
                Some((path, Arc::new(RwLock::new(c))))
            }
        };
        Ok(Secrets {
            cluster,
            peer,
            credentials,
        })
    }
}

/// The credentials file as a [`Reloadable`]: re-read on SIGHUP and when it changes.
struct CredentialsReloader {
    path: PathBuf,
    current: Arc<RwLock<Credentials>>,
    stamp: std::sync::Mutex<Option<(u64, std::time::SystemTime)>>,
}

impl Reloadable for CredentialsReloader {
    fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let now = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)));
        let mut stamp = self.stamp.lock().expect("stamp lock");
        if !force && *stamp == now {
            return Ok(false);
        }
        let fresh = Credentials::load(&self.path).map_err(|e| TlsError(e.to_string()))?;
        *self.current.write().expect("credentials lock") = fresh;
        *stamp = now;
        Ok(true)
    }

    fn describe(&self) -> String {
        format!("credentials {}", self.path.display())
    }
}

/// TLS of the three ports and of the dialler of peers.
struct ServerTlsSet {
    client: Arc<ServerTls>,
    group: Arc<ServerTls>,
    admin: Arc<ServerTls>,
    peer_dialler: Arc<ClientTls>,
}

impl ServerTlsSet {
    fn load(config_path: &Path, config: &ClusterConfig, name: &str) -> anyhow::Result<Option<ServerTlsSet>> {
        let Some(tls) = &config.security.tls else {
            return Ok(None);
        };
        let files = tls.files_for(config_path, name);
        Ok(Some(ServerTlsSet {
            client: ServerTls::load(
                &format!("client port of {name}"),
                files.clone(),
                tls.require_client_cert,
            )?,
            // Peers always show their certificates to each other (mutual TLS).
            group: ServerTls::load(&format!("group port of {name}"), files.clone(), true)?,
            admin: ServerTls::load(&format!("admin port of {name}"), files.clone(), tls.require_client_cert)?,
            peer_dialler: ClientTls::load(&format!("peer dialler of {name}"), files)?,
        }))
    }

    fn reloadables(&self) -> Vec<Arc<dyn Reloadable>> {
        vec![
            self.client.clone(),
            self.group.clone(),
            self.admin.clone(),
            self.peer_dialler.clone(),
        ]
    }
}

async fn bind(what: &str, host: &str, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {what} {host}:{port}"))
}

/// Runs a server until `shutdown` is cancelled.
pub async fn run(opts: ServerOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let seed = ClusterConfig::load(&opts.config_path)?;
    seed.check_slot_cover()
        .with_context(|| format!("{}: the stripes' slots", opts.config_path.display()))?;
    for w in seed.warnings() {
        tracing::warn!(event = "config.warning", "{w}");
    }
    let secrets = Secrets::load(&opts.config_path, &seed)?;
    let tls = ServerTlsSet::load(&opts.config_path, &seed, &opts.name)?;
    let peer_client_identity = ClientIdentity {
        software_version: SOFTWARE_VERSION.to_string(),
        array_name: Some(seed.array_name.clone()),
        secret: secrets.peer.clone(),
        role: ConnectionRole::Peer {
            from: opts.name.clone(),
        },
        tls: tls.as_ref().map(|t| t.peer_dialler.clone()),
    };
    // Where this server belongs: cluster.toml says, or (for a server added to a running array)
    // the roster of its stripe, asked of the array's servers.
    let (stripe_index, roster) = match seed.find_server(&opts.name) {
        Some((pos, _)) => (pos.stripe, Roster::seed(&seed, pos.stripe)),
        None => learn_roster(&seed, &opts, &peer_client_identity).await?,
    };
    let seed = Arc::new(seed);
    let live = LiveRoster::new(seed.clone(), stripe_index, &opts.name, roster);
    let config = Arc::new(ClusterConfig::parse(&live.document()).context("the live configuration document")?);
    let (position, me) = config
        .find_server(&opts.name)
        .context("this server is not in its stripe's roster")?;
    let me = me.clone();
    let data_dir = ClusterConfig::resolve_path(&opts.config_path, &me.data_dir);
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create data_dir {}", data_dir.display()))?;
    let config_toml = std::fs::read_to_string(&opts.config_path)?;

    // Bind first: a port clash is reported before anything touches the data.
    let client_listener = bind("client port", me.listen_host(), me.port).await?;
    let group_listener = bind("group port", me.listen_host(), me.group_port).await?;
    let admin_listener = bind("admin port", me.listen_host(), me.admin_port).await?;
    let resp_listener = match me.resp_port {
        Some(port) => Some(bind("Redis-protocol port", me.listen_host(), port).await?),
        None => None,
    };

    let configured = config.caches.iter().map(|(n, c)| (n.clone(), c.settings())).collect();
    let folder = match data_folder::open(&data_dir, configured) {
        Ok(f) => f,
        Err(FolderError::Damaged(d)) => {
            tracing::error!(event = "store.damaged", error = %d);
            bail!("{d}; {}", data_folder::repair_advice(&opts.config_path, &me.name));
        }
        Err(FolderError::Other(e)) => return Err(e.context(format!("cannot open {}", data_dir.display()))),
    };
    let OpenedFolder {
        log: log_store,
        opened,
        state_machine,
        snapshot_dir,
    } = folder;
    let flush_stats = log_store.flush_stats();
    let shared = state_machine.shared();
    let gate = Arc::new(VoteGate::new(&opened));
    // The roster this server's own data holds is newer than cluster.toml's.
    live.refresh(&shared);
    refuse_if_removed(&live, &me.name, &peer_client_identity).await?;

    let raft = start_raft(
        &config,
        position,
        PeerNetworkFactory::new(peer_client_identity.clone(), live.clone()),
        log_store.clone(),
        state_machine,
    )
    .await?;
    let stripe = Arc::new(Stripe::new(
        raft.clone(),
        shared.clone(),
        config.clone(),
        position,
        live.clone(),
    ));
    tokio::spawn(crate::roster::follow(live.clone(), shared, shutdown.clone()));

    let tracker = TaskTracker::new();
    let limits = &config.limits;
    let deadlines = FrameDeadlines {
        idle: limits.idle_timeout.0,
        frame: limits.frame_timeout.0,
    };
    let elections = Elections::new(position.node_id(), live.clone(), &config.timing);
    let peer_service = Arc::new(PeerService {
        raft: raft.clone(),
        elections: elections.clone(),
        listening: Listening {
            name: "group",
            identity: ServerIdentity {
                server_name: me.name.clone(),
                array_name: config.array_name.clone(),
                config_toml: ferrocotta::handshake::no_document(),
                authority: Arc::new(PeerAuthority {
                    peer_secret: secrets.peer.clone(),
                    roster: live.clone(),
                }),
            },
            tls: tls.as_ref().map(|t| t.group.clone()),
            admission: Admission::new(AdmissionLimits {
                connections_max: GROUP_CONNECTIONS_MAX,
                connections_per_ip_max: GROUP_CONNECTIONS_PER_IP_MAX,
                pending_handshakes_max: GROUP_PENDING_HANDSHAKES_MAX,
            }),
            handshake_timeout: limits.handshake_timeout.0,
            max_frame: PEER_FRAME_BYTES_MAX,
        },
        roster: live.clone(),
        stripe: position.stripe,
        deadlines,
        gate: gate.clone(),
        log: log_store.clone(),
    });
    tracker.spawn(listener::serve(
        peer_service,
        group_listener,
        shutdown.clone(),
        tracker.clone(),
    ));

    let credentials = secrets.credentials.as_ref().map(|(_, c)| c.clone()).unwrap_or_default();
    let metrics = Arc::new(Metrics::default());
    let recorder = Arc::new(Recorder::new(&me.name));
    let service = Arc::new(ClientService {
        stripe: stripe.clone(),
        listening: Listening {
            name: "client",
            identity: ServerIdentity {
                server_name: me.name.clone(),
                array_name: config.array_name.clone(),
                config_toml: {
                    let live = live.clone();
                    Arc::new(move || live.document())
                },
                authority: Arc::new(ClientAuthority {
                    cluster_secret: secrets.cluster.clone(),
                    credentials: credentials.clone(),
                }),
            },
            tls: tls.as_ref().map(|t| t.client.clone()),
            admission: Admission::new(AdmissionLimits {
                connections_max: limits.max_connections,
                connections_per_ip_max: limits.max_connections_per_ip,
                pending_handshakes_max: limits.max_pending_handshakes,
            }),
            handshake_timeout: limits.handshake_timeout.0,
            max_frame: limits.max_frame_bytes as usize,
        },
        credentials: credentials.clone(),
        metrics: metrics.clone(),
        recorder: recorder.clone(),
    });
    tracker.spawn(listener::serve(
        service.clone(),
        client_listener,
        shutdown.clone(),
        tracker.clone(),
    ));
    if let Some(resp_listener) = resp_listener {
        let topology = Arc::new(crate::resp::topology::Topology::new(
            stripe.clone(),
            tls.as_ref().map(|t| t.peer_dialler.clone()),
        ));
        if config.stripes.len() > 1 {
            tracker.spawn(topology.clone().run(shutdown.clone()));
        }
        let resp = Arc::new(crate::resp::RespService {
            ops: service.clone(),
            topology,
            cluster_secret: secrets.cluster.clone(),
            credentials: credentials.clone(),
            tls: tls.as_ref().map(|t| t.client.clone()),
            admission: Admission::new(AdmissionLimits {
                connections_max: limits.max_connections,
                connections_per_ip_max: limits.max_connections_per_ip,
                pending_handshakes_max: limits.max_pending_handshakes,
            }),
            handshake_timeout: limits.handshake_timeout.0,
            limits: crate::resp::codec::RequestLimits {
                args_max: 2 * ferrocotta::protocol::BATCH_KEYS_MAX + 8,
                bytes_max: limits.max_frame_bytes as usize,
            },
            clients: Default::default(),
            next_id: Default::default(),
            started: std::time::Instant::now(),
        });
        tracker.spawn(crate::resp::serve(
            resp,
            resp_listener,
            shutdown.clone(),
            tracker.clone(),
        ));
    }

    let changes = Arc::new(Changes {
        stripe: stripe.clone(),
        elections: elections.clone(),
        peer_identity: peer_client_identity.clone(),
        seed: seed.clone(),
        lock: tokio::sync::Mutex::new(()),
    });
    tracker.spawn(changes.clone().run(shutdown.clone()));
    let admin_state = Arc::new(AdminState {
        stripe: stripe.clone(),
        metrics: metrics.clone(),
        flush_stats,
        config_digest: crate::console::config_digest(&config_toml),
        changes,
        peer_secret: secrets.peer.clone(),
        recorder: recorder.clone(),
        peer_tls: tls.as_ref().map(|t| t.peer_dialler.clone()),
        gathered: tokio::sync::Mutex::new(None),
    });
    tracker.spawn(ferrocotta::http::serve(
        "admin",
        admin_listener,
        tls.as_ref().map(|t| t.admin.clone()),
        ferrocotta::http::HttpLimits::default(),
        admin::router(admin_state),
        shutdown.clone(),
    ));

    let mut reloadables: Vec<Arc<dyn Reloadable>> = tls.as_ref().map(|t| t.reloadables()).unwrap_or_default();
    if let Some((path, current)) = &secrets.credentials {
        reloadables.push(Arc::new(CredentialsReloader {
            path: path.clone(),
            current: current.clone(),
            stamp: std::sync::Mutex::new(
                std::fs::metadata(path)
                    .ok()
                    .and_then(|m| Some((m.len(), m.modified().ok()?))),
            ),
        }));
    }
    let reload_every = config
        .security
        .tls
        .as_ref()
        .map(|t| t.reload_interval.0)
        .unwrap_or(TLS_RELOAD_INTERVAL);
    ferrocotta::tls::spawn_reloader(reloadables, reload_every, shutdown.clone());

    let prober = |timeout: Duration| -> Prober {
        let identity = peer_client_identity.clone();
        let live = live.clone();
        Arc::new(move |id: NodeId| {
            let identity = identity.clone();
            let addr = live.group_addr(id).unwrap_or_default();
            Box::pin(async move { probe_peer(&addr, &identity, timeout).await })
        })
    };
    tracker.spawn(elections.clone().run(
        raft.clone(),
        log_store.clone(),
        gate.clone(),
        prober(REACH_PROBE_TIMEOUT),
        shutdown.clone(),
    ));
    let formation = Formation {
        raft: raft.clone(),
        log: log_store.clone(),
        gate,
        me: position.node_id(),
        members: stripe.members(),
    };
    tracker.spawn(formation.run(opened, prober(PROBE_TIMEOUT), shutdown.clone()));

    tracing::info!(
        event = "server.serving",
        name = %me.name,
        stripe = position.stripe,
        client = %me.client_addr(),
        group = %me.group_addr(),
        admin = %me.admin_addr(),
        resp = me.resp_addr().as_deref().unwrap_or("off"),
        tls = tls.is_some(),
        version = SOFTWARE_VERSION,
    );
    spawn_leader_log(&stripe, recorder.clone(), shutdown.clone());
    tracker.spawn(crate::upkeep::run(stripe.clone(), recorder.clone(), shutdown.clone()));
    tracker.spawn(crate::console::run_sampler(
        recorder,
        stripe.clone(),
        metrics,
        shutdown.clone(),
    ));
    tracker.spawn(crate::compaction::run(
        raft.clone(),
        log_store,
        snapshot_dir,
        crate::compaction::stagger(config.storage.snapshot_every_log_bytes, position.index),
        shutdown.clone(),
    ));

    // A Raft core that stopped on its own (a storage failure, a bug) leaves a server that answers
    // nothing useful: stop the process so that its supervisor restarts it and says why.
    let mut raft_state = raft.metrics();
    let failure = tokio::select! {
        _ = shutdown.cancelled() => None,
        failure = async {
            loop {
                if let Err(e) = &raft_state.borrow_and_update().running_state {
                    return Some(e.to_string());
                }
                if raft_state.changed().await.is_err() {
                    return Some("the Raft core stopped".to_string());
                }
            }
        } => failure,
    };
    if let Some(why) = &failure {
        tracing::error!(event = "server.raft_failed", error = %why);
        shutdown.cancel();
    }
    tracing::info!(event = "server.stopping", name = %me.name);
    tracker.close();
    if tokio::time::timeout(STOP_DRAIN_MAX, tracker.wait()).await.is_err() {
        tracing::warn!(
            event = "server.stop_timeout",
            "tasks still running after 5s; stopping anyway"
        );
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(event = "server.raft_shutdown_failed", error = %e);
    }
    match failure {
        Some(why) => bail!("the Raft core failed: {why}"),
        None => Ok(()),
    }
}

/// How many times the URL list of a new server's cluster.toml is gone through to find its stripe.
const LEARN_ROUNDS: usize = 5;

/// Finds the stripe of a server that cluster.toml does not name: one added to the running array
/// with `ferrocotta array add-server`. Its peers let it in by name and hand over the roster.
async fn learn_roster(
    seed: &ClusterConfig,
    opts: &ServerOptions,
    identity: &ClientIdentity,
) -> anyhow::Result<(usize, Roster)> {
    let mut last = Vec::new();
    for round in 0..LEARN_ROUNDS {
        last.clear();
        for (_, srv) in seed.servers() {
            match fetch_roster(&srv.group_addr(), identity, PROBE_TIMEOUT).await {
                Ok((stripe, roster)) if roster.server(&opts.name).is_some() => {
                    tracing::info!(
                        event = "roster.learned",
                        from = %srv.name,
                        stripe,
                        generation = roster.generation,
                        "this server is not in cluster.toml: its stripe's roster names it"
                    );
                    return Ok((stripe, roster));
                }
                Ok(_) => last.push(format!("{}: does not name it", srv.name)),
                Err(crate::formation::ProbeError::Handshake(HandshakeError::Refused(Refusal::NotAMember(why)))) => {
                    bail!("{why}")
                }
                Err(e) => last.push(format!("{}: {e}", srv.name)),
            }
        }
        if round + 1 < LEARN_ROUNDS {
            tokio::time::sleep(PROBE_TIMEOUT).await;
        }
    }
    bail!(
        "--name {}: no server of that name in {}, and no server of the array knows it ({}). \
         Add it first with `ferrocotta array add-server`, then start it",
        opts.name,
        opts.config_path.display(),
        last.join("; ")
    )
}

/// Refuses to start a server that was removed from its stripe: its own data says so, or a peer
/// refuses it by name, or a peer's roster is newer and lacks it. Peers that do not answer within
/// [`PROBE_TIMEOUT`] are not waited for (the whole array may be starting).
async fn refuse_if_removed(live: &LiveRoster, name: &str, identity: &ClientIdentity) -> anyhow::Result<()> {
    let mine = live.get();
    if mine.server(name).is_none() {
        bail!(
            "{}",
            live.retired_message(name).unwrap_or_else(|| format!(
                "server `{name}` is not in its stripe's roster (generation {})",
                mine.generation
            ))
        );
    }
    let asks = mine
        .servers
        .iter()
        .filter(|s| s.name != name)
        .map(|s| fetch_roster_named(s.name.clone(), s.group_addr(), identity));
    for (peer, answer) in futures::future::join_all(asks).await {
        match answer {
            Err(crate::formation::ProbeError::Handshake(HandshakeError::Refused(Refusal::NotAMember(why)))) => {
                bail!("{peer} refuses this server: {why}")
            }
            Ok((_, theirs)) if theirs.generation > mine.generation && theirs.server(name).is_none() => bail!(
                "{peer} holds the stripe's roster at generation {} (this server's data is at {}), and it does \
                 not name this server: it was removed. Delete its data or add it under a new name",
                theirs.generation,
                mine.generation
            ),
            _ => {}
        }
    }
    Ok(())
}

async fn fetch_roster_named(
    peer: String,
    addr: String,
    identity: &ClientIdentity,
) -> (String, Result<(usize, Roster), crate::formation::ProbeError>) {
    let answer = fetch_roster(&addr, identity, PROBE_TIMEOUT).await;
    (peer, answer)
}

async fn start_raft(
    config: &Arc<ClusterConfig>,
    position: ServerPosition,
    network: PeerNetworkFactory,
    log_store: LogStore,
    state_machine: StateMachineStore,
) -> anyhow::Result<Raft> {
    let timing = &config.timing;
    let heartbeat_ms = timing.heartbeat_interval.0.as_millis() as u64;
    let raft_config = openraft::Config {
        cluster_name: config.array_name.clone(),
        heartbeat_interval: heartbeat_ms,
        // openraft's own election timer is off: `crate::elections` decides when a mirror
        // campaigns (after `timing.election_timeout` of silence, at once for a crashed active,
        // never without a majority). What remains of these two settings is openraft's leader
        // lease (= election_timeout_max: how long after hearing the active a mirror refuses
        // votes) and a vote request's timeout (= election_timeout_min): short, so the lease
        // costs little after a crash.
        election_timeout_min: heartbeat_ms + heartbeat_ms / 2,
        election_timeout_max: heartbeat_ms * 2,
        enable_elect: false,
        // Staggered like the size threshold (compaction.rs): the servers of a stripe snapshot one
        // after another.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(crate::compaction::stagger(
            config.storage.snapshot_every_entries,
            position.index,
        )),
        max_in_snapshot_log_to_keep: LOG_KEPT_BEHIND_SNAPSHOT,
        // A snapshot goes to a new or far-behind server in chunks, each one call of this timeout.
        // openraft's 200 ms default was too short on a busy machine: a chunk that timed out made
        // the active start the transfer again (a server joining a stripe of 1 GiB took 151 s).
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        install_snapshot_timeout: SNAPSHOT_CHUNK_TIMEOUT.as_millis() as u64,
        ..Default::default()
    };
    let raft_config = Arc::new(raft_config.validate().context("raft settings")?);
    let raft = Raft::new(position.node_id(), raft_config, network, log_store, state_machine)
        .await
        .context("starting raft")?;
    Ok(raft)
}

/// Logs every change of active as seen by this server (stable event `stripe.leader_changed`).
fn spawn_leader_log(stripe: &Arc<Stripe>, recorder: Arc<Recorder>, shutdown: CancellationToken) {
    let stripe = stripe.clone();
    tokio::spawn(async move {
        let mut rx = stripe.raft().metrics();
        let mut last: Option<(Option<u64>, u64)> = None;
        loop {
            let now = {
                let m = rx.borrow_and_update();
                (m.current_leader, m.current_term)
            };
            if last != Some(now) {
                if last.map(|l| l.0) != Some(now.0) {
                    tracing::info!(
                        event = "stripe.leader_changed",
                        term = now.1,
                        leader = ?now.0.and_then(|id| stripe.name_of(id)),
                        me = stripe.name(),
                    );
                    // The console hears it from the server that became, or stopped being, the
                    // active (a crashed active says nothing; its successor does).
                    let me = Some(stripe.position().node_id());
                    let stripe_name = &stripe.config().stripes[stripe.position().stripe].name;
                    if now.0 == me {
                        recorder.event(
                            "leader_change",
                            format!("became the active of {stripe_name} in term {}", now.1),
                        );
                    } else if last.and_then(|l| l.0) == me {
                        recorder.event(
                            "leader_change",
                            format!(
                                "stopped being the active of {stripe_name} (now term {}, active {})",
                                now.1,
                                now.0.and_then(|id| stripe.name_of(id)).as_deref().unwrap_or("unknown")
                            ),
                        );
                    }
                }
                last = Some(now);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    });
}
