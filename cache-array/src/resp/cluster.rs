//! What clients ask about the server and the cluster: the command table (`COMMAND`), `HELLO`,
//! `AUTH`, `RESET`, `CLIENT`, `INFO` and `CLUSTER`. The array presents itself as a Redis Cluster:
//! each stripe is a shard, its active the master and its mirrors the replicas, with the stripe's
//! slot range; node ids are derived from the array and server names (`topology::node_id`).

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use ferrocotta::protocol::{Role, SOFTWARE_VERSION};
use ferrocotta::security::Grant;
use ferrocotta::slots::slot_of_key;

use super::codec::Value;
use super::commands::{int_arg, syntax_error};
use super::topology::node_id;
use super::{Conn, RespService, DEFAULT_CACHE, REDIS_VERSION};

/// One command as `COMMAND` describes it (Redis' arity, flags and key positions).
pub struct Spec {
    pub name: &'static str,
    /// Exact argument count (the name included) when positive, the least when negative.
    pub arity: i64,
    pub flags: &'static [&'static str],
    pub first_key: i64,
    pub last_key: i64,
    pub step: i64,
}

const fn spec(name: &'static str, arity: i64, flags: &'static [&'static str], keys: (i64, i64, i64)) -> Spec {
    Spec {
        name,
        arity,
        flags,
        first_key: keys.0,
        last_key: keys.1,
        step: keys.2,
    }
}

const W: &[&str] = &["write"];
const R: &[&str] = &["readonly", "fast"];
const C: &[&str] = &["fast"];
const NOAUTH: &[&str] = &["noauth", "fast"];
const ONE: (i64, i64, i64) = (1, 1, 1);
const ALL: (i64, i64, i64) = (1, -1, 1);
const NONE: (i64, i64, i64) = (0, 0, 0);

/// Every supported command.
pub const COMMANDS: &[Spec] = &[
    spec("get", 2, R, ONE),
    spec("set", -3, W, ONE),
    spec("setnx", 3, W, ONE),
    spec("setex", 4, W, ONE),
    spec("psetex", 4, W, ONE),
    spec("getset", 3, W, ONE),
    spec("getdel", 2, W, ONE),
    spec("getex", -2, W, ONE),
    spec("del", -2, W, ALL),
    spec("unlink", -2, W, ALL),
    spec("exists", -2, R, ALL),
    spec("type", 2, R, ONE),
    spec("expire", -3, W, ONE),
    spec("pexpire", -3, W, ONE),
    spec("expireat", -3, W, ONE),
    spec("pexpireat", -3, W, ONE),
    spec("ttl", 2, R, ONE),
    spec("pttl", 2, R, ONE),
    spec("persist", 2, W, ONE),
    spec("incr", 2, W, ONE),
    spec("decr", 2, W, ONE),
    spec("incrby", 3, W, ONE),
    spec("decrby", 3, W, ONE),
    spec("append", 3, W, ONE),
    spec("strlen", 2, R, ONE),
    spec("mget", -2, R, ALL),
    spec("mset", -3, W, (1, -1, 2)),
    spec("msetnx", -3, W, (1, -1, 2)),
    spec("keys", 2, &["readonly"], NONE),
    spec("scan", -2, &["readonly"], NONE),
    spec("dbsize", 1, R, NONE),
    spec("flushdb", -1, W, NONE),
    spec("flushall", -1, W, NONE),
    spec("select", 2, C, NONE),
    spec("ping", -1, NOAUTH, NONE),
    spec("echo", 2, C, NONE),
    spec("wait", 3, &[], NONE),
    spec("readonly", 1, C, NONE),
    spec("readwrite", 1, C, NONE),
    spec("asking", 1, C, NONE),
    spec("auth", -2, NOAUTH, NONE),
    spec("hello", -1, NOAUTH, NONE),
    spec("quit", -1, NOAUTH, NONE),
    spec("reset", 1, NOAUTH, NONE),
    spec("client", -2, &[], NONE),
    spec("info", -1, &[], NONE),
    spec("command", -1, &[], NONE),
    spec("cluster", -2, &[], NONE),
];

impl Spec {
    /// Whether `count` arguments (the name included) fit its arity.
    pub fn accepts(&self, count: usize) -> bool {
        let n = count as i64;
        if self.arity > 0 {
            n == self.arity
        } else {
            n >= -self.arity
        }
    }
}

/// The spec of a command by its lower-case name.
pub fn spec_of(name: &str) -> Option<&'static Spec> {
    COMMANDS.iter().find(|s| s.name == name)
}

