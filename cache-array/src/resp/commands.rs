//! The commands: arity checked from the table in [`super::cluster`], arguments parsed as Redis
//! parses them (its error texts included), then one array operation each. Commands that must be
//! atomic (`SET NX GET`, `MSETNX`, `INCR`, `GETEX`, ...) are one transaction (`Txn`), so they are
//! one log entry.

use ferrocotta::protocol::{
    check_cache_name, EntryInfo, Expiry, Guard, Op, ReadConsistency, ReadOp, Reply, Step, StepReply, Txn, WriteOp,
    KEYS_PAGE_MAX,
};

use super::cluster::spec_of;
use super::codec::Value;
use super::{noauth, Conn, RespService, DEFAULT_CACHE, SCAN_CURSORS_MAX};
use crate::stripe::now_ms;

/// A command's outcome: the reply, or the error reply.
type Outcome = Result<Value, Value>;

pub fn syntax_error() -> Value {
    Value::err("ERR syntax error")
}

pub fn not_an_integer() -> Value {
    Value::err("ERR value is not an integer or out of range")
}

/// An integer argument, as Redis reads one.
pub fn int_arg(arg: &[u8]) -> Result<i64, Value> {
    std::str::from_utf8(arg)
        .ok()
        .filter(|s| !s.starts_with('+') && !s.is_empty() && s.trim() == *s)
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(not_an_integer)
}

pub fn lower(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).to_ascii_lowercase()
}

/// The unknown-command error in Redis' own words.
fn unknown_command(args: &[Vec<u8>]) -> Value {
    let mut text = format!(
        "ERR unknown command '{}', with args beginning with: ",
        String::from_utf8_lossy(&args[0]).chars().take(128).collect::<String>()
    );
    for a in args.iter().skip(1).take(16) {
        text.push_str(&format!(
            "'{}' ",
            String::from_utf8_lossy(a).chars().take(128).collect::<String>()
        ));
    }
    Value::err(text)
}

/// The milliseconds an `EX`/`PX`/`EXAT`/`PXAT` argument names, as an expiry; `command` names the
/// command in the error.
fn expiry_arg(unit: &str, arg: &[u8], command: &str, allow_past: bool) -> Result<Expiry, Value> {
    let n = int_arg(arg)?;
    let invalid = || Value::err(format!("ERR invalid expire time in '{command}' command"));
    if n <= 0 && !allow_past {
        return Err(invalid());
    }
    let ms = match unit {
        "ex" | "exat" => n.checked_mul(1000).ok_or_else(invalid)?,
        _ => n,
    };
    Ok(match unit {
        "ex" | "px" if ms <= 0 => Expiry::AtMs(0),
        "ex" | "px" => {
            if (ms as u64).checked_add(now_ms()).is_none_or(|t| t > i64::MAX as u64) {
                return Err(invalid());
            }
            Expiry::AfterMs(ms as u64)
        }
        _ => Expiry::AtMs(ms.max(0) as u64),
    })
}

fn entry_of(results: &[StepReply], i: usize) -> Option<&EntryInfo> {
    match results.get(i) {
        Some(StepReply::Entry(e)) => e.as_ref(),
        _ => None,
    }
}

fn unexpected(reply: Reply) -> Value {
    Value::err(format!("ERR unexpected reply from the array: {reply:?}"))
}

fn unexpected_step(step: StepReply) -> Value {
    Value::err(format!("ERR unexpected step result from the array: {step:?}"))
}

/// The entry a step replaced or removed, as its value.
fn previous_value(step: StepReply) -> Outcome {
    match step {
        StepReply::Entry(e) => Ok(Value::bulk_or_null(e.map(|e| e.value))),
        other => Err(unexpected_step(other)),
    }
}

/// A write command turned into its one array operation: where it goes and how its reply reads.
pub struct Planned {
    pub op: WriteOp,
    /// The slot of its keys (for the redirect an error may become).
    pub slot: Option<u16>,
    pub finish: Box<dyn FnOnce(Reply) -> Outcome + Send>,
}

/// The runs a pipeline's commands form (see `RespService::run_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Writes,
    Reads,
}

/// Most reads of a pipeline served at once: their replies (each at most one value,
/// `limits.max_value_bytes`) are held together until written.
pub const READ_RUN_MAX: usize = 16;

/// Whether a command reads one key's entry (a pipeline's run of them is served at once). `MGET`
/// runs alone: its reply may be as large as a frame.
pub fn is_keyed_read(name: &str, args: &[Vec<u8>]) -> bool {
    match name {
        "get" | "exists" | "type" | "ttl" | "pttl" | "strlen" => args.len() == 2,
        "getex" => args.len() == 2,
        _ => false,
    }
}

