//! The demo orders API (see the README): every battlement layer on one axum router, in
//! memory by default, on Redis when `REDIS_URL` is set (built with `--features redis`).
//!
//! ```text
//! cargo run --example orders
//! curl -i http://127.0.0.1:3000/products/p-1
//! ```
//!
//! Configuration comes from the environment; a bad value stops it with a message naming
//! the variable:
//!
//! | variable | default |
//! |---|---|
//! | `BIND` | `127.0.0.1:3000` |
//! | `REDIS_URL` | unset: in memory; `redis://host:port`, or a comma-separated cluster node list |
//! | `TRUSTED_PROXIES` | none: CIDR list whose `X-Forwarded-For` is believed |
//! | `RATE_LIMIT_PER_MINUTE` | `600` per client IP on `/products` and `/orders` |
//! | `ORIGIN_DELAY_MS` | `20`: simulated database latency of the product handler |
//! | `LOG_FORMAT` | `json` (or `pretty`) |
//!
//! It logs one JSON line per request on stdout (the `trace` layer, outermost), and with
//! `--features metrics` serves Prometheus text on `GET /metrics`.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use axum::extract::{ConnectInfo, MatchedPath, Path};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use battlement::key::{ClientIp, RequestHead};
use battlement::rate_limit::{Quota, RateLimitLayer};
use battlement::reject::Rejection;
use battlement::trace::{RoutePolicy, TraceLayer};
use tracing::Level;

struct Config {
    bind: SocketAddr,
    redis_url: Option<String>,
    trusted_proxies: String,
    rate_limit_per_minute: u32,
    origin_delay: Duration,
    log_format: String,
}

fn var<T: FromStr>(name: &str, default: T) -> T
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(raw) if !raw.trim().is_empty() => raw.trim().parse().unwrap_or_else(|e| {
            eprintln!("error: {name}={raw:?} is not valid: {e}");
            std::process::exit(2);
        }),
        _ => default,
    }
}

fn fail(name: &str, why: impl std::fmt::Display) -> ! {
    eprintln!("error: {name} is not valid: {why}");
    std::process::exit(2);
}

impl Config {
    fn from_env() -> Self {
        let config = Config {
            bind: var("BIND", SocketAddr::from(([127, 0, 0, 1], 3000))),
            redis_url: std::env::var("REDIS_URL")
                .ok()
                .filter(|s| !s.trim().is_empty()),
            trusted_proxies: var("TRUSTED_PROXIES", String::new()),
            rate_limit_per_minute: var("RATE_LIMIT_PER_MINUTE", 600),
            origin_delay: Duration::from_millis(var("ORIGIN_DELAY_MS", 20)),
            log_format: var("LOG_FORMAT", "json".to_string()),
        };
        if config.rate_limit_per_minute == 0 {
            fail("RATE_LIMIT_PER_MINUTE", "must be at least 1");
        }
        if !matches!(config.log_format.as_str(), "json" | "pretty") {
            fail("LOG_FORMAT", "must be json or pretty");
        }
        config
    }
}

/// Product ids the API knows the shape of; anything else is a 404 problem.
fn valid_product_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

async fn product(Path(id): Path<String>, headers: HeaderMap, origin_delay: Duration) -> Response {
    if !valid_product_id(&id) {
        let req = axum::http::Request::new(());
        let rejection = Rejection::new(StatusCode::NOT_FOUND, "Not Found")
            .with_detail("No product has this id.");
        return rejection
            .into_response::<axum::body::Body>(&RequestHead::of(&req))
            .into_response();
    }
    // The simulated database.
    tokio::time::sleep(origin_delay).await;
    let body = serde_json::json!({
        "id": id,
        "name": format!("Product {id}"),
        "price_cents": 1000 + id.len() * 100,
    });
    let etag = format!("\"p-{:016x}\"", fxhash(body.to_string().as_bytes()));
    let mut res = if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        Json(body).into_response()
    };
    let h = res.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=30"),
    );
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("ascii etag"),
    );
    res
}

