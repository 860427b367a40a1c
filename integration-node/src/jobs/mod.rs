//! Scheduled jobs (SPEC 4.5): jobs run on one named node, on any node (exactly one runs each
//! firing) or on all nodes, kept in the array and judged by the array's clock.
//!
//! - [`model`]: what a job is, its schedule's firings, the records of its firings.
//! - this module: [`Jobs`], the node's handle on them: the records in the array (create, change,
//!   suspend, resume, delete, list, runs) and the array's time.
//! - [`scheduler`]: the loop that claims and runs due firings and declares dead nodes' runs in
//!   doubt.
//! - [`admin`]: `/admin/jobs` on the admin port.
//!
//! Records, all keys of one job under one hash tag `{id}` so that one transaction can change them
//! together: the definition in `ferrocotta.node.jobs.<cluster>` under `{id}`; one cursor per lane
//! in `ferrocotta.node.job_cursors.<cluster>` under `{id}/<uid>/<lane>`; the run records, a ring
//! of [`model::RUNS_KEPT`] per lane, in `ferrocotta.node.job_runs.<cluster>` under
//! `{id}/<uid>/<lane>/<slot>`. A firing is claimed by replacing its lane's cursor, compared with
//! the value read, together with writing its run record: of nodes racing for one firing exactly
//! one transaction applies.

pub mod admin;
pub mod model;
mod scheduler;

pub use scheduler::run_scheduler;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use ferrocotta::protocol::{Expiry, Guard, Step, Txn};
use ferrocotta::ArrayClient;

use crate::backend::Backend;
use crate::node::Node;
use crate::services::{Registry, ServiceError};
use model::{Cursor, Job, JobSpec, JobState, Run, Target, JOBS_MAX, RUNS_KEPT};

/// Bounds of the lateness histogram, in ms.
pub const LATENESS_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 30000];

/// What the scheduler counts, for `/metrics`.
#[derive(Default)]
pub struct JobMetrics {
    /// Firings this node ran.
    pub runs: AtomicU64,
    /// Runs that ended with an error.
    pub run_errors: AtomicU64,
    /// Firings this node recorded as missed.
    pub missed: AtomicU64,
    /// Firings this node recorded as skipped for overlap.
    pub skipped_overlap: AtomicU64,
    /// Runs this node declared in doubt.
    pub in_doubt: AtomicU64,
    /// Claims another node won.
    pub claims_lost: AtomicU64,
    /// Lateness of the firings this node ran: counts per bucket of [`LATENESS_BUCKETS_MS`], then
    /// the rest.
    pub lateness: [AtomicU64; LATENESS_BUCKETS_MS.len() + 1],
    /// Sum of the lateness, ms.
    pub lateness_sum_ms: AtomicU64,
}

impl JobMetrics {
    /// Counts a run's lateness.
    pub fn observe_lateness(&self, ms: u64) {
        let i = LATENESS_BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(LATENESS_BUCKETS_MS.len());
        self.lateness[i].fetch_add(1, Ordering::Relaxed);
        self.lateness_sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// The Prometheus text of these metrics.
    pub fn prometheus(&self) -> String {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, v, help) in [
            ("runs", c(&self.runs), "firings this node ran"),
            ("run_errors", c(&self.run_errors), "runs that ended with an error"),
            ("missed", c(&self.missed), "firings this node recorded as missed"),
            (
                "skipped_overlap",
                c(&self.skipped_overlap),
                "firings skipped while the previous run ran",
            ),
            (
                "in_doubt",
                c(&self.in_doubt),
                "runs of dead nodes this node declared in doubt",
            ),
            (
                "claims_lost",
                c(&self.claims_lost),
                "firings another node claimed first",
            ),
        ] {
            out.push_str(&format!(
                "# HELP ferrocotta_node_job_{name}_total {help}\n# TYPE ferrocotta_node_job_{name}_total counter\n\
                 ferrocotta_node_job_{name}_total {v}\n"
            ));
        }
        out.push_str("# HELP ferrocotta_node_job_lateness_ms how late after its time a firing started\n");
        out.push_str("# TYPE ferrocotta_node_job_lateness_ms histogram\n");
        let mut cumulative = 0;
        for (i, bound) in LATENESS_BUCKETS_MS.iter().enumerate() {
            cumulative += c(&self.lateness[i]);
            out.push_str(&format!(
                "ferrocotta_node_job_lateness_ms_bucket{{le=\"{bound}\"}} {cumulative}\n"
            ));
        }
        cumulative += c(&self.lateness[LATENESS_BUCKETS_MS.len()]);
        out.push_str(&format!(
            "ferrocotta_node_job_lateness_ms_bucket{{le=\"+Inf\"}} {cumulative}\n\
             ferrocotta_node_job_lateness_ms_sum {}\nferrocotta_node_job_lateness_ms_count {cumulative}\n",
            c(&self.lateness_sum_ms)
        ));
        out
    }
}