/// Whether a command is a write that becomes one array operation (a pipeline's run of them is
/// proposed together; see `RespService::run_writes`).
pub fn is_planned_write(name: &str, args: &[Vec<u8>]) -> bool {
    match name {
        "set" | "setnx" | "setex" | "psetex" | "getset" | "getdel" | "del" | "unlink" | "expire" | "pexpire"
        | "expireat" | "pexpireat" | "persist" | "incr" | "decr" | "incrby" | "decrby" | "append" | "mset"
        | "msetnx" | "flushdb" | "flushall" => true,
        "getex" => args.len() > 2,
        _ => false,
    }
}

impl RespService {
    /// Runs one command; `true` when the connection closes after the reply.
    pub async fn command(&self, conn: &mut Conn, args: Vec<Vec<u8>>) -> (Value, bool) {
        let name = lower(&args[0]);
        if let Some(facts) = self.clients.lock().expect("clients lock").get_mut(&conn.id) {
            facts.last_command.clone_from(&name);
        }
        let Some(spec) = spec_of(&name) else {
            return (unknown_command(&args), false);
        };
        if !spec.accepts(args.len()) {
            return (
                Value::err(format!("ERR wrong number of arguments for '{name}' command")),
                false,
            );
        }
        let open = matches!(name.as_str(), "auth" | "hello" | "ping" | "quit" | "reset");
        if conn.grant.is_none() && !open {
            return (noauth(), false);
        }
        if name == "quit" {
            return (Value::ok(), true);
        }
        if is_planned_write(&name, &args) {
            // The connection sends writes through `run_writes` itself; this is the same, alone.
            let reply = self.run_writes(conn, vec![args]).await.pop();
            return (reply.unwrap_or_else(|| Value::err("ERR no reply")), false);
        }
        if is_keyed_read(&name, &args) {
            return (self.keyed_read(conn, &name, &args).await.unwrap_or_else(|e| e), false);
        }
        let outcome = match name.as_str() {
            "mget" => self.mget(conn, &args).await,
            "exists" => self.exists(conn, &args).await,
            "keys" => self.keys(conn, &args).await,
            "scan" => self.scan(conn, &args).await,
            "dbsize" => self.dbsize(conn).await,
            "select" => self.select(conn, &args),
            "ping" => Ok(match args.get(1) {
                None => Value::Simple("PONG".into()),
                Some(message) => Value::Bulk(message.clone()),
            }),
            "echo" => Ok(Value::Bulk(args[1].clone())),
            "wait" => self.wait(&args),
            "readonly" => {
                conn.readonly = true;
                Ok(Value::ok())
            }
            "readwrite" => {
                conn.readonly = false;
                Ok(Value::ok())
            }
            "asking" => Ok(Value::ok()),
            other => self.about(conn, other, &args).await,
        };
        (outcome.unwrap_or_else(|e| e), false)
    }

    /// Whether a command is a write that may join a run (authenticated, well-formed).
    pub fn plannable(&self, conn: &Conn, args: &[Vec<u8>]) -> bool {
        self.run_kind(conn, args) == Some(RunKind::Writes)
    }

    /// Which run of a pipeline a command may join: writes, keyed reads, or none (it runs alone).
    pub fn run_kind(&self, conn: &Conn, args: &[Vec<u8>]) -> Option<RunKind> {
        let name = lower(&args[0]);
        if conn.grant.is_none() || !spec_of(&name).is_some_and(|s| s.accepts(args.len())) {
            return None;
        }
        if is_planned_write(&name, args) {
            Some(RunKind::Writes)
        } else if is_keyed_read(&name, args) {
            Some(RunKind::Reads)
        } else {
            None
        }
    }

    /// A run of a pipeline's consecutive keyed reads (at most [`READ_RUN_MAX`]), served at once
    /// (their read-index rounds batch together); each reply in order. Reads change nothing, so
    /// their order among themselves does not matter, and every write before them has been
    /// applied.
    pub async fn run_reads(&self, conn: &Conn, run: Vec<Vec<Vec<u8>>>) -> Vec<Value> {
        let reads = run.iter().map(|args| async move {
            self.keyed_read(conn, &lower(&args[0]), args)
                .await
                .unwrap_or_else(|e| e)
        });
        futures::future::join_all(reads).await
    }

