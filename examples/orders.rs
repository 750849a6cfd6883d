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
//! | `REDIS_URL` | unset: in memory; `redis://host:port` (a node, or any node of a cluster), a comma-separated cluster node list, or `redis+sentinel://host:26379,host2:26379/mymaster` (a master found through Redis Sentinel) |
//! | `TRUSTED_PROXIES` | none: CIDR list whose `X-Forwarded-For` is believed |
//! | `RATE_LIMIT_PER_MINUTE` | `600` per client IP on `/products` and `/orders` |
//! | `ORDER_RATE_LIMIT_PER_MINUTE` | `60` per token subject on `POST /orders` |
//! | `JWT_SECRET` | a dev secret (with a warning, and dev tokens printed at start) |
//! | `JWT_ISSUER` / `JWT_AUDIENCE` | `battlement-demo` / `orders-api` |
//! | `ORIGIN_DELAY_MS` | `20`: simulated database latency of the product handler |
//! | `PAY_DELAY_MS` | `100`: simulated payment latency of `POST /orders/{id}/pay` |
//! | `LOG_FORMAT` | `json` (or `pretty`) |
//!
//! It logs one JSON line per request on stdout (the `trace` layer, outermost), and with
//! `--features metrics` serves Prometheus text on `GET /metrics`.
//!
//! Besides the routes of the README, `POST /products/{id}/purge` (a token with the scope
//! `products:purge`) drops a product from the cache: on Redis, from every copy's cache.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use axum::extract::{ConnectInfo, MatchedPath, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use battlement::auth::{AuthLayer, Issuer, JwtValidator, RequireScopes};
use battlement::cache::CacheLayer;
use battlement::idempotency::IdempotencyLayer;
use battlement::key::{ClientIp, RequestHead};
use battlement::lock::{HeldLock, LockLayer, LockManager};
use battlement::principal::Principal;
use battlement::rate_limit::{Quota, RateLimitLayer};
use battlement::reject::Rejection;
use battlement::trace::{RoutePolicy, TraceLayer};
use battlement::validate::{ParsedJson, ValidateLayer};
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use tracing::Level;

struct Config {
    bind: SocketAddr,
    redis_url: Option<String>,
    trusted_proxies: String,
    rate_limit_per_minute: u32,
    order_rate_limit_per_minute: u32,
    origin_delay: Duration,
    pay_delay: Duration,
    log_format: String,
    jwt_secret: Option<String>,
    jwt_issuer: String,
    jwt_audience: String,
}