/// The node's handle on the cluster's jobs.
pub struct Jobs {
    /// The node.
    pub node: Arc<Node>,
    /// Its services: what firings invoke, and what a job may name.
    pub registry: Arc<Registry>,
    /// Wakes the scheduler (a job changed).
    pub wake: tokio::sync::Notify,
    /// Counters.
    pub metrics: JobMetrics,
    /// The array's time minus this node's wall clock, as last measured (ms).
    offset_ms: AtomicI64,
    /// Runs this process has in flight: (job id, lane, seq).
    in_flight: Mutex<HashSet<(String, String, u64)>>,
    /// Runs this process ran but could not record (the array stayed away too long): never
    /// started again.
    abandoned: Mutex<HashSet<(String, String, u64)>>,
    /// Since when (the array's time, estimated) this node serves: started or back online.
    serving_since: AtomicU64,
}

fn not_found(id: &str) -> ServiceError {
    ServiceError::new(StatusCode::NOT_FOUND, "not_found", format!("no job `{id}`"))
}

fn conflict(message: String) -> ServiceError {
    ServiceError::new(StatusCode::CONFLICT, "conflict", message)
}

/// Why a job operation could not be carried out after repeated races with other writers.
fn busy(id: &str) -> ServiceError {
    ServiceError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        format!("job `{id}` kept changing under this request; try again"),
    )
}

/// Attempts of a compare-and-set on a job's records before giving up.
const CAS_ATTEMPTS: usize = 16;

/// Keys listed per job at most (cursors and runs: every lane's).
const JOB_KEYS_LISTED_MAX: usize = 100_000;

impl Jobs {
    /// The jobs of this node's cluster.
    pub fn new(node: Arc<Node>, registry: Arc<Registry>) -> Jobs {
        Jobs {
            node,
            registry,
            wake: tokio::sync::Notify::new(),
            metrics: JobMetrics::default(),
            offset_ms: AtomicI64::new(0),
            in_flight: Mutex::new(HashSet::new()),
            abandoned: Mutex::new(HashSet::new()),
            serving_since: AtomicU64::new(0),
        }
    }