    /// The reads of one key: `GET`, `GETEX` without options, `EXISTS` and `TYPE` of one key,
    /// `TTL`, `PTTL`, `STRLEN`.
    async fn keyed_read(&self, conn: &Conn, name: &str, args: &[Vec<u8>]) -> Outcome {
        match name {
            "get" | "getex" => self.get(conn, args).await,
            "exists" => self.exists(conn, args).await,
            "type" => self.type_of(conn, args).await,
            "ttl" | "pttl" => self.ttl(conn, name, args).await,
            "strlen" => self.strlen(conn, args).await,
            other => Err(Value::err(format!("ERR {other} is not a read of keys"))),
        }
    }

    /// A run of a pipeline's consecutive writes: planned, proposed together in their order (see
    /// `Stripe::write_many`), so they share group commits instead of waiting for one commit each;
    /// each reply in order.
    pub async fn run_writes(&self, conn: &Conn, run: Vec<Vec<Vec<u8>>>) -> Vec<Value> {
        let Some(grant) = conn.grant.clone() else {
            return run.iter().map(|_| noauth()).collect();
        };
        let mut replies: Vec<Option<Value>> = Vec::with_capacity(run.len());
        let mut ops = Vec::new();
        let mut finishing = Vec::new();
        for args in &run {
            match self.plan(conn, &lower(&args[0]), args) {
                Ok(p) => {
                    ops.push(p.op);
                    finishing.push((replies.len(), p.slot, p.finish));
                    replies.push(None);
                }
                Err(e) => replies.push(Some(e)),
            }
        }
        if let Some(facts) = self.clients.lock().expect("clients lock").get_mut(&conn.id) {
            facts.last_command = lower(&run[run.len() - 1][0]);
        }
        let results = self.ops.handle_writes(ops, &grant, super::COMMAND_TIMEOUT).await;
        for ((i, slot, finish), result) in finishing.into_iter().zip(results) {
            replies[i] = Some(match result {
                Ok(reply) => finish(reply).unwrap_or_else(|e| e),
                Err(e) => self.error_value(e, slot),
            });
        }
        replies
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Value::err("ERR no reply from the array")))
            .collect()
    }

    /// A write command as its array operation.
    pub fn plan(&self, conn: &Conn, name: &str, args: &[Vec<u8>]) -> Result<Planned, Value> {
        match name {
            "set" => self.set(conn, args),
            "setnx" => self.setnx(conn, args),
            "setex" | "psetex" => self.setex(conn, name, args),
            "getset" => self.getset(conn, args),
            "getdel" => self.getdel(conn, args),
            "getex" => self.getex(conn, args),
            "del" | "unlink" => self.del(conn, args),
            "expire" | "pexpire" | "expireat" | "pexpireat" => self.expire(conn, name, args),
            "persist" => self.persist(conn, args),
            "incr" => self.incr(conn, &args[1], 1),
            "decr" => self.incr(conn, &args[1], -1),
            "incrby" => self.incr(conn, &args[1], int_arg(&args[2])?),
            "decrby" => match int_arg(&args[2])? {
                i64::MIN => Err(Value::err("ERR decrement would overflow")),
                d => self.incr(conn, &args[1], -d),
            },
            "append" => self.append(conn, args),
            "mset" => self.mset(conn, args),
            "msetnx" => self.msetnx(conn, args),
            "flushdb" | "flushall" => self.flushdb(conn, args),
            other => Err(Value::err(format!("ERR {other} is not a write"))),
        }
    }

    /// A transaction on the keys it names (all of one slot), its reply read by `finish`.
    fn txn(
        &self,
        conn: &Conn,
        keys: &[&[u8]],
        txn: Txn,
        finish: impl FnOnce(bool, Vec<StepReply>) -> Outcome + Send + 'static,
    ) -> Result<Planned, Value> {
        let (_, slot) = self.route(conn, keys, true)?;
        Ok(Planned {
            op: WriteOp::Txn(txn),
            slot,
            finish: Box::new(move |reply| match reply {
                Reply::Txn { succeeded, results } => finish(succeeded, results),
                other => Err(unexpected(other)),
            }),
        })
    }

    /// A read on keys of one slot.
    async fn read(&self, conn: &Conn, keys: &[&[u8]], op: impl FnOnce(ReadConsistency) -> Op) -> Outcome2 {
        let (consistency, slot) = self.route(conn, keys, false)?;
        self.exec(conn, op(consistency), slot).await
    }

    /// Entries of keys of one slot.
    async fn entries(&self, conn: &Conn, keys: &[Vec<u8>]) -> Result<Vec<Option<EntryInfo>>, Value> {
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let cache = conn.cache.clone();
        let keys = keys.to_vec();
        match self
            .read(conn, &refs, |c| Op::Read(ReadOp::Entries { cache, keys }, c))
            .await?
        {
            Reply::Entries(e) => Ok(e),
            other => Err(unexpected(other)),
        }
    }

    async fn get(&self, conn: &Conn, args: &[Vec<u8>]) -> Outcome {
        let (cache, key) = (conn.cache.clone(), args[1].clone());
        match self
            .read(conn, &[&args[1]], |c| Op::Read(ReadOp::Get { cache, key }, c))
            .await?
        {
            Reply::Value(v) => Ok(Value::bulk_or_null(v)),
            other => Err(unexpected(other)),
        }
    }

    fn set(&self, conn: &Conn, args: &[Vec<u8>]) -> Result<Planned, Value> {
        let (mut nx, mut xx, mut get) = (false, false, false);
        let mut expiry: Option<Expiry> = None;
        let mut i = 3;
        while i < args.len() {
            let opt = lower(&args[i]);
            match opt.as_str() {
                "nx" if !xx => nx = true,
                "xx" if !nx => xx = true,
                "get" => get = true,
                "keepttl" if expiry.is_none() => expiry = Some(Expiry::Keep),
                "ex" | "px" | "exat" | "pxat" if expiry.is_none() && i + 1 < args.len() => {
                    i += 1;
                    expiry = Some(expiry_arg(&opt, &args[i], "set", false)?);
                }
                _ => return Err(syntax_error()),
            }
            i += 1;
        }
        let (cache, key) = (conn.cache.clone(), args[1].clone());
        let guards = match (nx, xx) {
            (true, _) => vec![Guard::Absent {
                cache: cache.clone(),
                key: key.clone(),
            }],
            (_, true) => vec![Guard::Present {
                cache: cache.clone(),
                key: key.clone(),
            }],
            _ => Vec::new(),
        };
        let otherwise = if get {
            vec![Step::Get {
                cache: cache.clone(),
                key: key.clone(),
            }]
        } else {
            Vec::new()
        };
        let put = Step::Put {
            cache,
            key,
            value: args[2].clone(),
            expiry: expiry.unwrap_or(Expiry::Default),
        };
        let txn = Txn {
            guards,
            then: vec![put],
            otherwise,
        };
        self.txn(conn, &[&args[1]], txn, move |succeeded, results| {
            Ok(match (get, succeeded) {
                (true, _) => Value::bulk_or_null(entry_of(&results, 0).map(|e| e.value.clone())),
                (false, true) => Value::ok(),
                (false, false) => Value::Null,
            })
        })
    }

    /// `SETEX key seconds value`, `PSETEX key ms value`.
    fn setex(&self, conn: &Conn, name: &str, args: &[Vec<u8>]) -> Result<Planned, Value> {
        let unit = if name == "setex" { "ex" } else { "px" };
        let expiry = expiry_arg(unit, &args[2], name, false)?;
        let step = Step::Put {
            cache: conn.cache.clone(),
            key: args[1].clone(),
            value: args[3].clone(),
            expiry,
        };
        self.one_step(conn, &args[1], step, |_| Ok(Value::ok()))
    }

    fn setnx(&self, conn: &Conn, args: &[Vec<u8>]) -> Result<Planned, Value> {
        let (cache, key) = (conn.cache.clone(), args[1].clone());
        let txn = Txn {
            guards: vec![Guard::Absent {
                cache: cache.clone(),
                key: key.clone(),
            }],
            then: vec![Step::Put {
                cache,
                key,
                value: args[2].clone(),
                expiry: Expiry::Default,
            }],
            otherwise: Vec::new(),
        };
        self.txn(conn, &[&args[1]], txn, |succeeded, _| Ok(Value::Int(succeeded as i64)))
    }

    /// One step on one key, its result read by `finish`.
    fn one_step(
        &self,
        conn: &Conn,
        key: &[u8],
        step: Step,
        finish: impl FnOnce(StepReply) -> Outcome + Send + 'static,
    ) -> Result<Planned, Value> {
        let txn = Txn {
            then: vec![step],
            ..Txn::default()
        };
        self.txn(conn, &[key], txn, move |_, mut results| match results.pop() {
            Some(r) => finish(r),
            None => Err(Value::err("ERR the array returned no result")),
        })
    }

    fn getset(&self, conn: &Conn, args: &[Vec<u8>]) -> Result<Planned, Value> {
        let step = Step::Put {
            cache: conn.cache.clone(),
            key: args[1].clone(),
            value: args[2].clone(),
            expiry: Expiry::Default,
        };
        self.one_step(conn, &args[1], step, previous_value)
    }

    fn getdel(&self, conn: &Conn, args: &[Vec<u8>]) -> Result<Planned, Value> {
        let step = Step::Remove {
            cache: conn.cache.clone(),
            key: args[1].clone(),
        };
        self.one_step(conn, &args[1], step, previous_value)
    }

    /// `GETEX` with an option (without one it is a `GET`).
    fn getex(&self, conn: &Conn, args: &[Vec<u8>]) -> Result<Planned, Value> {
        let mut expiry = None;
        let mut i = 2;
        while i < args.len() {
            let opt = lower(&args[i]);
            match opt.as_str() {
                "persist" if expiry.is_none() => expiry = Some(Expiry::Never),
                "ex" | "px" | "exat" | "pxat" if expiry.is_none() && i + 1 < args.len() => {
                    i += 1;
                    expiry = Some(expiry_arg(&opt, &args[i], "getex", false)?);
                }
                _ => return Err(syntax_error()),
            }
            i += 1;
        }
        let expiry = expiry.ok_or_else(syntax_error)?;
        let (cache, key) = (conn.cache.clone(), args[1].clone());
        let txn = Txn {
            then: vec![
                Step::Get {
                    cache: cache.clone(),
                    key: key.clone(),
                },
                Step::SetExpiry { cache, key, expiry },
            ],
            ..Txn::default()
        };
        self.txn(conn, &[&args[1]], txn, |_, results| {
            Ok(Value::bulk_or_null(entry_of(&results, 0).map(|e| e.value.clone())))
        })
    }

    fn del(&self, conn: &Conn, args: &[Vec<u8>]) -> Result<Planned, Value> {
        let keys: Vec<&[u8]> = args[1..].iter().map(Vec::as_slice).collect();
        let steps = args[1..]
            .iter()
            .map(|k| Step::Remove {
                cache: conn.cache.clone(),
                key: k.clone(),
            })
            .collect();
        let txn = Txn {
            then: steps,
            ..Txn::default()
        };
        self.txn(conn, &keys, txn, |_, results| {
            let removed = results
                .iter()
                .filter(|r| matches!(r, StepReply::Entry(Some(_))))
                .count();
            Ok(Value::Int(removed as i64))
        })
    }

    fn expire(&self, conn: &Conn, name: &str, args: &[Vec<u8>]) -> Result<Planned, Value> {
        let unit = match name {
            "expire" => "ex",
            "pexpire" => "px",
            "expireat" => "exat",
            _ => "pxat",
        };
        let expiry = expiry_arg(unit, &args[2], name, true)?;
        if let Some(opt) = args.get(3) {
            return Err(match lower(opt).as_str() {
                "nx" | "xx" | "gt" | "lt" => Value::err(format!(
                    "ERR {} {} is not supported by ferrocotta (docs/redis.md)",
                    name.to_uppercase(),
                    lower(opt).to_uppercase()
                )),
                _ => Value::err(format!("ERR Unsupported option {}", String::from_utf8_lossy(opt))),
            });
        }
        let step = Step::SetExpiry {
            cache: conn.cache.clone(),
            key: args[1].clone(),
            expiry,
        };
        self.one_step(conn, &args[1], step, |r| match r {
            StepReply::Bool(b) => Ok(Value::Int(b as i64)),
            other => Err(unexpected_step(other)),
        })
    }

    fn persist(&self, conn: &Conn, args: &[Vec<u8>]) -> Result<Planned, Value> {
        let (cache, key) = (conn.cache.clone(), args[1].clone());
        let txn = Txn {
            then: vec![
                Step::Get {
                    cache: cache.clone(),
                    key: key.clone(),
                },
                Step::SetExpiry {
                    cache,
                    key,
                    expiry: Expiry::Never,
                },
            ],
            ..Txn::default()
        };
        self.txn(conn, &[&args[1]], txn, |_, results| {
            let had_expiry = entry_of(&results, 0).is_some_and(|e| e.expires_at_ms.is_some());
            Ok(Value::Int(had_expiry as i64))
        })
    }

    fn incr(&self, conn: &Conn, key: &[u8], delta: i64) -> Result<Planned, Value> {
        let step = Step::Increment {
            cache: conn.cache.clone(),
            key: key.to_vec(),
            delta,
        };
        self.one_step(conn, key, step, |r| match r {
            StepReply::Counter(n) => Ok(Value::Int(n)),
            other => Err(unexpected_step(other)),
        })
    }

    fn append(&self, conn: &Conn, args: &[Vec<u8>]) -> Result<Planned, Value> {
        let step = Step::Append {
            cache: conn.cache.clone(),
            key: args[1].clone(),
            value: args[2].clone(),
        };
        self.one_step(conn, &args[1], step, |r| match r {
            StepReply::Length(n) => Ok(Value::Int(n as i64)),
            other => Err(unexpected_step(other)),
        })
    }

    fn mset(&self, conn: &Conn, args: &[Vec<u8>]) -> Result<Planned, Value> {
        let pairs = self.pairs("mset", args)?;
        let keys: Vec<&[u8]> = pairs.iter().map(|p| p.0).collect();
        let steps = pairs
            .iter()
            .map(|(k, v)| Step::Put {
                cache: conn.cache.clone(),
                key: k.to_vec(),
                value: v.to_vec(),
                expiry: Expiry::Default,
            })
            .collect();
        let txn = Txn {
            then: steps,
            ..Txn::default()
        };
        self.txn(conn, &keys, txn, |_, _| Ok(Value::ok()))
    }

    fn msetnx(&self, conn: &Conn, args: &[Vec<u8>]) -> Result<Planned, Value> {
        let pairs = self.pairs("msetnx", args)?;
        let keys: Vec<&[u8]> = pairs.iter().map(|p| p.0).collect();
        let cache = &conn.cache;
        let txn = Txn {
            guards: pairs
                .iter()
                .map(|(k, _)| Guard::Absent {
                    cache: cache.clone(),
                    key: k.to_vec(),
                })
                .collect(),
            then: pairs
                .iter()
                .map(|(k, v)| Step::Put {
                    cache: cache.clone(),
                    key: k.to_vec(),
                    value: v.to_vec(),
                    expiry: Expiry::Default,
                })
                .collect(),
            otherwise: Vec::new(),
        };
        self.txn(conn, &keys, txn, |succeeded, _| Ok(Value::Int(succeeded as i64)))
    }

    fn flushdb(&self, conn: &Conn, args: &[Vec<u8>]) -> Result<Planned, Value> {
        if let Some(mode) = args.get(1) {
            if !matches!(lower(mode).as_str(), "sync" | "async") || args.len() > 2 {
                return Err(syntax_error());
            }
        }
        self.route(conn, &[], true)?;
        Ok(Planned {
            op: WriteOp::Clear {
                cache: conn.cache.clone(),
            },
            slot: None,
            finish: Box::new(|_| Ok(Value::ok())),
        })
    }

    async fn exists(&self, conn: &Conn, args: &[Vec<u8>]) -> Outcome {
        let found = self.entries(conn, &args[1..]).await?;
        Ok(Value::Int(found.iter().filter(|e| e.is_some()).count() as i64))
    }

    async fn type_of(&self, conn: &Conn, args: &[Vec<u8>]) -> Outcome {
        let found = self.entries(conn, &args[1..2]).await?;
        let kind = if found.first().is_some_and(|e| e.is_some()) {
            "string"
        } else {
            "none"
        };
        Ok(Value::Simple(kind.into()))
    }

    async fn ttl(&self, conn: &Conn, name: &str, args: &[Vec<u8>]) -> Outcome {
        let found = self.entries(conn, &args[1..2]).await?;
        Ok(Value::Int(match found.into_iter().next().flatten() {
            None => -2,
            Some(EntryInfo {
                expires_at_ms: None, ..
            }) => -1,
            Some(EntryInfo {
                expires_at_ms: Some(at),
                ..
            }) => {
                // Clamped: an expiry set through the native API may lie beyond what i64 holds.
                let left = at.saturating_sub(now_ms()).min(i64::MAX as u64 - 500);
                if name == "ttl" {
                    (left + 500) as i64 / 1000
                } else {
                    left as i64
                }
            }
        }))
    }

    async fn strlen(&self, conn: &Conn, args: &[Vec<u8>]) -> Outcome {
        match self.get(conn, args).await? {
            Value::Bulk(b) => Ok(Value::Int(b.len() as i64)),
            _ => Ok(Value::Int(0)),
        }
    }

    async fn mget(&self, conn: &Conn, args: &[Vec<u8>]) -> Outcome {
        let refs: Vec<&[u8]> = args[1..].iter().map(Vec::as_slice).collect();
        let (cache, keys) = (conn.cache.clone(), args[1..].to_vec());
        match self
            .read(conn, &refs, |c| Op::Read(ReadOp::GetAll { cache, keys }, c))
            .await?
        {
            Reply::Values(vs) => Ok(Value::Array(vs.into_iter().map(Value::bulk_or_null).collect())),
            other => Err(unexpected(other)),
        }
    }

    /// The pairs of `MSET`/`MSETNX`, or the arity error.
    fn pairs<'a>(&self, name: &str, args: &'a [Vec<u8>]) -> Result<Pairs<'a>, Value> {
        if args.len().is_multiple_of(2) {
            return Err(Value::err(format!(
                "ERR wrong number of arguments for '{name}' command"
            )));
        }
        Ok(args[1..]
            .chunks(2)
            .map(|p| (p[0].as_slice(), p[1].as_slice()))
            .collect())
    }

    /// One page of this stripe's keys after `after` with `prefix`: the keys and whether more follow.
    async fn key_page(
        &self,
        conn: &Conn,
        prefix: &[u8],
        after: Option<Vec<u8>>,
        limit: u32,
    ) -> Result<(Vec<Vec<u8>>, bool), Value> {
        let cache = conn.cache.clone();
        let prefix = prefix.to_vec();
        let op = |c| {
            Op::Read(
                ReadOp::Keys {
                    cache,
                    prefix,
                    after,
                    limit,
                },
                c,
            )
        };
        match self.read(conn, &[], op).await? {
            Reply::Keys { keys, more } => Ok((keys, more)),
            other => Err(unexpected(other)),
        }
    }

    async fn keys(&self, conn: &Conn, args: &[Vec<u8>]) -> Outcome {
        let pattern = &args[1];
        let prefix = literal_prefix(pattern);
        let budget = self.topology.config().limits.max_reply_payload_bytes();
        let (mut found, mut bytes, mut after) = (Vec::new(), 0usize, None);
        loop {
            let (page, more) = self.key_page(conn, &prefix, after.take(), KEYS_PAGE_MAX).await?;
            after = page.last().cloned();
            for key in page.into_iter().filter(|k| glob_match(pattern, k)) {
                bytes += key.len() + 16;
                if bytes > budget {
                    return Err(Value::err(format!(
                        "ERR KEYS would reply more than {budget} bytes; use SCAN"
                    )));
                }
                found.push(Value::Bulk(key));
            }
            if !more {
                return Ok(Value::Array(found));
            }
        }
    }

    async fn scan(&self, conn: &mut Conn, args: &[Vec<u8>]) -> Outcome {
        let cursor: u64 = std::str::from_utf8(&args[1])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Value::err("ERR invalid cursor"))?;
        let (mut pattern, mut count, mut only_strings) = (None, 10i64, true);
        let mut i = 2;
        while i < args.len() {
            let value = args.get(i + 1).ok_or_else(syntax_error)?;
            match lower(&args[i]).as_str() {
                "match" => pattern = Some(value.clone()),
                "count" => {
                    count = int_arg(value)?;
                    if count < 1 {
                        return Err(syntax_error());
                    }
                }
                "type" => only_strings = lower(value) == "string",
                _ => return Err(syntax_error()),
            }
            i += 2;
        }
        let after = match cursor {
            0 => None,
            c => match conn.scans.iter().find(|(id, _)| *id == c) {
                Some((_, key)) => Some(key.clone()),
                None => return Err(Value::err("ERR invalid cursor")),
            },
        };
        let prefix = pattern.as_deref().map(literal_prefix).unwrap_or_default();
        let limit = count.clamp(1, KEYS_PAGE_MAX as i64) as u32;
        let (page, more) = self.key_page(conn, &prefix, after, limit).await?;
        let next = match (more, page.last()) {
            (true, Some(last)) => {
                let id = conn.next_scan;
                conn.next_scan += 1;
                if conn.scans.len() >= SCAN_CURSORS_MAX {
                    conn.scans.pop_front();
                }
                conn.scans.push_back((id, last.clone()));
                id
            }
            _ => 0,
        };
        let keys = page
            .into_iter()
            .filter(|k| only_strings && pattern.as_ref().is_none_or(|p| glob_match(p, k)))
            .map(Value::Bulk)
            .collect();
        Ok(Value::Array(vec![Value::text(next.to_string()), Value::Array(keys)]))
    }

    async fn dbsize(&self, conn: &Conn) -> Outcome {
        let cache = conn.cache.clone();
        match self.read(conn, &[], |c| Op::Read(ReadOp::Size { cache }, c)).await? {
            Reply::Size(n) => Ok(Value::Int(n as i64)),
            other => Err(unexpected(other)),
        }
    }

    fn select(&self, conn: &mut Conn, args: &[Vec<u8>]) -> Outcome {
        let arg = String::from_utf8(args[1].clone()).map_err(|_| Value::err("ERR invalid cache name"))?;
        let cache = match arg.parse::<u64>() {
            Ok(0) => DEFAULT_CACHE.to_string(),
            Ok(n) => format!("{DEFAULT_CACHE}{n}"),
            Err(_) => arg,
        };
        check_cache_name(&cache).map_err(|e| Value::err(format!("ERR {e}")))?;
        if let Some(facts) = self.clients.lock().expect("clients lock").get_mut(&conn.id) {
            facts.cache.clone_from(&cache);
        }
        conn.cache = cache;
        Ok(Value::ok())
    }

    /// `WAIT`: a write is acknowledged only once a majority of its stripe has it, so at once the
    /// answer is the mirrors a majority holds.
    fn wait(&self, args: &[Vec<u8>]) -> Outcome {
        int_arg(&args[1])?;
        if int_arg(&args[2])? < 0 {
            return Err(Value::err("ERR timeout is negative"));
        }
        let servers = self.topology.config().stripes[self.ops.stripe.position().stripe]
            .servers
            .len();
        Ok(Value::Int((servers / 2) as i64))
    }
}