fn command_info(s: &Spec) -> Value {
    Value::Array(vec![
        Value::text(s.name),
        Value::Int(s.arity),
        Value::Array(s.flags.iter().map(|f| Value::Simple(f.to_string())).collect()),
        Value::Int(s.first_key),
        Value::Int(s.last_key),
        Value::Int(s.step),
        Value::Array(Vec::new()),
        Value::Array(Vec::new()),
        Value::Array(Vec::new()),
        Value::Array(Vec::new()),
    ])
}

fn lower(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).to_ascii_lowercase()
}

fn unknown_subcommand(command: &str, sub: &[u8]) -> Value {
    Value::err(format!(
        "ERR unknown subcommand '{}'. Try {} HELP.",
        String::from_utf8_lossy(sub),
        command.to_uppercase()
    ))
}

impl RespService {
    /// The commands about the connection, the server and the cluster.
    pub async fn about(&self, conn: &mut Conn, name: &str, args: &[Vec<u8>]) -> Result<Value, Value> {
        match name {
            "auth" => self.auth(conn, args),
            "hello" => self.hello(conn, args),
            "reset" => {
                conn.grant = self.initial_grant();
                conn.resp3 = false;
                conn.readonly = false;
                conn.cache = DEFAULT_CACHE.to_string();
                conn.scans.clear();
                if let Some(f) = self.clients.lock().expect("clients lock").get_mut(&conn.id) {
                    f.name.clear();
                    f.cache = DEFAULT_CACHE.to_string();
                    f.resp3 = false;
                }
                Ok(Value::Simple("RESET".into()))
            }
            "client" => self.client(conn, args),
            "info" => Ok(Value::Text(self.info(conn, &args[1..]))),
            "command" => Ok(self.command_command(args)),
            "cluster" => self.cluster(args),
            _ => Err(Value::err(format!("ERR unknown command '{name}'"))),
        }
    }