    /// The array client; jobs need the array (a stand-alone node has none).
    pub fn client(&self) -> Result<&ArrayClient, ServiceError> {
        match &self.node.backend {
            Backend::Array(c) => Ok(c),
            Backend::Local(_) => Err(ServiceError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "standalone",
                "scheduled jobs live in the cache array; this node runs stand-alone",
            )),
        }
    }

    fn jobs_cache(&self) -> String {
        format!("ferrocotta.node.jobs.{}", self.node.settings.effective_cluster_name)
    }

    fn cursors_cache(&self) -> String {
        format!(
            "ferrocotta.node.job_cursors.{}",
            self.node.settings.effective_cluster_name
        )
    }

    fn runs_cache(&self) -> String {
        format!("ferrocotta.node.job_runs.{}", self.node.settings.effective_cluster_name)
    }

    /// The array's time, read from the active of the stripe that holds `key` (the one that will
    /// stamp a transaction on it); remembers the offset to this node's wall clock.
    pub async fn array_time(&self, c: &ArrayClient, key: &[u8]) -> Result<u64, ferrocotta::ClientError> {
        let before = self.node.wall_ms();
        let t = c.time_of(key).await?;
        let after = self.node.wall_ms();
        let mid = before + (after - before) / 2;
        self.offset_ms.store(t as i64 - mid, Ordering::Relaxed);
        Ok(t)
    }

    /// The array's time as this node estimates it from its wall clock and the last measured
    /// offset (to know how long to sleep; never to decide that a firing is due).
    pub fn estimated_array_ms(&self) -> u64 {
        (self.node.wall_ms() + self.offset_ms.load(Ordering::Relaxed)).max(0) as u64
    }

    /// Every job, by id.
    pub async fn list(&self) -> Result<Vec<Job>, ServiceError> {
        let c = self.client()?;
        let cache = self.jobs_cache();
        let keys = c
            .all_keys(&cache, b"", JOBS_MAX * 2)
            .await
            .map_err(ServiceError::from_array)?;
        let values = c.get_all(&cache, &keys).await.map_err(ServiceError::from_array)?;
        let mut jobs: Vec<Job> = values
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .collect();
        jobs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(jobs)
    }

    /// A job and its record as stored.
    async fn read(&self, id: &str) -> Result<(Job, Vec<u8>), ServiceError> {
        model::check_id(id).map_err(ServiceError::bad_request)?;
        let c = self.client()?;
        let raw = c
            .get(&self.jobs_cache(), def_key(id).as_bytes())
            .await
            .map_err(ServiceError::from_array)?
            .ok_or_else(|| not_found(id))?;
        let job = serde_json::from_slice(&raw)
            .map_err(|e| ServiceError::new(StatusCode::INTERNAL_SERVER_ERROR, "bad_record", e.to_string()))?;
        Ok((job, raw))
    }

    /// One job.
    pub async fn get(&self, id: &str) -> Result<Job, ServiceError> {
        Ok(self.read(id).await?.0)
    }

    /// Checks what a spec names in the cluster: the service exists on this node, and a target
    /// node is a live member (unless `members_known` is false: jobs declared in node.toml may
    /// name nodes that start later).
    async fn check_names(&self, spec: &JobSpec, members_known: bool) -> Result<(), ServiceError> {
        crate::services::check_service_name(&spec.service)?;
        if !self.registry.has(&spec.service) {
            return Err(ServiceError::bad_request(format!(
                "no service `{}` on this node",
                spec.service
            )));
        }
        if let (Target::Node(name), true) = (&spec.target, members_known) {
            let members = crate::members::read_all(self.client()?, &self.node.settings.members_cache())
                .await
                .map_err(ServiceError::from_array)?;
            if !members.iter().any(|m| &m.logical_name == name) {
                let known: Vec<&str> = members.iter().map(|m| m.logical_name.as_str()).collect();
                return Err(ServiceError::bad_request(format!(
                    "no node `{name}` in the cluster (members: {})",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Creates a job; refused if its id exists, if [`JOBS_MAX`] exist, or if the spec is bad
    /// (nothing is stored then).
    pub async fn create(&self, spec: JobSpec, members_known: bool) -> Result<Job, ServiceError> {
        let c = self.client()?;
        let id = match &spec.id {
            Some(id) => id.clone(),
            None => format!("job-{}", random_hex(6)),
        };
        model::check_id(&id).map_err(ServiceError::bad_request)?;
        self.check_names(&spec, members_known).await?;
        let count = self.list().await?.len();
        if count >= JOBS_MAX {
            return Err(conflict(format!(
                "the cluster has {count} jobs, the most it keeps (JOBS_MAX = {JOBS_MAX}); delete one first"
            )));
        }
        let key = def_key(&id);
        let now = self
            .array_time(c, key.as_bytes())
            .await
            .map_err(ServiceError::from_array)?;
        let job = spec
            .into_job(id.clone(), random_hex(8), now)
            .map_err(ServiceError::bad_request)?;
        let value = serde_json::to_vec(&job).expect("a job always encodes");
        let txn = Txn {
            guards: vec![Guard::Absent {
                cache: self.jobs_cache(),
                key: key.clone().into_bytes(),
            }],
            then: vec![put(self.jobs_cache(), key.into_bytes(), value)],
            otherwise: Vec::new(),
        };
        let (created, _) = c.txn(txn).await.map_err(ServiceError::from_array)?;
        if !created {
            return Err(conflict(format!(
                "job `{id}` exists; change it with PUT or delete it first"
            )));
        }
        tracing::info!(event = "job.created", job = %id, service = %job.service, target = ?job.target);
        self.wake.notify_waiters();
        Ok(job)
    }

    /// Replaces a job's definition (its firings so far, runs and state stay).
    pub async fn update(&self, id: &str, mut spec: JobSpec) -> Result<Job, ServiceError> {
        if spec.id.as_deref().is_some_and(|given| given != id) {
            return Err(ServiceError::bad_request("the body's `id` differs from the job's"));
        }
        spec.id = Some(id.to_string());
        self.check_names(&spec, true).await?;
        let suspended = spec.suspended;
        self.change(id, move |old, now| {
            let mut job = spec
                .clone()
                .into_job(id.to_string(), old.uid.clone(), now)
                .map_err(ServiceError::bad_request)?;
            job.created_ms = old.created_ms;
            job.state = match (suspended, old.state) {
                (true, _) => JobState::Suspended,
                (false, JobState::Suspended) => JobState::Suspended,
                _ => JobState::Active,
            };
            Ok(Some(job))
        })
        .await
    }

    /// Suspends or resumes a job.
    pub async fn set_state(&self, id: &str, state: JobState) -> Result<Job, ServiceError> {
        self.change(id, |old, now| {
            if old.state == JobState::Expired {
                return Err(conflict(format!(
                    "job `{id}` has expired: its schedule has no firing left"
                )));
            }
            let mut job = old.clone();
            job.state = state;
            job.changed_ms = now;
            Ok(Some(job))
        })
        .await
    }

    /// Changes a job by compare-and-set on its definition; `f` gets the stored job and the
    /// array's time and returns the new one (`None`: leave it).
    async fn change(
        &self,
        id: &str,
        f: impl Fn(&Job, u64) -> Result<Option<Job>, ServiceError>,
    ) -> Result<Job, ServiceError> {
        let c = self.client()?;
        let key = def_key(id);
        for _ in 0..CAS_ATTEMPTS {
            let (old, raw) = self.read(id).await?;
            let now = self
                .array_time(c, key.as_bytes())
                .await
                .map_err(ServiceError::from_array)?;
            let Some(job) = f(&old, now)? else { return Ok(old) };
            let txn = Txn {
                guards: vec![Guard::ValueIs {
                    cache: self.jobs_cache(),
                    key: key.clone().into_bytes(),
                    value: raw,
                }],
                then: vec![put(
                    self.jobs_cache(),
                    key.clone().into_bytes(),
                    serde_json::to_vec(&job).expect("a job always encodes"),
                )],
                otherwise: Vec::new(),
            };
            if c.txn(txn).await.map_err(ServiceError::from_array)?.0 {
                tracing::info!(event = "job.changed", job = %id, state = ?job.state);
                self.wake.notify_waiters();
                return Ok(job);
            }
        }
        Err(busy(id))
    }

    /// Deletes a job: its definition first (it fires no more), then its cursors and runs.
    pub async fn delete(&self, id: &str) -> Result<(), ServiceError> {
        let c = self.client()?;
        let (job, raw) = self.read(id).await?;
        let removed = c
            .remove_if_equal(&self.jobs_cache(), def_key(id).as_bytes(), &raw)
            .await
            .map_err(ServiceError::from_array)?;
        if !removed {
            return Err(busy(id));
        }
        for cache in [self.cursors_cache(), self.runs_cache()] {
            let keys = c
                .all_keys(&cache, records_prefix(&job).as_bytes(), JOB_KEYS_LISTED_MAX)
                .await
                .map_err(ServiceError::from_array)?;
            for k in keys {
                c.remove(&cache, &k).await.map_err(ServiceError::from_array)?;
            }
        }
        tracing::info!(event = "job.deleted", job = %id);
        self.wake.notify_waiters();
        Ok(())
    }

    /// Every lane's cursor of a job, with its record as stored.
    async fn cursors(&self, c: &ArrayClient, job: &Job) -> Result<Vec<(Cursor, Vec<u8>)>, ferrocotta::ClientError> {
        let cache = self.cursors_cache();
        let keys = c
            .all_keys(&cache, records_prefix(job).as_bytes(), JOB_KEYS_LISTED_MAX)
            .await?;
        let values = c.get_all(&cache, &keys).await?;
        Ok(values
            .into_iter()
            .flatten()
            .filter_map(|raw| Some((serde_json::from_slice(&raw).ok()?, raw)))
            .collect())
    }

    /// The run records of a job kept so far, oldest firing first.
    pub async fn runs(&self, id: &str) -> Result<Vec<Run>, ServiceError> {
        let c = self.client()?;
        let job = self.get(id).await?;
        let cache = self.runs_cache();
        let keys = c
            .all_keys(&cache, records_prefix(&job).as_bytes(), JOB_KEYS_LISTED_MAX)
            .await
            .map_err(ServiceError::from_array)?;
        let values = c.get_all(&cache, &keys).await.map_err(ServiceError::from_array)?;
        let mut runs: Vec<Run> = values
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .collect();
        runs.sort_by(|a, b| (a.firing_ms, &a.lane, a.seq).cmp(&(b.firing_ms, &b.lane, b.seq)));
        Ok(runs)
    }

    /// A job with its lanes: for `all` jobs one child per node (its last firing, how its last run
    /// ended, what runs now), and the parent status over them.
    pub async fn status(&self, id: &str) -> Result<serde_json::Value, ServiceError> {
        let c = self.client()?;
        let job = self.get(id).await?;
        let cursors = self.cursors(c, &job).await.map_err(ServiceError::from_array)?;
        let runs = self.runs(id).await?;
        let mut children = Vec::new();
        for (cursor, _) in &cursors {
            let last = runs.iter().filter(|r| r.lane == cursor.lane).max_by_key(|r| r.seq);
            children.push(serde_json::json!({
                "lane": cursor.lane,
                "last_firing_ms": cursor.last_ms,
                "running": cursor.running.len(),
                "last_run": last,
            }));
        }
        let status = if job.state != JobState::Active {
            serde_json::to_value(job.state).unwrap_or_default()
        } else if cursors.iter().any(|(cur, _)| !cur.running.is_empty()) {
            "running".into()
        } else {
            "waiting".into()
        };
        Ok(serde_json::json!({
            "job": job,
            "status": status,
            "next_firing_ms": job.next_after(self.estimated_array_ms()),
            "children": children,
        }))
    }

    /// Creates the jobs node.toml declares, each only if no job of its id exists.
    pub async fn declare(&self, specs: &[JobSpec]) {
        for spec in specs {
            let id = spec.id.clone().unwrap_or_default();
            match self.create(spec.clone(), false).await {
                Ok(_) => tracing::info!(event = "job.declared", job = %id),
                Err(e) if e.code == "conflict" && !e.message.contains("JOBS_MAX") => {
                    tracing::debug!(event = "job.declared_exists", job = %id)
                }
                Err(e) => tracing::error!(event = "job.declare_failed", job = %id, error = %e.message),
            }
        }
    }
}

/// The key of a job's definition.
fn def_key(id: &str) -> String {
    format!("{{{id}}}")
}

/// The prefix of a job's cursors and runs (of this creation of it).
fn records_prefix(job: &Job) -> String {
    format!("{{{}}}/{}/", job.id, job.uid)
}

fn cursor_key(job: &Job, lane: &str) -> Vec<u8> {
    format!("{}{lane}", records_prefix(job)).into_bytes()
}

fn run_key(job: &Job, lane: &str, seq: u64) -> Vec<u8> {
    format!("{}{lane}/{:03}", records_prefix(job), seq % RUNS_KEPT).into_bytes()
}

fn put(cache: String, key: Vec<u8>, value: Vec<u8>) -> Step {
    Step::Put {
        cache,
        key,
        value,
        expiry: Expiry::Never,
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}
