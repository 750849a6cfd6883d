//! Test support: real `redis-server` processes for integration tests.
//!
//! Include from an integration test with `mod support;`. Nothing here is
//! mocked: [`RedisServer`] spawns a real `redis-server` on a free loopback
//! port with no persistence, and [`RedisCluster`] builds a real three-master
//! cluster with `redis-cli --cluster create`.
//!
//! Redis tests never skip: if `redis-server` (or `redis-cli`, for clusters)
//! is not on `PATH`, starting a server panics with a clear message.
//!
//! Only `std` is used. Talk to the servers with [`RedisServer::command`] (a
//! tiny RESP client over `TcpStream`) or with a real Redis client pointed at
//! [`RedisServer::url`].

#![allow(dead_code)]

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long a freshly spawned server gets to answer `PING`.
pub const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new cluster gets to report `cluster_state:ok` everywhere.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(15);
/// Default connect/read/write timeout of the raw RESP helper.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a start that fails (e.g. port stolen) is retried.
const START_ATTEMPTS: usize = 5;

const REDIS_SERVER: &str = "redis-server";
const REDIS_CLI: &str = "redis-cli";
const LOG_FILE: &str = "redis.log";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------
// RESP
// ---------------------------------------------------------------------------

/// A parsed RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Status(String),
    /// `-ERR ...` (the text without the leading `-`)
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$3\r\nfoo` or `$-1` (`None`)
    Bulk(Option<String>),
    /// `*2 ...` or `*-1` (`None`)
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// Renders the reply as text:
    /// status → its text (`"OK"`, `"PONG"`), error → `"-"` + message
    /// (`"-ERR unknown command ..."`), integer → decimal, bulk → its content,
    /// nil bulk or nil array → `"(nil)"`, array → the elements' texts joined
    /// by `"\n"` (nested arrays flattened).
    pub fn to_text(&self) -> String {
        match self {
            Reply::Status(s) => s.clone(),
            Reply::Error(e) => format!("-{e}"),
            Reply::Integer(i) => i.to_string(),
            Reply::Bulk(Some(s)) => s.clone(),
            Reply::Bulk(None) | Reply::Array(None) => "(nil)".to_owned(),
            Reply::Array(Some(items)) => items
                .iter()
                .map(Reply::to_text)
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    pub fn is_nil(&self) -> bool {
        matches!(self, Reply::Bulk(None) | Reply::Array(None))
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// Encodes `args` as a RESP array of bulk strings.
pub fn encode_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_line<R: BufRead>(r: &mut R) -> io::Result<String> {
    let mut buf = Vec::new();
    r.read_until(b'\n', &mut buf)?;
    if buf.is_empty() {
        return Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            "connection closed before a reply",
        ));
    }
    if !buf.ends_with(b"\r\n") {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("truncated RESP line: {:?}", String::from_utf8_lossy(&buf)),
        ));
    }
    buf.truncate(buf.len() - 2);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn parse_len(s: &str) -> io::Result<i64> {
    s.parse::<i64>().map_err(|_| {
        io::Error::new(
            ErrorKind::InvalidData,
            format!("bad RESP length/integer {s:?}"),
        )
    })
}

/// Reads one full RESP2 reply (recursively for arrays).
pub fn read_reply<R: BufRead>(r: &mut R) -> io::Result<Reply> {
    let line = read_line(r)?;
    let (kind, rest) = line.split_at(line.len().min(1));
    match kind {
        "+" => Ok(Reply::Status(rest.to_owned())),
        "-" => Ok(Reply::Error(rest.to_owned())),
        ":" => Ok(Reply::Integer(parse_len(rest)?)),
        "$" => {
            let len = parse_len(rest)?;
            if len < 0 {
                return Ok(Reply::Bulk(None));
            }
            let mut buf = vec![0u8; len as usize + 2];
            r.read_exact(&mut buf)?;
            buf.truncate(len as usize);
            Ok(Reply::Bulk(Some(
                String::from_utf8_lossy(&buf).into_owned(),
            )))
        }
        "*" => {
            let len = parse_len(rest)?;
            if len < 0 {
                return Ok(Reply::Array(None));
            }
            let mut items = Vec::with_capacity(len as usize);
            for _ in 0..len {
                items.push(read_reply(r)?);
            }
            Ok(Reply::Array(Some(items)))
        }
        _ => Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("unexpected RESP reply line {line:?}"),
        )),
    }
}

/// Sends one command to `addr` ("127.0.0.1:PORT") on a fresh connection and
/// reads its full reply. `timeout` bounds the connect, the write and each read.
pub fn resp_command(addr: &str, args: &[&str], timeout: Duration) -> io::Result<Reply> {
    let sock: SocketAddr = addr
        .parse()
        .map_err(|e| io::Error::new(ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
    let stream = TcpStream::connect_timeout(&sock, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    (&stream).write_all(&encode_command(args))?;
    let mut reader = BufReader::new(&stream);
    read_reply(&mut reader)
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A port that was free on 127.0.0.1 a moment ago (bind :0, read, drop).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct ports that were free a moment ago (all bound at once, then
/// released, so they differ from each other).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .expect("local_addr of a bound listener")
                .port()
        })
        .collect()
}

fn not_found_message(program: &str) -> String {
    format!(
        "{program} not found on PATH: install it (apt-get install redis-server); \
         Redis tests never skip"
    )
}

/// Panics with the clear message if `program` cannot be executed.
fn require_program(program: &str) {
    match Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => panic!("{}", not_found_message(program)),
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

fn fresh_dir(port: u16) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!(
        "battlement-redis-{}-{}-{}",
        std::process::id(),
        n,
        port
    ));
    // A stale directory from an earlier process with the same pid.
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", dir.display()));
    dir
}

fn read_log(dir: &Path) -> String {
    match fs::read_to_string(dir.join(LOG_FILE)) {
        Ok(s) if s.trim().is_empty() => "(redis log is empty)".to_owned(),
        Ok(s) => s,
        Err(e) => format!("(cannot read redis log: {e})"),
    }
}

fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn is_pong(addr: &str) -> bool {
    matches!(
        resp_command(addr, &["PING"], Duration::from_millis(500)),
        Ok(Reply::Status(s)) if s == "PONG"
    )
}

enum StartError {
    /// The process exited before answering PING (port taken, bad arg...).
    Exited(String),
    /// The process is alive but did not answer PING in time.
    Timeout(String),
}

// ---------------------------------------------------------------------------
// RedisServer
// ---------------------------------------------------------------------------

/// A real `redis-server` on a free loopback port, without persistence.
///
/// The process is killed and its temp dir removed on drop.
pub struct RedisServer {
    program: String,
    port: u16,
    /// `Some` for a cluster node: the cluster bus port (`--cluster-port`).
    bus_port: Option<u16>,
    extra_args: Vec<String>,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers PING.
    ///
    /// Panics if `redis-server` is not on PATH (tests never skip) or if it
    /// does not come up.
    pub fn start() -> RedisServer {
        Self::start_with_args(&[])
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments
    /// appended (e.g. `&["--maxmemory", "10mb"]`).
    pub fn start_with_args(extra_args: &[&str]) -> RedisServer {
        Self::start_program(REDIS_SERVER, extra_args)
    }

    /// Like [`start_with_args`](Self::start_with_args) with another program
    /// than `redis-server` (used to test the "not found" panic).
    pub fn start_program(program: &str, extra_args: &[&str]) -> RedisServer {
        Self::launch(program, extra_args, false)
    }

    /// Starts a cluster-enabled node (not yet part of any cluster), with `extra_args`.
    fn start_cluster_node(extra_args: &[String]) -> RedisServer {
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ];
        args.extend(extra_args.iter().map(String::as_str));
        Self::launch(REDIS_SERVER, &args, true)
    }

    fn launch(program: &str, extra_args: &[&str], cluster: bool) -> RedisServer {
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let (port, bus_port) = if cluster {
                // The default bus port (port + 10000) may be out of range or
                // taken, so pick one explicitly.
                let ports = free_ports(2);
                (ports[0], Some(ports[1]))
            } else {
                (free_port(), None)
            };
            let mut server = RedisServer {
                program: program.to_owned(),
                port,
                bus_port,
                extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
                dir: fresh_dir(port),
                child: Mutex::new(None),
            };
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(StartError::Exited(log)) => {
                    failures.push(format!(
                        "attempt {attempt} on port {port}: {program} exited early; log:\n{log}"
                    ));
                    // Drop removes the dir; retry with a new port.
                }
                Err(StartError::Timeout(log)) => panic!(
                    "{program} on port {port} did not answer PING within {START_TIMEOUT:?}; \
                     log ({}):\n{log}",
                    server.dir.join(LOG_FILE).display()
                ),
            }
        }
        panic!(
            "{program} failed to start after {START_ATTEMPTS} attempts:\n{}",
            failures.join("\n")
        );
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir.to_str().expect("temp dir path is UTF-8"),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--enable-debug-command",
            "yes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(bus) = self.bus_port {
            args.push("--cluster-port".into());
            args.push(bus.to_string());
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Spawns the process (port/dir already chosen) and waits for PING.
    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(LOG_FILE))
            .unwrap_or_else(|e| panic!("cannot open redis log in {}: {e}", self.dir.display()));
        let log_err = log.try_clone().expect("clone redis log file handle");
        let spawned = Command::new(&self.program)
            .args(self.args())
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                panic!("{}", not_found_message(&self.program))
            }
            Err(e) => panic!("cannot spawn {}: {e}", self.program),
        };

        let addr = self.addr();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(StartError::Exited(format!(
                        "(exit status {status})\n{}",
                        read_log(&self.dir)
                    )));
                }
                Ok(None) => {}
                Err(e) => panic!("try_wait on {}: {e}", self.program),
            }
            if is_pong(&addr) {
                *self.child.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                kill_child(&mut child);
                return Err(StartError::Timeout(read_log(&self.dir)));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The cluster bus port, for a cluster node.
    pub fn bus_port(&self) -> Option<u16> {
        self.bus_port
    }

    /// The server's temp dir (`--dir`), holding `redis.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    /// Whether the process is alive (it may still be paused).
    pub fn is_running(&self) -> bool {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process (SIGKILL) and waits for it. No-op when stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self
            .child
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            kill_child(&mut child);
        }
    }

    /// Starts the server again on the SAME port (stopping it first if it is
    /// running) and waits for PING. All data is gone: there is no
    /// persistence. A cluster node keeps its `nodes.conf` and rejoins.
    pub fn restart(&mut self) {
        self.stop();
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(StartError::Exited(log)) => {
                    failures.push(format!("attempt {attempt}: exited early; log:\n{log}"));
                    thread::sleep(Duration::from_millis(200));
                }
                Err(StartError::Timeout(log)) => panic!(
                    "{} restarted on port {} did not answer PING within {START_TIMEOUT:?}; \
                     log:\n{log}",
                    self.program, self.port
                ),
            }
        }
        panic!(
            "{} failed to restart on port {} after {START_ATTEMPTS} attempts:\n{}",
            self.program,
            self.port,
            failures.join("\n")
        );
    }

    /// Sends one command and returns the parsed reply; panics on I/O errors
    /// (connection refused, timeout). Redis errors are `Reply::Error`.
    pub fn reply(&self, args: &[&str]) -> Reply {
        self.reply_with_timeout(args, COMMAND_TIMEOUT)
    }

    /// [`reply`](Self::reply) with a custom socket timeout.
    pub fn reply_with_timeout(&self, args: &[&str], timeout: Duration) -> Reply {
        resp_command(&self.addr(), args, timeout)
            .unwrap_or_else(|e| panic!("redis command {args:?} on {} failed: {e}", self.addr()))
    }

    /// Sends one command and returns the reply as text (see
    /// [`Reply::to_text`]: `"OK"`, `"-ERR ..."`, `"42"`, bulk content,
    /// `"(nil)"`, array elements joined by newlines). Panics on I/O errors.
    pub fn command(&self, args: &[&str]) -> String {
        self.reply(args).to_text()
    }

    /// Like [`command`](Self::command) but returns I/O errors (e.g. while
    /// the server is stopped) instead of panicking.
    pub fn try_command(&self, args: &[&str]) -> io::Result<String> {
        resp_command(&self.addr(), args, COMMAND_TIMEOUT).map(|r| r.to_text())
    }

    /// `PING` answered with `PONG`.
    pub fn ping(&self) -> bool {
        is_pong(&self.addr())
    }

    /// Pauses all clients for `d` with `CLIENT PAUSE <ms> ALL`: commands
    /// sent meanwhile are delayed until the pause ends.
    pub fn pause(&self, d: Duration) {
        let ms = d.as_millis().to_string();
        let reply = self.command(&["CLIENT", "PAUSE", &ms, "ALL"]);
        assert_eq!(reply, "OK", "CLIENT PAUSE {ms} ALL on {}", self.addr());
    }

    /// Pauses only writes for `d` with `CLIENT PAUSE <ms> WRITE`: reads go
    /// through, writes are delayed until the pause ends or [`unpause`].
    ///
    /// [`unpause`]: Self::unpause
    pub fn pause_writes(&self, d: Duration) {
        let ms = d.as_millis().to_string();
        let reply = self.command(&["CLIENT", "PAUSE", &ms, "WRITE"]);
        assert_eq!(reply, "OK", "CLIENT PAUSE {ms} WRITE on {}", self.addr());
    }

    /// Ends a [`pause_writes`](Self::pause_writes) early with
    /// `CLIENT UNPAUSE`. Does not work for [`pause`](Self::pause): under
    /// `CLIENT PAUSE ... ALL` the UNPAUSE command itself is delayed.
    pub fn unpause(&self) {
        let reply = self.command(&["CLIENT", "UNPAUSE"]);
        assert_eq!(reply, "OK", "CLIENT UNPAUSE on {}", self.addr());
    }

    /// `FLUSHALL`.
    pub fn flushall(&self) {
        let reply = self.command(&["FLUSHALL"]);
        assert_eq!(reply, "OK", "FLUSHALL on {}", self.addr());
    }

    /// `INFO <section>` as text.
    pub fn info(&self, section: &str) -> String {
        self.command(&["INFO", section])
    }

    /// The value of `field` in `INFO <section>` (e.g. `info_field("server",
    /// "tcp_port")`).
    pub fn info_field(&self, section: &str, field: &str) -> Option<String> {
        info_value(&self.info(section), field)
    }
}