    fn auth(&self, conn: &mut Conn, args: &[Vec<u8>]) -> Result<Value, Value> {
        let (user, password) = match args.len() {
            2 => (None, &args[1]),
            3 => (Some(args[1].as_slice()), &args[2]),
            _ => return Err(syntax_error()),
        };
        let no_secrets =
            self.cluster_secret.is_empty() && self.credentials.read().expect("credentials lock").is_empty();
        if no_secrets {
            return Err(Value::err(
                "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            ));
        }
        match self.authenticate(user, password) {
            Some(grant) => {
                conn.grant = Some(Arc::new(grant));
                Ok(Value::ok())
            }
            None => Err(wrongpass()),
        }
    }

    fn hello(&self, conn: &mut Conn, args: &[Vec<u8>]) -> Result<Value, Value> {
        let mut resp3 = conn.resp3;
        if let Some(v) = args.get(1) {
            match int_arg(v) {
                Ok(2) => resp3 = false,
                Ok(3) => resp3 = true,
                Ok(_) => return Err(Value::err("NOPROTO unsupported protocol version")),
                Err(_) => return Err(Value::err("ERR Protocol version is not an integer or out of range")),
            }
        }
        // Every option is checked before AUTH takes effect: a HELLO refused for a bad option
        // leaves the connection as it was.
        let mut i = 2;
        let mut name = None;
        let mut auth = None;
        while i < args.len() {
            match lower(&args[i]).as_str() {
                "auth" if i + 2 < args.len() => {
                    auth = Some((&args[i + 1], &args[i + 2]));
                    i += 3;
                }
                "setname" if i + 1 < args.len() => {
                    name = Some(client_name(&args[i + 1])?);
                    i += 2;
                }
                _ => {
                    return Err(Value::err(format!(
                        "ERR Syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(&args[i])
                    )))
                }
            }
        }
        if let Some((user, password)) = auth {
            match self.authenticate(Some(user.as_slice()), password) {
                Some(grant) => conn.grant = Some(Arc::new(grant)),
                None => return Err(wrongpass()),
            }
        }
        if conn.grant.is_none() {
            return Err(Value::err(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
            ));
        }
        conn.resp3 = resp3;
        if let Some(f) = self.clients.lock().expect("clients lock").get_mut(&conn.id) {
            f.resp3 = resp3;
            if let Some(n) = name {
                f.name = n;
            }
        }
        let role = match self.ops.stripe.snapshot_metrics().role {
            Role::Active => "master",
            Role::Mirror => "replica",
        };
        Ok(Value::Map(vec![
            (Value::text("server"), Value::text("redis")),
            (Value::text("version"), Value::text(REDIS_VERSION)),
            (Value::text("proto"), Value::Int(if resp3 { 3 } else { 2 })),
            (Value::text("id"), Value::Int(conn.id as i64)),
            (Value::text("mode"), Value::text("cluster")),
            (Value::text("role"), Value::text(role)),
            (Value::text("modules"), Value::Array(Vec::new())),
        ]))
    }

    fn client(&self, conn: &mut Conn, args: &[Vec<u8>]) -> Result<Value, Value> {
        let sub = lower(&args[1]);
        let mut clients = self.clients.lock().expect("clients lock");
        match (sub.as_str(), args.len()) {
            ("id", 2) => Ok(Value::Int(conn.id as i64)),
            ("setname", 3) => {
                let name = client_name(&args[2])?;
                if let Some(f) = clients.get_mut(&conn.id) {
                    f.name = name;
                }
                Ok(Value::ok())
            }
            ("getname", 2) => Ok(match clients.get(&conn.id) {
                Some(f) if !f.name.is_empty() => Value::text(f.name.clone()),
                _ => Value::Null,
            }),
            ("setinfo", 4) => Ok(Value::ok()),
            // Every connection for the cluster secret; a named credential sees only its own, as
            // it sees only its own sessions.
            ("list", 2) => Ok(Value::Text(
                clients
                    .iter()
                    .filter(|(id, _)| **id == conn.id || matches!(conn.grant.as_deref(), Some(Grant::Full)))
                    .map(|(id, f)| client_line(*id, f) + "\n")
                    .collect(),
            )),
            ("info", 2) => Ok(Value::Text(
                clients
                    .get(&conn.id)
                    .map(|f| client_line(conn.id, f) + "\n")
                    .unwrap_or_default(),
            )),
            ("id" | "setname" | "getname" | "setinfo" | "list" | "info", _) => Err(Value::err(format!(
                "ERR wrong number of arguments for 'client|{sub}' command"
            ))),
            _ => Err(unknown_subcommand("client", &args[1])),
        }
    }

    fn info(&self, conn: &Conn, sections: &[Vec<u8>]) -> String {
        let wanted: Vec<String> = sections.iter().map(|s| lower(s)).collect();
        let all = wanted.is_empty()
            || wanted
                .iter()
                .any(|w| matches!(w.as_str(), "all" | "default" | "everything"));
        let want = |s: &str| all || wanted.iter().any(|w| w == s);
        let stripe = &self.ops.stripe;
        let m = stripe.snapshot_metrics();
        let config = self.topology.config();
        let me = config.server(stripe.position());
        let mut out = String::new();
        if want("server") {
            let _ = write!(
                out,
                "# Server\r\nredis_version:{REDIS_VERSION}\r\nferrocotta_version:{SOFTWARE_VERSION}\r\nredis_mode:cluster\r\nprocess_id:{}\r\nrun_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\nserver_name:{}\r\narray_name:{}\r\n\r\n",
                std::process::id(),
                node_id(config, &me.name),
                me.resp_port.unwrap_or(0),
                self.started.elapsed().as_secs(),
                me.name,
                config.array_name,
            );
        }
        if want("clients") {
            let _ = write!(
                out,
                "# Clients\r\nconnected_clients:{}\r\n\r\n",
                self.clients.lock().expect("clients lock").len()
            );
        }
        if want("replication") {
            let stripe_servers = &config.stripes[stripe.position().stripe].servers;
            let _ = write!(out, "# Replication\r\n");
            match m.role {
                Role::Active => {
                    let _ = write!(out, "role:master\r\nconnected_slaves:{}\r\n", stripe_servers.len() - 1);
                    for (i, s) in stripe_servers.iter().filter(|s| s.name != me.name).enumerate() {
                        let _ = write!(
                            out,
                            "slave{i}:ip={},port={},state=online,name={}\r\n",
                            s.host,
                            s.resp_port.unwrap_or(0),
                            s.name
                        );
                    }
                }
                Role::Mirror => {
                    let active = self.topology.active_of(stripe.position().stripe);
                    let _ = write!(
                        out,
                        "role:slave\r\nmaster_host:{}\r\nmaster_port:{}\r\nmaster_link_status:{}\r\n",
                        active.map(|a| a.host.as_str()).unwrap_or("?"),
                        active.and_then(|a| a.resp_port).unwrap_or(0),
                        if active.is_some() { "up" } else { "down" },
                    );
                }
            }
            let _ = write!(
                out,
                "stripe:{}\r\nraft_term:{}\r\nlast_log_index:{}\r\napplied_index:{}\r\n\r\n",
                config.stripes[stripe.position().stripe].name,
                m.term,
                m.last_log_index,
                m.applied_index
            );
        }
        // Only for a cache the connection may read; the count includes entries that expired and
        // are not yet removed (DBSIZE counts exactly).
        if want("keyspace") && conn.grant.as_deref().is_some_and(|g| g.may_read(&conn.cache)) {
            let keys = stripe
                .shared()
                .read(|d| d.store.caches.get(&conn.cache).map_or(0, |c| c.entries.len()));
            let _ = write!(out, "# Keyspace\r\n");
            if keys > 0 {
                let _ = write!(out, "db0:keys={keys},expires=0,avg_ttl=0,cache={}\r\n", conn.cache);
            }
            let _ = write!(out, "\r\n");
        }
        if want("stats") {
            let _ = write!(
                out,
                "# Stats\r\ntotal_connections_received:{}\r\n\r\n",
                self.next_id.load(Relaxed)
            );
        }
        if want("cluster") {
            let _ = write!(out, "# Cluster\r\ncluster_enabled:1\r\n\r\n");
        }
        out
    }

    fn command_command(&self, args: &[Vec<u8>]) -> Value {
        let Some(sub) = args.get(1).map(|s| lower(s)) else {
            return Value::Array(COMMANDS.iter().map(command_info).collect());
        };
        match sub.as_str() {
            "count" => Value::Int(COMMANDS.len() as i64),
            "info" => Value::Array(
                args[2..]
                    .iter()
                    .map(|n| spec_of(&lower(n)).map_or(Value::NullArray, command_info))
                    .collect(),
            ),
            "list" => Value::Array(COMMANDS.iter().map(|s| Value::text(s.name)).collect()),
            "docs" => Value::Map(Vec::new()),
            _ => unknown_subcommand("command", &args[1]),
        }
    }

    fn cluster(&self, args: &[Vec<u8>]) -> Result<Value, Value> {
        let config = self.topology.config();
        let stripes = config.stripes.len();
        let me = config.server(self.ops.stripe.position());
        match lower(&args[1]).as_str() {
            "myid" => Ok(Value::text(node_id(config, &me.name))),
            "keyslot" if args.len() == 3 => Ok(Value::Int(slot_of_key(&args[2]) as i64)),
            "info" => {
                let known = config.servers().count();
                let ok = (0..stripes).all(|s| self.topology.active_of(s).is_some());
                let m = self.ops.stripe.snapshot_metrics();
                Ok(Value::Text(format!(
                    "cluster_state:{}\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:{known}\r\ncluster_size:{stripes}\r\ncluster_current_epoch:{}\r\ncluster_my_epoch:{}\r\n",
                    if ok { "ok" } else { "fail" },
                    m.term,
                    m.term,
                )))
            }
            "slots" => Ok(Value::Array(
                (0..stripes)
                    .flat_map(|s| self.slot_ranges(s).into_iter().map(move |r| (s, r)))
                    .map(|(s, [start, end])| {
                        let mut row = vec![Value::Int(start as i64), Value::Int(end as i64 - 1)];
                        row.extend(self.shard_servers(s).into_iter().map(|(srv, _)| {
                            Value::Array(vec![
                                Value::text(srv.host.clone()),
                                Value::Int(srv.resp_port.unwrap_or(0) as i64),
                                Value::text(node_id(config, &srv.name)),
                            ])
                        }));
                        Value::Array(row)
                    })
                    .collect(),
            )),
            "shards" => Ok(Value::Array(
                (0..stripes)
                    .map(|s| {
                        let ranges = self.slot_ranges(s);
                        let nodes = self
                            .shard_servers(s)
                            .into_iter()
                            .map(|(srv, master)| {
                                Value::Map(vec![
                                    (Value::text("id"), Value::text(node_id(config, &srv.name))),
                                    (Value::text("port"), Value::Int(srv.resp_port.unwrap_or(0) as i64)),
                                    (Value::text("ip"), Value::text(srv.host.clone())),
                                    (Value::text("endpoint"), Value::text(srv.host.clone())),
                                    (
                                        Value::text("role"),
                                        Value::text(if master { "master" } else { "replica" }),
                                    ),
                                    (Value::text("replication-offset"), Value::Int(0)),
                                    (Value::text("health"), Value::text("online")),
                                ])
                            })
                            .collect();
                        Value::Map(vec![
                            (
                                Value::text("slots"),
                                Value::Array(
                                    ranges
                                        .iter()
                                        .flat_map(|r| [Value::Int(r[0] as i64), Value::Int(r[1] as i64 - 1)])
                                        .collect(),
                                ),
                            ),
                            (Value::text("nodes"), Value::Array(nodes)),
                        ])
                    })
                    .collect(),
            )),
            "nodes" => {
                let mut text = String::new();
                for s in 0..stripes {
                    let ranges: String = self
                        .slot_ranges(s)
                        .iter()
                        .map(|r| format!(" {}-{}", r[0], r[1] - 1))
                        .collect();
                    let servers = self.shard_servers(s);
                    let master_id = node_id(config, &servers[0].0.name);
                    for (srv, master) in servers {
                        let myself = if srv.name == me.name { "myself," } else { "" };
                        let (flags, of, slots) = if master {
                            ("master", "-".to_string(), ranges.clone())
                        } else {
                            ("slave", master_id.clone(), String::new())
                        };
                        let _ = writeln!(
                            text,
                            "{} {}:{}@{} {myself}{flags} {of} 0 0 {} connected{slots}",
                            node_id(config, &srv.name),
                            srv.host,
                            srv.resp_port.unwrap_or(0),
                            srv.group_port,
                            s + 1,
                        );
                    }
                }
                Ok(Value::Text(text))
            }
            _ => Err(unknown_subcommand("cluster", &args[1])),
        }
    }

    /// A stripe's servers, its active (or, not known, its first server) first as the master.
    /// A stripe's slot ranges by the live document (slots move between stripes): this server's
    /// own stripe as its roster says, the others as last heard of.
    fn slot_ranges(&self, stripe: usize) -> Vec<[u16; 2]> {
        let live = self.ops.stripe.roster().config();
        if stripe < live.stripes.len() {
            live.stripe_slots(stripe).ranges().to_vec()
        } else {
            Vec::new()
        }
    }

    fn shard_servers(&self, stripe: usize) -> Vec<(&ferrocotta::config::ServerConfig, bool)> {
        let master = self.topology.target_of(stripe);
        let config = self.topology.config();
        let mut out = vec![(master, true)];
        out.extend(
            config.stripes[stripe]
                .servers
                .iter()
                .filter(|s| s.name != master.name)
                .map(|s| (s, false)),
        );
        out
    }
}

fn wrongpass() -> Value {
    Value::err("WRONGPASS invalid username-password pair or user is disabled.")
}

/// A client name: no spaces, newlines or other special characters (as Redis requires).
fn client_name(arg: &[u8]) -> Result<String, Value> {
    if arg.len() > 256 || arg.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
        return Err(Value::err(
            "ERR Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    Ok(String::from_utf8_lossy(arg).into_owned())
}

fn client_line(id: u64, f: &super::ClientFacts) -> String {
    format!(
        "id={id} addr={} name={} age={} db=0 cache={} cmd={} resp={}",
        f.addr,
        f.name,
        f.connected.elapsed().as_secs(),
        f.cache,
        f.last_command,
        if f.resp3 { 3 } else { 2 }
    )
}