/// A small stable hash for the demo's ETag.
fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[tokio::main]
async fn main() {
    let config = Config::from_env();
    let subscriber = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    if config.log_format == "json" {
        // One flat JSON object per line; the per-request event has every field itself, and
        // handler logs carry the request's span (with its request id).
        subscriber
            .json()
            .flatten_event(true)
            .with_span_list(false)
            .init();
    } else {
        subscriber.pretty().init();
    }

    let client_ip = ClientIp::new()
        .trust_proxy_list(&config.trusted_proxies)
        .unwrap_or_else(|e| fail("TRUSTED_PROXIES", e))
        // axum records the peer address as `ConnectInfo<SocketAddr>`.
        .peer_lookup(|ext| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()));
    let trace = TraceLayer::builder()
        .client_ip(client_ip.clone())
        // axum's route template (with the `axum` feature, battlement reads it by itself).
        .route_from(|req| {
            req.extensions
                .get::<MatchedPath>()
                .map(|m| m.as_str().to_owned())
        })
        .route("/healthz", RoutePolicy::new().level(Level::DEBUG))
        .route("/metrics", RoutePolicy::new().level(Level::DEBUG))
        .build()
        .expect("valid trace configuration");
    let per_ip = RateLimitLayer::builder()
        .name("per-ip")
        .policy(
            "per-minute",
            Quota::requests_per(config.rate_limit_per_minute, Duration::from_secs(60)),
        )
        .key(client_ip)
        .headers_on_success(true);

    let origin_delay = config.origin_delay;
    let limited = Router::new().route(
        "/products/{id}",
        get(move |path, headers| product(path, headers, origin_delay)),
    );

    let (limited, backend) = match &config.redis_url {
        None => (
            limited.layer(per_ip.build().expect("valid rate limit")),
            "memory".to_string(),
        ),
        Some(url) => with_redis(limited, per_ip, url).await,
    };

    let app = limited
        .merge(Router::new().route("/healthz", get(|| async { "ok" })))
        .merge(metrics_routes())
        // Outermost: it sees every request, refusals included, and the decisions of the
        // layers inside it.
        .layer(trace);

    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .unwrap_or_else(|e| fail("BIND", e));
    let addr = listener.local_addr().expect("bound address");
    println!("battlement orders demo listening on http://{addr} (backend: {backend})");
    println!("  curl -i http://{addr}/products/p-1");
    println!("  curl -i http://{addr}/healthz");
    if cfg!(feature = "metrics") {
        println!("  curl -s http://{addr}/metrics");
    }
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
    .expect("server error");
}

/// `GET /metrics` in Prometheus text, with `--features metrics`.
#[cfg(feature = "metrics")]
fn metrics_routes() -> Router {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        // Histograms as Prometheus histograms (the OpenTelemetry default boundaries).
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        ])
        .expect("non-empty buckets")
        .install_recorder()
        .expect("a metrics recorder can be installed once");
    Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                handle.run_upkeep();
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    handle.render(),
                )
            }
        }),
    )
}

#[cfg(not(feature = "metrics"))]
fn metrics_routes() -> Router {
    Router::new()
}

#[cfg(feature = "redis")]
async fn with_redis(
    router: Router,
    per_ip: battlement::rate_limit::RateLimitBuilder<
        ClientIp,
        battlement::rate_limit::DefaultBackend,
    >,
    url: &str,
) -> (Router, String) {
    use battlement::rate_limit::RedisBackend;
    use battlement::redis::{RedisConfig, RedisStore};
    let config = RedisConfig::from_list(url).unwrap_or_else(|e| fail("REDIS_URL", e));
    let kind = if config.is_cluster() {
        "redis cluster"
    } else {
        "redis"
    };
    let store = RedisStore::connect(config)
        .await
        .unwrap_or_else(|e| fail("REDIS_URL", e));
    let layer = per_ip
        .backend(RedisBackend::new(store))
        .build()
        .expect("valid rate limit");
    (router.layer(layer), format!("{kind} at {url}"))
}

#[cfg(not(feature = "redis"))]
async fn with_redis(
    _router: Router,
    _per_ip: battlement::rate_limit::RateLimitBuilder<
        ClientIp,
        battlement::rate_limit::DefaultBackend,
    >,
    _url: &str,
) -> (Router, String) {
    fail(
        "REDIS_URL",
        "this build has no Redis support: run with `cargo run --features redis --example orders`",
    )
}