type Outcome2 = Result<Reply, Value>;

/// Keys and values of `MSET`.
type Pairs<'a> = Vec<(&'a [u8], &'a [u8])>;

/// The bytes a glob pattern's matches must start with (up to its first special character).
fn literal_prefix(pattern: &[u8]) -> Vec<u8> {
    pattern
        .iter()
        .take_while(|b| !matches!(b, b'*' | b'?' | b'[' | b'\\'))
        .copied()
        .collect()
}

/// Redis' glob: `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\x`.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after a `*`: the pattern after it and the text position it has eaten to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, t));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => class(pattern, p, text[t]),
            Some(b'\\') if p + 1 < pattern.len() => (pattern[p + 1] == text[t]).then_some(p + 2),
            Some(&c) => (c == text[t]).then_some(p + 1),
            None => None,
        };
        match (step, star) {
            (Some(next), _) => {
                p = next;
                t += 1;
            }
            (None, Some((sp, st))) => {
                p = sp;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            (None, None) => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&b| b == b'*')
}

/// A `[...]` class at `p` against one byte: the pattern position after the class when it
/// matches.
fn class(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    let mut i = p + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    loop {
        match pattern.get(i) {
            None => break,
            Some(b']') => {
                i += 1;
                break;
            }
            Some(b'\\') if i + 1 < pattern.len() => {
                matched |= pattern[i + 1] == c;
                i += 2;
            }
            Some(&lo) if pattern.get(i + 1) == Some(&b'-') && i + 2 < pattern.len() && pattern[i + 2] != b']' => {
                let hi = pattern[i + 2];
                let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                matched |= (lo..=hi).contains(&c);
                i += 3;
            }
            Some(&x) => {
                matched |= x == c;
                i += 1;
            }
        }
    }
    (matched != negate).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_in_redis() {
        let yes = [
            ("*", "anything"),
            ("h?llo", "hello"),
            ("h*llo", "heeeello"),
            ("h[ae]llo", "hallo"),
            ("h[^e]llo", "hallo"),
            ("h[a-b]llo", "hbllo"),
            ("user:*:name", "user:42:name"),
            ("a\\*b", "a*b"),
            ("*x", "xxx"),
        ];
        for (p, t) in yes {
            assert!(glob_match(p.as_bytes(), t.as_bytes()), "{p} should match {t}");
        }
        let no = [
            ("h?llo", "hllo"),
            ("h[ae]llo", "hillo"),
            ("h[^e]llo", "hello"),
            ("user:*:name", "user:42:age"),
            ("a\\*b", "axb"),
            ("abc", "abcd"),
        ];
        for (p, t) in no {
            assert!(!glob_match(p.as_bytes(), t.as_bytes()), "{p} should not match {t}");
        }
        assert_eq!(literal_prefix(b"user:*"), b"user:");
    }

    #[test]
    fn integer_arguments_are_strict() {
        assert_eq!(int_arg(b"-5"), Ok(-5));
        for bad in [&b"+5"[..], b" 5", b"5.0", b"", b"99999999999999999999"] {
            assert!(int_arg(bad).is_err());
        }
    }
}