/// Finds `field:value` in `INFO` or `CLUSTER INFO` text.
pub fn info_value(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == field).then(|| v.trim().to_owned())
    })
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("bus_port", &self.bus_port)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// RedisCluster
// ---------------------------------------------------------------------------

/// A real Redis Cluster of three masters, no replicas.
///
/// Every node is a [`RedisServer`]; all are killed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub const MASTERS: usize = 3;

    /// Starts three cluster-enabled nodes, joins them with
    /// `redis-cli --cluster create`, and waits until every node reports
    /// `cluster_state:ok` with all 16384 slots assigned.
    pub fn start() -> RedisCluster {
        Self::start_with(|_| Vec::new())
    }

    /// [`start`](Self::start), node `i` started with the extra arguments `node_args(i)`.
    pub fn start_with(node_args: impl Fn(usize) -> Vec<String>) -> RedisCluster {
        require_program(REDIS_SERVER);
        require_program(REDIS_CLI);
        let nodes: Vec<RedisServer> = (0..Self::MASTERS)
            .map(|i| RedisServer::start_cluster_node(&node_args(i)))
            .collect();
        let cluster = RedisCluster { nodes };

        let mut cmd = Command::new(REDIS_CLI);
        cmd.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            cmd.arg(node.addr());
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null());
        let out = match cmd.output() {
            Ok(out) => out,
            Err(e) if e.kind() == ErrorKind::NotFound => panic!("{}", not_found_message(REDIS_CLI)),
            Err(e) => panic!("cannot run {REDIS_CLI} --cluster create: {e}"),
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stdout.contains("[ERR]"),
            "{REDIS_CLI} --cluster create failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}\n{}",
            out.status,
            cluster.logs()
        );

        cluster.wait_until_ok(CLUSTER_TIMEOUT);
        cluster
    }

    /// Waits until every running node reports `cluster_state:ok`, all 16384
    /// slots assigned and all nodes known; panics after `timeout`.
    pub fn wait_until_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let states: Vec<String> = self
                .nodes
                .iter()
                .map(|node| {
                    let info = match resp_command(
                        &node.addr(),
                        &["CLUSTER", "INFO"],
                        Duration::from_secs(1),
                    ) {
                        Ok(reply) => reply.to_text(),
                        Err(e) => return format!("{}: {e}", node.addr()),
                    };
                    let state = info_value(&info, "cluster_state");
                    let slots = info_value(&info, "cluster_slots_assigned");
                    let known = info_value(&info, "cluster_known_nodes");
                    let ok = state.as_deref() == Some("ok")
                        && slots.as_deref() == Some("16384")
                        && known.as_deref() == Some(Self::MASTERS.to_string().as_str());
                    if ok {
                        String::new()
                    } else {
                        format!(
                            "{}: state={state:?} slots_assigned={slots:?} known_nodes={known:?}",
                            node.addr()
                        )
                    }
                })
                .filter(|s| !s.is_empty())
                .collect();
            if states.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "Redis cluster not ok within {timeout:?}:\n{}\n{}",
                    states.join("\n"),
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- log of {} ---\n{}", n.addr(), n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `redis://127.0.0.1:PORT/` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// `127.0.0.1:PORT` of every node.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::addr).collect()
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// For `stop`/`restart` of one node.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// Runs a command on node `i` (no redirect handling: a key owned by
    /// another node answers `"-MOVED <slot> <addr>"`).
    pub fn command_on(&self, i: usize, args: &[&str]) -> String {
        self.nodes[i].command(args)
    }

    /// Runs a command on node 0 and follows `-MOVED` redirects, so keyed
    /// commands reach the node owning the key's slot.
    pub fn command(&self, args: &[&str]) -> String {
        let mut addr = self.nodes[0].addr();
        for _ in 0..5 {
            let reply = resp_command(&addr, args, COMMAND_TIMEOUT)
                .unwrap_or_else(|e| panic!("redis command {args:?} on {addr} failed: {e}"));
            match &reply {
                Reply::Error(e) if e.starts_with("MOVED ") => {
                    addr = e
                        .split_whitespace()
                        .nth(2)
                        .unwrap_or_else(|| panic!("malformed MOVED reply {e:?}"))
                        .to_owned();
                }
                _ => return reply.to_text(),
            }
        }
        panic!("too many MOVED redirects for {args:?}");
    }

    /// `FLUSHALL` on every node.
    pub fn flushall(&self) {
        for node in &self.nodes {
            node.flushall();
        }
    }
}

