//! Proves that the real-Redis test support in `tests/support` works.

mod support;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{RedisCluster, RedisServer, Reply, info_value};

#[test]
fn server_answers_ping_set_get() {
    let redis = RedisServer::start();
    assert_ne!(redis.port(), 6379, "must never use the shared dev Redis");
    assert_eq!(redis.addr(), format!("127.0.0.1:{}", redis.port()));
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));
    assert!(redis.is_running());
    assert!(redis.ping());

    assert_eq!(redis.command(&["PING"]), "PONG");
    assert_eq!(redis.command(&["SET", "greeting", "hello world"]), "OK");
    assert_eq!(redis.command(&["GET", "greeting"]), "hello world");
    assert_eq!(redis.reply(&["GET", "missing"]), Reply::Bulk(None));
    assert_eq!(redis.command(&["GET", "missing"]), "(nil)");
    assert_eq!(redis.command(&["INCR", "n"]), "1");
    assert_eq!(redis.reply(&["INCRBY", "n", "41"]), Reply::Integer(42));
    assert_eq!(redis.command(&["RPUSH", "list", "a", "b", "c"]), "3");
    assert_eq!(redis.command(&["LRANGE", "list", "0", "-1"]), "a\nb\nc");
    assert_eq!(redis.command(&["DBSIZE"]), "3");

    let err = redis.reply(&["NOSUCHCOMMAND"]);
    assert!(err.is_error(), "{err:?}");
    assert!(redis.command(&["NOSUCHCOMMAND"]).starts_with("-ERR"));

    // The server really is the one on our port, with persistence disabled.
    assert_eq!(
        redis.info_field("server", "tcp_port").as_deref(),
        Some(redis.port().to_string().as_str())
    );
    assert_eq!(redis.command(&["CONFIG", "GET", "save"]), "save\n");
    assert_eq!(
        redis.command(&["CONFIG", "GET", "appendonly"]),
        "appendonly\nno"
    );

    // INFO output comes back whole.
    let stats = redis.info("commandstats");
    assert!(stats.contains("cmdstat_set:calls=1,"), "{stats}");
    assert!(stats.contains("cmdstat_get:calls=3,"), "{stats}");

    redis.flushall();
    assert_eq!(redis.command(&["DBSIZE"]), "0");
}

#[test]
fn servers_are_isolated() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());
    a.command(&["SET", "k", "a"]);
    assert_eq!(b.command(&["GET", "k"]), "(nil)");
    b.command(&["SET", "k", "b"]);
    assert_eq!(a.command(&["GET", "k"]), "a");
}

#[test]
fn stop_then_restart_on_same_port_loses_data() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    assert_eq!(redis.command(&["SET", "k", "v"]), "OK");

    redis.stop();
    assert!(!redis.is_running());
    assert!(!redis.ping());
    assert!(redis.try_command(&["PING"]).is_err());
    assert!(
        TcpStream::connect(redis.addr()).is_err(),
        "port still open after stop"
    );
    redis.stop(); // idempotent

    redis.restart();
    assert!(redis.is_running());
    assert_eq!(redis.port(), port);
    assert_eq!(redis.command(&["PING"]), "PONG");
    assert_eq!(redis.command(&["GET", "k"]), "(nil)", "no persistence");
    assert_eq!(redis.command(&["DBSIZE"]), "0");

    // Restart also works on a running server.
    redis.command(&["SET", "k2", "v2"]);
    redis.restart();
    assert_eq!(redis.port(), port);
    assert_eq!(redis.command(&["EXISTS", "k2"]), "0");
}

