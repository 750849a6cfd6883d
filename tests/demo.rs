//! End to end: two copies of the demo (`examples/orders.rs`), started as separate processes
//! with one `REDIS_URL`, behave as one service: one rate limit, one cache (a purge on one
//! copy reaches the other's memory tier), one set of orders, one lock per order and one
//! idempotency record per key. Once on a single Redis node and once on a three-master
//! Redis Cluster.
//!
//! The demo binary is the one `cargo test --all-features` builds next to this test (cargo
//! builds every example before it runs the tests); run on its own, build it first with
//! `cargo build --features redis --example orders`.

#![cfg(all(
    feature = "redis",
    feature = "rate-limit",
    feature = "trace",
    feature = "auth",
    feature = "validate",
    feature = "cache",
    feature = "lock",
    feature = "idempotency"
))]

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use support::{RedisCluster, RedisServer};

const SECRET: &str = "an-end-to-end-test-secret-of-more-than-32-bytes";
/// Per client IP per minute, on both copies (one limit, shared through Redis).
const IP_LIMIT: usize = 12;
/// How long each payment holds the order's lock.
const PAY_DELAY_MS: u64 = 400;

/// The demo binary cargo built beside this test.
fn demo_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/demo-<hash> -> target/<profile>/examples/orders
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a test binary in target/<profile>/deps");
    let bin = profile_dir
        .join("examples")
        .join(format!("orders{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "the demo binary {} is missing: run `cargo test --all-features` (which builds the \
         examples), or `cargo build --features redis --example orders` before this test",
        bin.display()
    );
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/orders.rs");
    let built = bin.metadata().and_then(|m| m.modified()).expect("mtime");
    let edited = source.metadata().and_then(|m| m.modified()).expect("mtime");
    assert!(
        built >= edited,
        "the demo binary {} is older than examples/orders.rs: rebuild it with \
         `cargo test --all-features` or `cargo build --features redis --example orders`",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One running copy of the demo; killed on drop. Its stdout and stderr are kept.
struct Demo {
    name: &'static str,
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Demo {
    fn start(name: &'static str, redis_url: &str) -> Demo {
        let port = free_port();
        let mut child = Command::new(demo_binary())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("REDIS_URL", redis_url)
            .env("BIND", format!("127.0.0.1:{port}"))
            .env("JWT_SECRET", SECRET)
            // The test is the proxy: each scenario comes from its own client address.
            .env("TRUSTED_PROXIES", "127.0.0.1/32")
            .env("RATE_LIMIT_PER_MINUTE", IP_LIMIT.to_string())
            .env("ORIGIN_DELAY_MS", "5")
            .env("PAY_DELAY_MS", PAY_DELAY_MS.to_string())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the demo binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        for out in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        Demo {
            name,
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for `/healthz`; panics with the copy's output when it does not come up.
    async fn ready(&mut self, http: &Http) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "demo copy {} exited with {status}:\n{}",
                    self.name,
                    self.log()
                );
            }
            if let Ok(r) = http
                .try_send(Method::GET, &self.url("/healthz"), &[], None)
                .await
                && r.status == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "demo copy {} did not answer /healthz in 15 s:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The JSON request line this copy logged for the request id `id`.
    fn request_line(&self, id: &str) -> Option<Value> {
        let needle = format!("\"request_id\":\"{id}\"");
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(&needle) && l.contains("\"http.response.status_code\""))
            .find_map(|l| serde_json::from_str(l).ok())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

struct Http(Client<HttpConnector, Full<Bytes>>);

impl Http {
    fn new() -> Http {
        Http(Client::builder(TokioExecutor::new()).build_http())
    }

    async fn try_send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
        let mut req = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))?;
        let res = tokio::time::timeout(Duration::from_secs(10), self.0.request(req)).await??;
        let (parts, body) = res.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Reply {
        self.try_send(method.clone(), url, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
    }
}

/// A bearer token for `subject` with `scope`, signed with the copies' `JWT_SECRET`.
fn token(subject: &str, scope: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = serde_json::json!({
        "iss": "battlement-demo", "aud": "orders-api", "sub": subject,
        "exp": exp, "scope": scope,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Two copies on `redis_url`, and every claim of "one service" checked across them.
async fn two_copies_behave_as_one(redis_url: &str, backend: &str) {
    let http = Http::new();
    let mut a = Demo::start("A", redis_url);
    let mut b = Demo::start("B", redis_url);
    a.ready(&http).await;
    b.ready(&http).await;
    for copy in [&a, &b] {
        assert!(
            copy.log().contains(&format!("(backend: {backend} at")),
            "copy {} is not on {backend}:\n{}",
            copy.name,
            copy.log()
        );
        assert!(!copy.log().contains("s3cret"), "a password reached the log");
    }
    let copies = [&a, &b];

    // One rate limit: requests from one client address, alternating between the copies,
    // are counted once. The limit is spent after IP_LIMIT of them, on both copies.
    let ip = [("x-forwarded-for", "203.0.113.10")];
    for i in 0..IP_LIMIT {
        let copy = copies[i % 2];
        let r = http
            .send(Method::GET, &copy.url("/products/p-rl"), &ip, None)
            .await;
        assert_eq!(
            r.status, 200,
            "request {i} on copy {}: {}",
            copy.name, r.body
        );
    }
    for copy in copies {
        let r = http
            .send(Method::GET, &copy.url("/products/p-rl"), &ip, None)
            .await;
        assert_eq!(r.status, 429, "copy {} over the shared limit", copy.name);
        assert_eq!(r.header("content-type"), "application/problem+json");
        let retry: u64 = r
            .header("retry-after")
            .parse()
            .expect("Retry-After seconds");
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
        assert!(r.header("ratelimit").contains("r=0"), "{:?}", r.headers);
    }
    // Another client address has its own budget.
    let other_ip = [("x-forwarded-for", "203.0.113.11")];
    let r = http
        .send(Method::GET, &b.url("/products/p-rl"), &other_ip, None)
        .await;
    assert_eq!(r.status, 200);

    // One cache: filled through one copy, a hit on the other; a purge on one copy reaches
    // the other's memory tier (Redis pub/sub), so its next request goes to the origin.
    let ip = [("x-forwarded-for", "203.0.113.20")];
    let first = http
        .send(Method::GET, &a.url("/products/p-cache"), &ip, None)
        .await;
    assert_eq!(first.status, 200);
    assert!(
        first.header("cache-status").contains("fwd=uri-miss"),
        "{:?}",
        first.headers
    );
    let etag = first.header("etag").to_owned();
    let r = http
        .send(Method::GET, &b.url("/products/p-cache"), &ip, None)
        .await;
    assert!(
        r.header("cache-status").contains("hit"),
        "copy B: {:?}",
        r.headers
    );
    assert_eq!(r.body, first.body);
    let r = http
        .send(
            Method::GET,
            &b.url("/products/p-cache"),
            &[ip[0], ("if-none-match", etag.as_str())],
            None,
        )
        .await;
    assert_eq!(
        r.status, 304,
        "a revalidation answered from the shared entry"
    );
    // A's own memory tier holds it now too.
    let r = http
        .send(Method::GET, &a.url("/products/p-cache"), &ip, None)
        .await;
    assert!(
        r.header("cache-status").contains("hit"),
        "copy A: {:?}",
        r.headers
    );
    // Purging needs the scope.
    let anonymous = http
        .send(Method::POST, &b.url("/products/p-cache/purge"), &ip, None)
        .await;
    assert_eq!(anonymous.status, 401);
    let writer = format!("Bearer {}", token("alice", "orders:read orders:write"));
    let r = http
        .send(
            Method::POST,
            &b.url("/products/p-cache/purge"),
            &[ip[0], ("authorization", &writer)],
            None,
        )
        .await;
    assert_eq!(r.status, 403);
    let admin = format!("Bearer {}", token("ops", "products:purge"));
    let r = http
        .send(
            Method::POST,
            &b.url("/products/p-cache/purge"),
            &[ip[0], ("authorization", &admin)],
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    // The purge message reaches A in milliseconds; allow it two seconds. Each poll comes
    // from its own address so that the polling does not spend the shared limit.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut n = 0;
    let status = loop {
        n += 1;
        let poll_ip = format!("198.51.100.{n}");
        let r = http
            .send(
                Method::GET,
                &a.url("/products/p-cache"),
                &[("x-forwarded-for", &poll_ip)],
                None,
            )
            .await;
        let status = r.header("cache-status").to_owned();
        if !status.contains("hit") || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        status.contains("fwd=uri-miss"),
        "copy A still answers from its memory tier after the purge on B: {status}"
    );

    // One set of orders: made on A, read on B, only by its owner.
    let ip = [("x-forwarded-for", "203.0.113.30")];
    let reader_bob = format!("Bearer {}", token("bob", "orders:read"));
    let created = http
        .send(
            Method::POST,
            &a.url("/orders"),
            &[ip[0], ("authorization", &writer)],
            Some(r#"{"product_id":"p-1","quantity":2}"#),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let order = created.json();
    let id = order["id"].as_str().expect("an order id").to_owned();
    assert_eq!(order["owner"], "alice");
    let r = http
        .send(
            Method::GET,
            &b.url(&format!("/orders/{id}")),
            &[ip[0], ("authorization", &writer)],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), order);
    let r = http
        .send(
            Method::GET,
            &b.url(&format!("/orders/{id}")),
            &[ip[0], ("authorization", &reader_bob)],
            None,
        )
        .await;
    assert_eq!(r.status, 404, "another subject does not see it");

    // One lock per order: two pays at once, one on each copy. One pays and gets a fencing
    // token; the other waited for the lock (the whole payment), then found it paid.
    let pay = |copy: &Demo, rid: &'static str| {
        let url = copy.url(&format!("/orders/{id}/pay"));
        let writer = writer.clone();
        let http = &http;
        async move {
            http.send(
                Method::POST,
                &url,
                &[
                    ("x-forwarded-for", "203.0.113.31"),
                    ("authorization", &writer),
                    ("x-request-id", rid),
                ],
                None,
            )
            .await
        }
    };
    let (on_a, on_b) = tokio::join!(pay(&a, "pay-on-a"), pay(&b, "pay-on-b"));
    let mut statuses = [on_a.status, on_b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409], "{} / {}", on_a.body, on_b.body);
    let (paid, refused, refused_copy, refused_rid) = if on_a.status == 200 {
        (on_a, on_b, &b, "pay-on-b")
    } else {
        (on_b, on_a, &a, "pay-on-a")
    };
    let paid = paid.json();
    assert_eq!(paid["status"], "paid");
    assert!(
        paid["fencing_token"].as_u64().is_some_and(|t| t > 0),
        "{paid}"
    );
    assert_eq!(refused.json()["status"], 409);
    // The request log says the refused one held the lock too, after waiting for it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let line = refused_copy
        .request_line(refused_rid)
        .unwrap_or_else(|| panic!("no request line for {refused_rid}:\n{}", refused_copy.log()));
    assert_eq!(line["lock.outcome"], "acquired", "{line}");
    let waited = line["lock.wait_ms"].as_f64().expect("lock.wait_ms");
    assert!(
        waited >= (PAY_DELAY_MS / 4) as f64,
        "the second payment did not wait for the first one's lock: {line}"
    );
    let again = pay(&a, "pay-again").await;
    assert_eq!(again.status, 409, "paid once: {}", again.body);

    // One idempotency record per key: made on A, replayed by B; another body with the key
    // is refused by B.
    let ip = ("x-forwarded-for", "203.0.113.40");
    let keyed = |key: &'static str| {
        [
            ip,
            ("authorization", writer.as_str()),
            ("idempotency-key", key),
        ]
    };
    let body = r#"{"product_id":"p-7","quantity":3}"#;
    let first = http
        .send(
            Method::POST,
            &a.url("/orders"),
            &keyed("\"e2e-1\""),
            Some(body),
        )
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    let replay = http
        .send(
            Method::POST,
            &b.url("/orders"),
            &keyed("\"e2e-1\""),
            Some(body),
        )
        .await;
    assert_eq!(replay.status, 201, "{}", replay.body);
    assert_eq!(replay.header("idempotent-replayed"), "true");
    assert_eq!(
        replay.json()["id"],
        first.json()["id"],
        "one order, not two"
    );
    let reused = http
        .send(
            Method::POST,
            &b.url("/orders"),
            &keyed("\"e2e-1\""),
            Some(r#"{"product_id":"p-7","quantity":4}"#),
        )
        .await;
    assert_eq!(reused.status, 422, "{}", reused.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_on_one_redis_behave_as_one_service() {
    let redis = RedisServer::start();
    two_copies_behave_as_one(&redis.url(), "redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_on_a_redis_cluster_behave_as_one_service() {
    let cluster = RedisCluster::start();
    two_copies_behave_as_one(&cluster.urls().join(","), "redis cluster").await;
}

/// Through Redis Sentinel (`REDIS_URL=redis+sentinel://...`), and with a password on the
/// master that the demo's log line never shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_through_redis_sentinel_behave_as_one_service() {
    let (master, replica, sentinel) = support::Sentinel::with_pair("demo");
    // The Sentinel and the replica learn the password before the master asks for it.
    assert_eq!(
        sentinel.command(&["SENTINEL", "SET", "demo", "auth-pass", "s3cret-pw"]),
        "OK"
    );
    for node in [&master, &replica] {
        assert_eq!(
            node.command(&["CONFIG", "SET", "masterauth", "s3cret-pw"]),
            "OK"
        );
    }
    assert_eq!(
        master.command(&["CONFIG", "SET", "requirepass", "s3cret-pw"]),
        "OK"
    );
    let url = format!("redis+sentinel://:s3cret-pw@{}/demo", sentinel.addr());
    two_copies_behave_as_one(&url, "redis sentinel").await;
}
