//! The scheduler loop of one node: for each job it takes part in, it claims the due firings of its
//! lane and runs them, records missed and skipped ones, and declares in doubt the runs of nodes
//! whose array session ended.
//!
//! Which firing is due is decided from the array's time (read from the active of the job's stripe
//! just before the claim), never from this node's wall clock: the wall clock, corrected by the
//! last measured offset, only says how long to sleep. A claim is one transaction that replaces the
//! lane's cursor (compared with the value read) and writes the run record, so a firing is decided
//! once, by one node.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrocotta::client::ConnectionState;
use ferrocotta::protocol::{Guard, Txn};
use ferrocotta::{ArrayClient, ClientError};
use tokio_util::sync::CancellationToken;

use super::model::{self, Cursor, Job, JobState, MissedPolicy, Outcome, OverlapPolicy, Owner, Run, RunRef, Target};
use super::{cursor_key, put, run_key, Jobs};
use crate::members::Member;

/// How often the job list is read again (changes made through this node wake it at once).
pub const JOBS_REFRESH: Duration = Duration::from_secs(1);
/// How often a node looks for runs of dead nodes to declare in doubt.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// Longest sleep of the loop.
const SLEEP_MAX: Duration = Duration::from_secs(1);
/// Decisions (claims, missed and skipped records) per job and lane per pass.
const DECISIONS_PER_PASS: usize = 16;
/// How long a finished run keeps trying to record its outcome while the array is away.
const RECORD_PATIENCE: Duration = Duration::from_secs(600);

/// What to do with the next due firing of a lane.
enum Decision {
    /// Claim it and run it; `missed_before` firings before it did not run.
    Run { firing: u64, missed_before: u64 },
    /// Record a stretch of `count` missed firings ending at `firing`.
    Missed { firing: u64, count: u64 },
    /// Record it as skipped: the previous run still runs.
    Skipped { firing: u64 },
}