impl fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCluster")
            .field("nodes", &self.nodes)
            .finish()
    }
}

// ---------------------------------------------------------------------------
// A TCP proxy whose target can be switched
// ---------------------------------------------------------------------------

/// A plain TCP forwarder on a free loopback port, standing for the name a client dials (a
/// DNS name, a virtual IP, a managed service's primary endpoint): each new connection goes
/// to the current target; connections already open stay with the target they were opened
/// to, as they do when a DNS record or a virtual IP moves.
pub struct TcpProxy {
    port: u16,
    target: std::sync::Arc<Mutex<String>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl TcpProxy {
    /// Starts forwarding to `target` (`host:port`).
    pub fn start(target: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let target = std::sync::Arc::new(Mutex::new(target.to_string()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (to, halt) = (target.clone(), stop.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if halt.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                let upstream = to.lock().unwrap().clone();
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                for (mut from, mut into) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    thread::spawn(move || {
                        let _ = io::copy(&mut from, &mut into);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        TcpProxy { port, target, stop }
    }

    /// Sends new connections to `target` from now on.
    pub fn set_target(&self, target: &str) {
        *self.target.lock().unwrap() = target.to_string();
    }

    /// The URL a Redis client dials to go through the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

// ---------------------------------------------------------------------------
// TLS material
// ---------------------------------------------------------------------------

/// A private certificate authority with a server certificate for `127.0.0.1`/`localhost`
/// and a client certificate, made with the `openssl` command line in a fresh directory.
pub struct TlsFiles {
    pub dir: PathBuf,
}

impl TlsFiles {
    /// Makes the CA, the server and the client certificates. Panics (tests never skip)
    /// when `openssl` is missing or fails.
    pub fn generate() -> TlsFiles {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("battlement-tls-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the TLS directory");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap_or_else(|e| panic!("cannot run openssl (install it): {e}"));
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=battlement test CA",
        ]);
        for who in ["server", "client"] {
            let (key, csr, crt, ext) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.crt"),
                format!("{who}.ext"),
            );
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN=battlement test {who}"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ]);
        }
        TlsFiles { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.dir.join(name)).unwrap()
    }

    /// `redis-server` arguments for a TLS port next to the plain one (which the test
    /// harness and the tests' own commands use). `clients` asks for client certificates.
    pub fn server_args(&self, tls_port: u16, clients: bool) -> Vec<String> {
        [
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &self.path("server.crt"),
            "--tls-key-file",
            &self.path("server.key"),
            "--tls-ca-cert-file",
            &self.path("ca.crt"),
            "--tls-auth-clients",
            if clients { "yes" } else { "no" },
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Redis Sentinel
// ---------------------------------------------------------------------------

/// A real Redis Sentinel (`redis-server --sentinel`) watching one master with a quorum of
/// one, quick to act: the master is taken for down after one second.
pub struct Sentinel {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Sentinel {
    /// Starts a Sentinel watching `master` under `name`. Start the master's replicas (and
    /// let them sync) first: the Sentinel learns them from the master at once.
    pub fn start(name: &str, master: &RedisServer) -> Sentinel {
        require_program(REDIS_SERVER);
        let port = free_port();
        let dir = fresh_dir(port);
        let conf = dir.join("sentinel.conf");
        fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 5000\n",
                dir.display(),
                master.port()
            ),
        )
        .expect("write sentinel.conf");
        let log = fs::File::create(dir.join(LOG_FILE)).expect("sentinel log");
        let child = Command::new(REDIS_SERVER)
            .arg(&conf)
            .arg("--sentinel")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start a Sentinel: {e}"));
        let sentinel = Sentinel { port, dir, child };
        let deadline = Instant::now() + START_TIMEOUT;
        while !is_pong(&sentinel.addr()) {
            assert!(
                Instant::now() < deadline,
                "the Sentinel never answered PING: {}",
                read_log(&sentinel.dir)
            );
            thread::sleep(Duration::from_millis(20));
        }
        sentinel
    }

    /// A master and its replica (synced), watched by a Sentinel under `name`.
    pub fn with_pair(name: &str) -> (RedisServer, RedisServer, Sentinel) {
        let master = RedisServer::start();
        let replica = RedisServer::start();
        let port = master.port().to_string();
        assert_eq!(replica.command(&["REPLICAOF", "127.0.0.1", &port]), "OK");
        let deadline = Instant::now() + Duration::from_secs(10);
        while replica
            .info_field("replication", "master_link_status")
            .as_deref()
            != Some("up")
        {
            assert!(Instant::now() < deadline, "the replica never synced");
            thread::sleep(Duration::from_millis(20));
        }
        let sentinel = Sentinel::start(name, &master);
        (master, replica, sentinel)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn command(&self, args: &[&str]) -> String {
        resp_command(&self.addr(), args, COMMAND_TIMEOUT)
            .unwrap_or_else(|e| panic!("{args:?} on the Sentinel: {e}"))
            .to_text()
    }

    /// The port of the master the Sentinel names now.
    pub fn master_port(&self, name: &str) -> u16 {
        let reply = self.command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", name]);
        reply
            .lines()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    pub fn log(&self) -> String {
        read_log(&self.dir)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        kill_child(&mut self.child);
        let _ = fs::remove_dir_all(&self.dir);
    }
}