#[test]
fn pause_delays_commands() {
    let redis = RedisServer::start();

    let t = Instant::now();
    assert_eq!(redis.command(&["SET", "k", "1"]), "OK");
    let unpaused = t.elapsed();
    assert!(unpaused < Duration::from_millis(300), "{unpaused:?}");

    redis.pause(Duration::from_millis(600));
    let t = Instant::now();
    assert_eq!(redis.command(&["SET", "k", "2"]), "OK");
    let paused = t.elapsed();
    assert!(
        paused >= Duration::from_millis(450),
        "SET not delayed by pause: {paused:?}"
    );
    assert_eq!(redis.command(&["GET", "k"]), "2");

    // A write pause lets reads through, delays writes, and UNPAUSE ends it.
    redis.pause_writes(Duration::from_secs(30));
    let t = Instant::now();
    assert_eq!(redis.command(&["GET", "k"]), "2");
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "read delayed: {:?}",
        t.elapsed()
    );
    let handle = {
        let addr = redis.addr();
        std::thread::spawn(move || {
            let t = Instant::now();
            let reply = support::resp_command(&addr, &["SET", "k", "3"], Duration::from_secs(10))
                .expect("SET during write pause");
            (reply, t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        redis.command(&["GET", "k"]),
        "2",
        "write applied during pause"
    );
    redis.unpause();
    let (reply, waited) = handle.join().unwrap();
    assert_eq!(reply, Reply::Status("OK".into()));
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(redis.command(&["GET", "k"]), "3");
}

#[test]
fn debug_sleep_is_enabled() {
    let redis = RedisServer::start();
    let t = Instant::now();
    assert_eq!(redis.command(&["DEBUG", "SLEEP", "0.2"]), "OK");
    assert!(
        t.elapsed() >= Duration::from_millis(190),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn drop_kills_server_and_removes_dir() {
    let redis = RedisServer::start();
    let dir = redis.dir().to_path_buf();
    let addr = redis.addr();
    assert!(dir.is_dir());
    assert!(dir.starts_with(std::env::temp_dir()));
    drop(redis);
    assert!(!dir.exists(), "{} not removed", dir.display());
    assert!(
        TcpStream::connect(&addr).is_err(),
        "server still listening on {addr}"
    );
}

#[test]
fn missing_binary_panics_loudly() {
    let result = std::panic::catch_unwind(|| {
        RedisServer::start_program("redis-server-does-not-exist-battlement", &[])
    });
    let payload = result.expect_err("starting a missing binary must panic");
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(msg.contains("not found on PATH"), "{msg}");
    assert!(msg.contains("never skip"), "{msg}");
}

#[test]
fn cluster_comes_up_ok() {
    let cluster = RedisCluster::start();
    assert_eq!(cluster.nodes().len(), 3);
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    for (i, node) in cluster.nodes().iter().enumerate() {
        assert_eq!(urls[i], node.url());
        assert_ne!(node.port(), 6379);
        let info = cluster.command_on(i, &["CLUSTER", "INFO"]);
        assert_eq!(
            info_value(&info, "cluster_state").as_deref(),
            Some("ok"),
            "{info}"
        );
        assert_eq!(
            info_value(&info, "cluster_slots_assigned").as_deref(),
            Some("16384")
        );
        assert_eq!(
            info_value(&info, "cluster_known_nodes").as_deref(),
            Some("3")
        );
        assert_eq!(info_value(&info, "cluster_size").as_deref(), Some("3"));
    }

    // Every key is owned by exactly one node; the others redirect to it.
    for key in ["foo", "bar", "baz", "{user1}:a"] {
        let replies: Vec<String> = (0..3)
            .map(|i| cluster.command_on(i, &["SET", key, "v"]))
            .collect();
        let owners: Vec<usize> = (0..3).filter(|&i| replies[i] == "OK").collect();
        assert_eq!(owners.len(), 1, "{key}: {replies:?}");
        let owner_addr = cluster.node(owners[0]).addr();
        for (i, reply) in replies.iter().enumerate() {
            if i != owners[0] {
                assert!(reply.starts_with("-MOVED "), "{key} on node {i}: {reply}");
                assert!(reply.ends_with(&owner_addr), "{key} on node {i}: {reply}");
            }
        }
        assert_eq!(cluster.command(&["GET", key]), "v");
    }

    cluster.flushall();
    assert_eq!(cluster.command(&["GET", "foo"]), "(nil)");
}