/// Runs the scheduler until `shutdown`.
pub async fn run_scheduler(jobs: Arc<Jobs>, shutdown: CancellationToken) {
    let Ok(client) = jobs.client() else { return };
    let client = client.clone();
    let mut list: Vec<Job> = Vec::new();
    let mut listed_at: Option<Instant> = None;
    let mut swept_at = Instant::now();
    let mut was_online = false;
    // The next firing each lane waits for (the array's time), so that a lane is looked at in the
    // array only when it is due: by (job id, uid, changed_ms, lane).
    let mut next_due: HashMap<(String, String, u64, String), u64> = HashMap::new();
    loop {
        let wake = jobs.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let mut sleep = SLEEP_MAX;
        if client.connection_state() == ConnectionState::Connected {
            if listed_at.is_none_or(|t| t.elapsed() >= JOBS_REFRESH) {
                match jobs.list().await {
                    Ok(l) => {
                        list = l;
                        listed_at = Some(Instant::now());
                        next_due.retain(|k, _| list.iter().any(|j| j.id == k.0 && j.uid == k.1 && j.changed_ms == k.2));
                    }
                    Err(e) => tracing::debug!(event = "job.list_failed", error = %e.message),
                }
            }
            let online = jobs.node.online.load(Ordering::Relaxed);
            if online && !was_online {
                // Firings of this node's own lanes that fell due before it served (stopped,
                // offline) are missed ones, whatever their lateness.
                match jobs.array_time(&client, b"jobs").await {
                    Ok(t) => {
                        jobs.serving_since.store(t, Ordering::Relaxed);
                        was_online = true;
                    }
                    Err(e) => tracing::debug!(event = "job.time_failed", error = %e),
                }
            } else {
                was_online = online;
            }
            for job in &list {
                if job.state != JobState::Active {
                    continue;
                }
                let Some(lane) = job.lane_for(&jobs.node.logical_name) else {
                    continue;
                };
                // Offline nodes take no part in `any` and `all` firings; `node` jobs are theirs.
                if !online && !matches!(job.target, Target::Node(_)) {
                    continue;
                }
                let key = (job.id.clone(), job.uid.clone(), job.changed_ms, lane.clone());
                let estimate = jobs.estimated_array_ms();
                if let Some(next) = next_due.get(&key).filter(|next| **next > estimate) {
                    sleep = sleep.min(Duration::from_millis(next - estimate));
                    continue;
                }
                match jobs.pass(&client, job, &lane).await {
                    Ok(Some(next)) => {
                        next_due.insert(key, next);
                        let wait = next.saturating_sub(jobs.estimated_array_ms());
                        sleep = sleep.min(Duration::from_millis(wait));
                    }
                    // Nothing left to fire: looked at again in a while (to mark it expired).
                    Ok(None) => {
                        next_due.insert(key, jobs.estimated_array_ms() + SLEEP_MAX.as_millis() as u64);
                    }
                    Err(e) => {
                        next_due.remove(&key);
                        tracing::debug!(event = "job.pass_failed", job = %job.id, error = %e)
                    }
                }
            }
            if swept_at.elapsed() >= SWEEP_INTERVAL {
                swept_at = Instant::now();
                if let Err(e) = jobs.sweep(&client, &list).await {
                    tracing::debug!(event = "job.sweep_failed", error = %e);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = &mut wake => {
                listed_at = None;
                next_due.clear();
            }
            _ = tokio::time::sleep(sleep.max(Duration::from_millis(1))) => {}
        }
    }
}

impl Jobs {
    /// This process as the owner of runs.
    fn me(&self) -> Owner {
        Owner::of(&self.node)
    }

    /// Whether the owner of a run still runs it: this process knows its own runs; another node's
    /// process is alive while its member entry (tied to its array session) is there.
    fn alive(&self, job: &Job, lane: &str, run: &RunRef, members: &[Member]) -> bool {
        if run.owner == self.me() {
            return self.in_flight.lock().expect("in-flight lock").contains(&(
                job.id.clone(),
                lane.to_string(),
                run.seq,
            ));
        }
        run.owner.listed(members)
    }

    /// Decides the due firings of one lane of a job (at most [`DECISIONS_PER_PASS`]); returns the
    /// next firing to wake for (the array's time).
    async fn pass(self: &Arc<Self>, c: &ArrayClient, job: &Job, lane: &str) -> Result<Option<u64>, ClientError> {
        let key = cursor_key(job, lane);
        let cursors = self.cursors_cache();
        let grace = self.node.settings.jobs_missed_after.as_millis() as u64;
        let mut members: Option<Vec<Member>> = None;
        for _ in 0..DECISIONS_PER_PASS {
            let raw = c.get(&cursors, &key).await?;
            let now = self.array_time(c, &key).await?;
            let stored: Option<Cursor> = raw.as_deref().and_then(|r| serde_json::from_slice(r).ok());
            let cursor = match stored {
                Some(cur) => cur,
                None if job.target == Target::All => {
                    // A node's lane of an `all` job starts at its first sight of the job: it gets
                    // the firings from then on.
                    let fresh = Cursor {
                        lane: lane.to_string(),
                        last_ms: now,
                        seq: 0,
                        running: Vec::new(),
                    };
                    let txn = Txn {
                        guards: vec![Guard::Absent {
                            cache: cursors.clone(),
                            key: key.clone(),
                        }],
                        then: vec![put(cursors.clone(), key.clone(), encode(&fresh))],
                        otherwise: Vec::new(),
                    };
                    c.txn(txn).await?;
                    continue;
                }
                None => Cursor {
                    lane: lane.to_string(),
                    last_ms: job.created_ms,
                    seq: 0,
                    running: Vec::new(),
                },
            };
            self.adopt_orphans(c, job, lane, &cursor).await?;
            let Some(first) = job.next_after(cursor.last_ms) else {
                self.expire_if_done(job, now, grace).await;
                return Ok(None);
            };
            if first > now {
                return Ok(Some(first));
            }
            // Only this node runs the firings of its `all` and `node` lanes: what fell due before
            // it served is missed. An `any` firing is missed only when nobody took it in time.
            let own_lane = job.target != Target::Any;
            let serving_since = self.serving_since.load(Ordering::Relaxed);
            let missed_upto = if own_lane && serving_since > 0 {
                now.saturating_sub(grace).max(serving_since.saturating_sub(1).min(now))
            } else {
                now.saturating_sub(grace)
            };
            let mut decision = if first <= missed_upto {
                let (count, last) = job.due(cursor.last_ms, missed_upto).unwrap_or((1, first));
                match job.missed {
                    MissedPolicy::Skip => Decision::Missed { firing: last, count },
                    MissedPolicy::RunOnce => Decision::Run {
                        firing: last,
                        missed_before: count - 1,
                    },
                }
            } else {
                Decision::Run {
                    firing: first,
                    missed_before: 0,
                }
            };
            if let Decision::Run { firing, .. } = decision {
                let busy = if cursor.running.is_empty() {
                    false
                } else if cursor.running.len() >= model::RUNNING_MAX {
                    true
                } else if job.overlap == OverlapPolicy::Skip {
                    if members.is_none() {
                        members = Some(crate::members::read_all(c, &self.node.settings.members_cache()).await?);
                    }
                    let m = members.as_deref().unwrap_or_default();
                    cursor.running.iter().any(|r| self.alive(job, lane, r, m))
                } else {
                    false
                };
                if busy {
                    decision = Decision::Skipped { firing };
                }
            }
            let (firing, missed_before, outcome) = match decision {
                Decision::Run { firing, missed_before } => (firing, missed_before, Outcome::Running),
                Decision::Missed { firing, count } => (firing, count - 1, Outcome::Missed),
                Decision::Skipped { firing } => (firing, 0, Outcome::SkippedOverlap),
            };
            let run = Run {
                job: job.id.clone(),
                lane: lane.to_string(),
                seq: cursor.seq,
                firing_ms: firing,
                missed_before,
                owner: self.me(),
                claimed_ms: now,
                ended_ms: (outcome != Outcome::Running).then_some(now),
                outcome,
                error: None,
                late_outcome: None,
            };
            let mut next = Cursor {
                lane: lane.to_string(),
                last_ms: firing,
                seq: cursor.seq + 1,
                running: cursor.running.clone(),
            };
            if outcome == Outcome::Running {
                next.running.push(RunRef {
                    seq: run.seq,
                    firing_ms: firing,
                    owner: self.me(),
                });
            }
            let guard = match &raw {
                Some(value) => Guard::ValueIs {
                    cache: cursors.clone(),
                    key: key.clone(),
                    value: value.clone(),
                },
                None => Guard::Absent {
                    cache: cursors.clone(),
                    key: key.clone(),
                },
            };
            let txn = Txn {
                guards: vec![guard],
                then: vec![
                    put(cursors.clone(), key.clone(), encode(&next)),
                    put(self.runs_cache(), run_key(job, lane, run.seq), encode(&run)),
                ],
                otherwise: Vec::new(),
            };
            if !c.txn(txn).await?.0 {
                self.metrics.claims_lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match outcome {
                Outcome::Running => {
                    self.in_flight
                        .lock()
                        .expect("in-flight lock")
                        .insert((job.id.clone(), lane.to_string(), run.seq));
                    self.metrics.observe_lateness(run.lateness_ms());
                    tracing::info!(
                        event = "job.run_started",
                        job = %job.id,
                        lane,
                        firing_ms = firing,
                        seq = run.seq,
                        lateness_ms = run.lateness_ms(),
                        missed_before,
                        node = %self.node.logical_name
                    );
                    let jobs = Arc::clone(self);
                    let (job, run) = (job.clone(), run.clone());
                    tokio::spawn(async move { jobs.execute(job, run).await });
                }
                Outcome::Missed => {
                    self.metrics.missed.fetch_add(missed_before + 1, Ordering::Relaxed);
                    tracing::warn!(event = "job.missed", job = %job.id, lane, count = missed_before + 1, last_firing_ms = firing);
                }
                _ => {
                    self.metrics.skipped_overlap.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(event = "job.skipped_overlap", job = %job.id, lane, firing_ms = firing);
                }
            }
        }
        Ok(Some(self.estimated_array_ms()))
    }

    /// Starts the runs the cursor says this process claimed but that it never started: the
    /// claim's transaction applied but its answer was lost (a cut, a failover), so this process
    /// took it for failed. The claim is this process's and no other node will run the firing, so
    /// running it now keeps it once.
    async fn adopt_orphans(
        self: &Arc<Self>,
        c: &ArrayClient,
        job: &Job,
        lane: &str,
        cursor: &Cursor,
    ) -> Result<(), ClientError> {
        let me = self.me();
        for r in cursor.running.iter().filter(|r| r.owner == me) {
            let id = (job.id.clone(), lane.to_string(), r.seq);
            if self.in_flight.lock().expect("in-flight lock").contains(&id)
                || self.abandoned.lock().expect("abandoned lock").contains(&id)
            {
                continue;
            }
            let Some(raw) = c.get(&self.runs_cache(), &run_key(job, lane, r.seq)).await? else {
                continue;
            };
            let Ok(run) = serde_json::from_slice::<Run>(&raw) else {
                continue;
            };
            if run.seq != r.seq || run.owner != me || run.outcome != Outcome::Running {
                continue;
            }
            if !self.in_flight.lock().expect("in-flight lock").insert(id) {
                continue;
            }
            tracing::info!(
                event = "job.run_started",
                job = %job.id,
                lane,
                firing_ms = run.firing_ms,
                seq = run.seq,
                lateness_ms = run.lateness_ms(),
                missed_before = run.missed_before,
                node = %self.node.logical_name,
                adopted = true
            );
            let jobs = Arc::clone(self);
            let job = job.clone();
            tokio::spawn(async move { jobs.execute(job, run).await });
        }
        Ok(())
    }

    /// Marks a job expired once its schedule has no firing left and the last one had its time to
    /// run everywhere.
    async fn expire_if_done(&self, job: &Job, now: u64, grace: u64) {
        if job.next_after(now.saturating_sub(grace.saturating_mul(2))).is_some() {
            return;
        }
        let result = self
            .change(&job.id, |old, _| {
                Ok((old.uid == job.uid && old.state == JobState::Active).then(|| {
                    let mut j = old.clone();
                    j.state = JobState::Expired;
                    j
                }))
            })
            .await;
        if let Err(e) = result {
            tracing::debug!(event = "job.expire_failed", job = %job.id, error = %e.message);
        }
    }

    /// Runs a claimed firing and records how it ended.
    async fn execute(self: Arc<Self>, job: Job, run: Run) {
        let started = Instant::now();
        let ssnid = crate::services::new_session_id();
        let result = self
            .registry
            .call(&self.node, &job.service, &ssnid, job.input.clone())
            .await;
        let (outcome, error) = match &result {
            Ok(_) => (Outcome::Ok, None),
            Err(e) => {
                self.metrics.run_errors.fetch_add(1, Ordering::Relaxed);
                (
                    Outcome::Error,
                    Some(model::short_error(&format!("{}: {}", e.code, e.message))),
                )
            }
        };
        self.metrics.runs.fetch_add(1, Ordering::Relaxed);
        let took = started.elapsed().as_millis() as u64;
        tracing::info!(
            event = "job.run_ended",
            job = %job.id,
            lane = %run.lane,
            firing_ms = run.firing_ms,
            outcome = ?outcome,
            took_ms = took
        );
        let deadline = Instant::now() + RECORD_PATIENCE;
        let Ok(c) = self.client() else { return };
        loop {
            match self.record_end(c, &job, &run, outcome, error.clone(), took).await {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(event = "job.record_retry", job = %job.id, error = %e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::error!(event = "job.record_failed", job = %job.id, firing_ms = run.firing_ms, error = %e);
                    // Never started again by this process; its own sweep declares it in doubt.
                    self.abandoned
                        .lock()
                        .expect("abandoned lock")
                        .insert((job.id.clone(), run.lane.clone(), run.seq));
                    break;
                }
            }
        }
        self.in_flight
            .lock()
            .expect("in-flight lock")
            .remove(&(job.id.clone(), run.lane.clone(), run.seq));
    }

    /// Writes a run's end into its record and takes it off its cursor's running list, in one
    /// transaction. A run declared in doubt meanwhile keeps that outcome, with how it really
    /// ended beside it.
    async fn record_end(
        &self,
        c: &ArrayClient,
        job: &Job,
        run: &Run,
        outcome: Outcome,
        error: Option<String>,
        took_ms: u64,
    ) -> Result<(), ClientError> {
        let ckey = cursor_key(job, &run.lane);
        let rkey = run_key(job, &run.lane, run.seq);
        let (cursors, runs) = (self.cursors_cache(), self.runs_cache());
        for _ in 0..super::CAS_ATTEMPTS {
            let craw = c.get(&cursors, &ckey).await?;
            let rraw = c.get(&runs, &rkey).await?;
            let stored: Option<Run> = rraw.as_deref().and_then(|r| serde_json::from_slice(r).ok());
            let Some(mut record) = stored.filter(|r| r.seq == run.seq && r.owner == run.owner) else {
                tracing::warn!(event = "job.record_gone", job = %job.id, firing_ms = run.firing_ms, "the run's record was overwritten or deleted");
                return Ok(());
            };
            match record.outcome {
                Outcome::Running => {
                    record.outcome = outcome;
                    record.error = error.clone();
                }
                Outcome::InDoubt => {
                    tracing::warn!(event = "job.finished_after_in_doubt", job = %job.id, firing_ms = run.firing_ms, outcome = ?outcome);
                    record.late_outcome = Some(outcome);
                    record.error = error.clone();
                }
                _ => return Ok(()),
            }
            record.ended_ms = Some(run.claimed_ms + took_ms);
            let mut guards = vec![Guard::ValueIs {
                cache: runs.clone(),
                key: rkey.clone(),
                value: rraw.clone().unwrap_or_default(),
            }];
            let mut then = vec![put(runs.clone(), rkey.clone(), encode(&record))];
            if let Some(craw) = craw {
                if let Ok(mut cursor) = serde_json::from_slice::<Cursor>(&craw) {
                    if cursor.running.iter().any(|r| r.seq == run.seq) {
                        cursor.running.retain(|r| r.seq != run.seq);
                        guards.push(Guard::ValueIs {
                            cache: cursors.clone(),
                            key: ckey.clone(),
                            value: craw,
                        });
                        then.push(put(cursors.clone(), ckey.clone(), encode(&cursor)));
                    }
                }
            }
            if c.txn(Txn {
                guards,
                then,
                otherwise: Vec::new(),
            })
            .await?
            .0
            {
                self.wake.notify_waiters();
                return Ok(());
            }
        }
        Err(ClientError::Invalid(
            "the run's records kept changing; giving up".into(),
        ))
    }

    /// Declares in doubt the runs whose node died or lost the array: their member entry (tied to
    /// their array session) is gone. Each is taken off its cursor and its record says `in_doubt`;
    /// nothing reruns it.
    async fn sweep(&self, c: &ArrayClient, list: &[Job]) -> Result<(), ClientError> {
        let mut members: Option<Vec<Member>> = None;
        for job in list {
            for (cursor, craw) in self.cursors(c, job).await? {
                if cursor.running.is_empty() {
                    continue;
                }
                if members.is_none() {
                    members = Some(crate::members::read_all(c, &self.node.settings.members_cache()).await?);
                }
                let m = members.as_deref().unwrap_or_default();
                let dead: Vec<RunRef> = cursor
                    .running
                    .iter()
                    .filter(|r| !self.alive(job, &cursor.lane, r, m))
                    .cloned()
                    .collect();
                if dead.is_empty() {
                    continue;
                }
                self.declare_in_doubt(c, job, &cursor, craw, &dead).await?;
            }
        }
        Ok(())
    }

    async fn declare_in_doubt(
        &self,
        c: &ArrayClient,
        job: &Job,
        cursor: &Cursor,
        craw: Vec<u8>,
        dead: &[RunRef],
    ) -> Result<(), ClientError> {
        let (cursors, runs) = (self.cursors_cache(), self.runs_cache());
        let ckey = cursor_key(job, &cursor.lane);
        let mut next = cursor.clone();
        next.running.retain(|r| !dead.contains(r));
        let mut guards = vec![Guard::ValueIs {
            cache: cursors.clone(),
            key: ckey.clone(),
            value: craw,
        }];
        let mut then = vec![put(cursors.clone(), ckey, encode(&next))];
        for r in dead {
            let rkey = run_key(job, &cursor.lane, r.seq);
            let Some(rraw) = c.get(&runs, &rkey).await? else {
                continue;
            };
            let Ok(mut record) = serde_json::from_slice::<Run>(&rraw) else {
                continue;
            };
            if record.seq != r.seq || record.outcome != Outcome::Running {
                continue;
            }
            record.outcome = Outcome::InDoubt;
            guards.push(Guard::ValueIs {
                cache: runs.clone(),
                key: rkey.clone(),
                value: rraw,
            });
            then.push(put(runs.clone(), rkey, encode(&record)));
        }
        if c.txn(Txn {
            guards,
            then,
            otherwise: Vec::new(),
        })
        .await?
        .0
        {
            for r in dead {
                self.metrics.in_doubt.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    event = "job.in_doubt",
                    job = %job.id,
                    lane = %cursor.lane,
                    firing_ms = r.firing_ms,
                    owner = %r.owner.node,
                    "the node running this firing died or lost the array; it is not rerun"
                );
            }
            self.wake.notify_waiters();
        }
        Ok(())
    }
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("job records always encode")
}