/// The HS256 key used when `JWT_SECRET` is unset (a warning says so at start).
const DEV_SECRET: &str = "battlement-demo-dev-secret-change-me-0123456789";

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
            order_rate_limit_per_minute: var("ORDER_RATE_LIMIT_PER_MINUTE", 60),
            jwt_secret: std::env::var("JWT_SECRET")
                .ok()
                .filter(|s| !s.trim().is_empty()),
            jwt_issuer: var("JWT_ISSUER", "battlement-demo".to_string()),
            jwt_audience: var("JWT_AUDIENCE", "orders-api".to_string()),
            origin_delay: Duration::from_millis(var("ORIGIN_DELAY_MS", 20)),
            pay_delay: Duration::from_millis(var("PAY_DELAY_MS", 100)),
            log_format: var("LOG_FORMAT", "json".to_string()),
        };
        if config.rate_limit_per_minute == 0 {
            fail("RATE_LIMIT_PER_MINUTE", "must be at least 1");
        }
        if config.order_rate_limit_per_minute == 0 {
            fail("ORDER_RATE_LIMIT_PER_MINUTE", "must be at least 1");
        }
        if config.jwt_secret.as_ref().is_some_and(|s| s.len() < 32) {
            fail("JWT_SECRET", "must be at least 32 bytes for HS256");
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

/// `POST /products/{id}/purge` (scope `products:purge`): the next `GET /products/{id}`
/// goes to the origin, on this copy and, on Redis, on every other copy too (the purge
/// reaches their memory tiers through Redis pub/sub).
async fn purge_product(
    Extension(cache): Extension<CacheLayer>,
    Path(id): Path<String>,
) -> Response {
    if !valid_product_id(&id) {
        return problem(
            StatusCode::NOT_FOUND,
            "Not Found",
            "No product has this id.",
        );
    }
    cache.purge(&format!("/products/{id}"), None).await;
    StatusCode::NO_CONTENT.into_response()
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
    let per_subject = RateLimitLayer::builder()
        .name("per-subject")
        .policy(
            "orders-per-minute",
            Quota::requests_per(config.order_rate_limit_per_minute, Duration::from_secs(60)),
        )
        .key(battlement::key::Principal)
        .headers_on_success(true);

    let backend = Backend::connect(config.redis_url.as_deref()).await;
    let secret = config.jwt_secret.clone().unwrap_or_else(|| {
        eprintln!(
            "warning: JWT_SECRET is unset: using the public dev secret (never in production)"
        );
        DEV_SECRET.to_owned()
    });
    let jwt = JwtValidator::builder()
        .issuer(
            Issuer::new(config.jwt_issuer.as_str(), [config.jwt_audience.as_str()])
                .hmac_key(Algorithm::HS256, secret.as_bytes()),
        )
        .algorithms([Algorithm::HS256])
        .build()
        .unwrap_or_else(|e| fail("JWT_SECRET", e));
    let auth = AuthLayer::builder()
        .jwt(jwt)
        .realm("orders-api")
        .build()
        .expect("valid auth configuration");

    let origin_delay = config.origin_delay;
    // Cached (in memory, or in Redis shared by every copy): one origin call per product
    // per 30 s, however many ask at once.
    let product_cache = backend.cache();
    let products = Router::new()
        .route(
            "/products/{id}",
            get(move |path, headers| product(path, headers, origin_delay)),
        )
        .layer(product_cache.clone());
    let orders_state = OrderStore::new(&backend);
    // One payment per order at a time, across every copy of the service: the lock
    // `order:{id}` is held while paying; a request that cannot get it in 2 s gets a 503.
    let pay_lock = LockLayer::new(backend.locks(), |req| {
        let id = req
            .uri
            .path()
            .strip_prefix("/orders/")?
            .strip_suffix("/pay")?;
        Some(format!("order:{id}"))
    })
    .wait(Duration::from_secs(2));
    let create = backend.limit(
        Router::new().route(
            "/orders",
            post(create_order)
                .layer::<_, std::convert::Infallible>(order_validation())
                // A retried POST with the same `Idempotency-Key` places one order; the
                // retry gets the first 201 again (scoped to the token's subject).
                .layer::<_, std::convert::Infallible>(backend.idempotency())
                .layer(RequireScopes::all(["orders:write"]).realm("orders-api")),
        ),
        per_subject,
    );
    let orders = Router::new()
        .route(
            "/orders/{id}",
            get(get_order).layer(RequireScopes::all(["orders:read"]).realm("orders-api")),
        )
        .route(
            "/orders/{id}/pay",
            post(pay_order)
                .layer::<_, std::convert::Infallible>(pay_lock)
                .layer(RequireScopes::all(["orders:write"]).realm("orders-api")),
        )
        // An admin route: the product changed, drop it from the cache of every copy.
        .route(
            "/products/{id}/purge",
            post(purge_product)
                .layer::<_, std::convert::Infallible>(Extension(product_cache))
                .layer(RequireScopes::all(["products:purge"]).realm("orders-api")),
        )
        .merge(create)
        .layer(Extension(PayDelay(config.pay_delay)))
        .layer(auth)
        .with_state(orders_state);
    let limited = backend.limit(products.merge(orders), per_ip);

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
    println!(
        "battlement orders demo listening on http://{addr} (backend: {})",
        backend.name
    );
    println!("  curl -i http://{addr}/products/p-1");
    println!("  curl -i http://{addr}/healthz");
    if config.jwt_secret.is_none() {
        let writer = dev_token(&config, "dev-user", "orders:read orders:write");
        let reader = dev_token(&config, "dev-reader", "orders:read");
        println!("dev tokens (JWT_SECRET unset), valid for 24 h:");
        println!(
            "  curl -i -X POST http://{addr}/orders -H 'Authorization: Bearer {writer}' \\\n      -H 'Content-Type: application/json' -d '{{\"product_id\":\"p-1\",\"quantity\":2}}'"
        );
        println!("  curl -i http://{addr}/orders/ORDER_ID -H 'Authorization: Bearer {reader}'");
        let admin = dev_token(&config, "dev-admin", "products:purge");
        println!(
            "  curl -i -X POST http://{addr}/products/p-1/purge -H 'Authorization: Bearer {admin}'"
        );
    }
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

/// A dev token signed with the dev secret.
fn dev_token(config: &Config, subject: &str, scope: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
        + 24 * 3600;
    let claims = serde_json::json!({
        "iss": config.jwt_issuer, "aud": config.jwt_audience, "sub": subject,
        "exp": exp, "scope": scope,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(DEV_SECRET.as_bytes()),
    )
    .expect("a dev token")
}

/// Where shared state lives: this process, or Redis.
struct Backend {
    name: String,
    #[cfg(feature = "redis")]
    redis: Option<battlement::redis::RedisStore>,
}

impl Backend {
    #[cfg(feature = "redis")]
    async fn connect(url: Option<&str>) -> Self {
        use battlement::redis::{RedisConfig, RedisStore};
        let Some(url) = url else {
            return Self {
                name: "memory".into(),
                redis: None,
            };
        };
        let config = RedisConfig::from_list(url).unwrap_or_else(|e| fail("REDIS_URL", e));
        let store = RedisStore::connect(config)
            .await
            .unwrap_or_else(|e| fail("REDIS_URL", e));
        let config = store.config();
        let kind = if config.is_cluster() {
            "redis cluster"
        } else if config.is_sentinel() {
            "redis sentinel"
        } else {
            "redis"
        };
        Self {
            // No password in the log.
            name: format!("{kind} at {}", config.redacted_nodes().join(",")),
            redis: Some(store),
        }
    }

    #[cfg(not(feature = "redis"))]
    async fn connect(url: Option<&str>) -> Self {
        if url.is_some() {
            fail(
                "REDIS_URL",
                "this build has no Redis support: run with `cargo run --features redis --example orders`",
            );
        }
        Self {
            name: "memory".into(),
        }
    }

    /// `Idempotency-Key` records (24 h), on this backend.
    fn idempotency(&self) -> IdempotencyLayer {
        let builder = IdempotencyLayer::builder();
        #[cfg(feature = "redis")]
        let builder = match &self.redis {
            Some(store) => builder.redis(store.clone()),
            None => builder,
        };
        builder.build().expect("valid idempotency configuration")
    }

    /// The distributed locks, on this backend.
    fn locks(&self) -> LockManager {
        #[cfg(feature = "redis")]
        if let Some(store) = &self.redis {
            return LockManager::redis(store.clone());
        }
        LockManager::memory()
    }

    /// The product cache, on this backend.
    fn cache(&self) -> CacheLayer {
        #[cfg(feature = "redis")]
        if let Some(store) = &self.redis {
            return CacheLayer::builder().tiered(store.clone()).build();
        }
        CacheLayer::builder().build()
    }

    /// `router` behind the rate limit `builder` describes, on this backend.
    fn limit<S, X>(
        &self,
        router: Router<S>,
        builder: battlement::rate_limit::RateLimitBuilder<
            X,
            battlement::rate_limit::DefaultBackend,
        >,
    ) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
        X: battlement::key::KeyExtractor + Clone,
    {
        // axum's own body type in and out: nothing for `Router::layer` to box again.
        let builder = builder.native_body();
        #[cfg(feature = "redis")]
        if let Some(store) = &self.redis {
            let layer = builder
                .backend(battlement::rate_limit::RedisBackend::new(store.clone()))
                .build()
                .expect("valid rate limit");
            return router.layer(layer);
        }
        router.layer(builder.build().expect("valid rate limit"))
    }
}

// ---------------------------------------------------------------------------------------
// Orders.

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Order {
    id: String,
    product_id: String,
    quantity: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    status: String,
    owner: String,
    /// The fencing token of the last payment (a string: Lua's JSON would round a number
    /// this large); never shown to clients.
    #[serde(default, skip_serializing)]
    fence: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrder {
    product_id: String,
    quantity: u32,
    note: Option<String>,
}

/// Orders in this process, or in Redis (one JSON value per order) so that every copy of
/// the demo sees the same orders.
#[derive(Clone)]
enum OrderStore {
    Memory(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Order>>>),
    #[cfg(feature = "redis")]
    Redis(battlement::redis::RedisStore),
}

enum Paid {
    Now,
    Already,
    NotFound,
    /// A later lock holder already wrote: this holder's lease had run out.
    Stale,
}

/// Moves an order from `pending` to `paid` atomically.
#[cfg(feature = "redis")]
/// Fenced: a write whose fencing token is not above the last one seen is refused, as a
/// database would with `UPDATE ... WHERE fence < $1`.
const PAY_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then return -1 end
local order = cjson.decode(v)
if order.owner ~= ARGV[1] then return -1 end
if order.fence and tonumber(order.fence) >= tonumber(ARGV[2]) then return -2 end
order.fence = ARGV[2]
if order.status ~= 'pending' then
  redis.call('SET', KEYS[1], cjson.encode(order))
  return 0
end
order.status = 'paid'
redis.call('SET', KEYS[1], cjson.encode(order))
return 1
"#;

/// How long a payment takes (`PAY_DELAY_MS`).
#[derive(Clone, Copy)]
struct PayDelay(Duration);

impl OrderStore {
    fn new(backend: &Backend) -> Self {
        #[cfg(feature = "redis")]
        if let Some(store) = &backend.redis {
            return OrderStore::Redis(store.clone());
        }
        let _ = backend;
        OrderStore::Memory(Default::default())
    }

    async fn insert(&self, order: &Order) -> Result<(), String> {
        match self {
            OrderStore::Memory(map) => {
                map.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(order.id.clone(), order.clone());
                Ok(())
            }
            #[cfg(feature = "redis")]
            OrderStore::Redis(store) => {
                let key = store.key("order", &order.id);
                let value = serde_json::to_string(order).map_err(|e| e.to_string())?;
                store
                    .call(|mut conn| async move {
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(value)
                            .query_async::<()>(&mut conn)
                            .await
                    })
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    async fn get(&self, id: &str) -> Result<Option<Order>, String> {
        match self {
            OrderStore::Memory(map) => Ok(map
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(id)
                .cloned()),
            #[cfg(feature = "redis")]
            OrderStore::Redis(store) => {
                let key = store.key("order", &id);
                let value: Option<String> = store
                    .call(|mut conn| async move {
                        redis::cmd("GET").arg(&key).query_async(&mut conn).await
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                value
                    .map(|v| serde_json::from_str(&v).map_err(|e| e.to_string()))
                    .transpose()
            }
        }
    }

    async fn pay(&self, id: &str, owner: &str, fence: u64) -> Result<Paid, String> {
        match self {
            OrderStore::Memory(map) => {
                let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
                Ok(match map.get_mut(id) {
                    Some(order)
                        if order.owner == owner
                            && order
                                .fence
                                .as_deref()
                                .and_then(|f| f.parse::<u64>().ok())
                                .is_some_and(|last| last >= fence) =>
                    {
                        Paid::Stale
                    }
                    Some(order) if order.owner == owner => {
                        order.fence = Some(fence.to_string());
                        if order.status == "pending" {
                            order.status = "paid".into();
                            Paid::Now
                        } else {
                            Paid::Already
                        }
                    }
                    _ => Paid::NotFound,
                })
            }
            #[cfg(feature = "redis")]
            OrderStore::Redis(store) => {
                let key = store.key("order", &id);
                let script = battlement::redis::Script::new(PAY_SCRIPT);
                let outcome: i64 = store
                    .eval(
                        &script,
                        &[&key],
                        &[owner.as_bytes(), fence.to_string().as_bytes()],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(match outcome {
                    1 => Paid::Now,
                    0 => Paid::Already,
                    -2 => Paid::Stale,
                    _ => Paid::NotFound,
                })
            }
        }
    }
}

fn problem(status: StatusCode, title: &'static str, detail: &'static str) -> Response {
    let req = axum::http::Request::new(());
    Rejection::new(status, title)
        .with_detail(detail)
        .into_response::<axum::body::Body>(&RequestHead::of(&req))
        .into_response()
}

fn store_failed(error: String) -> Response {
    tracing::error!(%error, "order store failed");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Service Unavailable",
        "The order store is unavailable.",
    )
}

/// The body of `POST /orders`: checked by the validate layer before the handler runs.
fn order_validation() -> ValidateLayer {
    ValidateLayer::builder()
        .max_body(16 * 1024)
        .content_types(["application/json"])
        .schema(serde_json::json!({
            "type": "object",
            "properties": {
                "product_id": {
                    "type": "string", "minLength": 1, "maxLength": 64,
                    "pattern": "^[A-Za-z0-9_-]+$"
                },
                "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                "note": {"type": "string", "maxLength": 500}
            },
            "required": ["product_id", "quantity"],
            "additionalProperties": false
        }))
        .build()
        .expect("a valid order schema")
}

/// `POST /orders`: the body was validated and parsed by the layer.
async fn create_order(
    State(store): State<OrderStore>,
    Extension(who): Extension<Principal>,
    Extension(ParsedJson(body)): Extension<ParsedJson>,
) -> Response {
    let Ok(new) = NewOrder::deserialize(&*body) else {
        // The schema and the type agree; this is a bug if it happens.
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Unprocessable Content",
            "The body does not fit an order.",
        );
    };
    let order = Order {
        id: battlement::trace::RequestId::generate().to_string(),
        product_id: new.product_id,
        quantity: new.quantity,
        note: new.note,
        status: "pending".into(),
        owner: who.subject().to_owned(),
        fence: None,
    };
    match store.insert(&order).await {
        Ok(()) => (StatusCode::CREATED, Json(order)).into_response(),
        Err(e) => store_failed(e),
    }
}

/// `GET /orders/{id}`: only the owner sees it.
async fn get_order(
    State(store): State<OrderStore>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    match store.get(&id).await {
        Ok(Some(order)) if order.owner == who.subject() => {
            let mut res = Json(order).into_response();
            res.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-store"),
            );
            res
        }
        Ok(_) => problem(StatusCode::NOT_FOUND, "Not Found", "No such order."),
        Err(e) => store_failed(e),
    }
}

/// `POST /orders/{id}/pay`: `pending` to `paid`, once, under the lock `order:{id}` (the
/// lock layer put it in the extensions), fenced with its token.
async fn pay_order(
    State(store): State<OrderStore>,
    Extension(who): Extension<Principal>,
    Extension(lock): Extension<HeldLock>,
    Extension(PayDelay(delay)): Extension<PayDelay>,
    Path(id): Path<String>,
) -> Response {
    // The payment provider's latency. A lease lost meanwhile stops the payment here; the
    // fenced write below would refuse it anyway.
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = lock.lost() => return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable",
            "The payment lost its lock; retry.",
        ),
    }
    let fence = lock.fencing_token().value();
    match store.pay(&id, who.subject(), fence).await {
        Ok(Paid::Now) => Json(serde_json::json!({
            "id": id, "status": "paid", "fencing_token": fence,
        }))
        .into_response(),
        Ok(Paid::Stale) => problem(
            StatusCode::CONFLICT,
            "Conflict",
            "A later payment attempt already holds this order.",
        ),
        Ok(Paid::Already) => problem(
            StatusCode::CONFLICT,
            "Conflict",
            "The order is already paid.",
        ),
        Ok(Paid::NotFound) => problem(StatusCode::NOT_FOUND, "Not Found", "No such order."),
        Err(e) => store_failed(e),
    }
}
