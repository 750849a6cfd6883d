//! The layers on a tonic gRPC server, and a tonic client that meets each refusal as the
//! gRPC status it is.
//!
//! ```text
//! cargo run --example grpc
//! ```
//!
//! The server is the standard gRPC health service (`tonic-health`, no protoc needed) behind
//! request logging, bearer-token authentication, a required scope and a per-subject rate
//! limit of 3 calls a minute. The client then calls it:
//!
//! | call | status |
//! |---|---|
//! | no token | `UNAUTHENTICATED` (with `www-authenticate` metadata) |
//! | a token without the `health:read` scope | `PERMISSION_DENIED` |
//! | two `authorization` values | `INVALID_ARGUMENT` |
//! | a good token, 3 times | `OK` |
//! | the same token a 4th time | `RESOURCE_EXHAUSTED` (with `grpc-retry-pushback-ms`) |
//! | another subject, twice with one `idempotency-key` | `OK`, then `OK` replayed (`idempotent-replayed: true`) |
//!
//! Every refusal is a trailers-only response that tonic reads as a `Status`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use battlement::ServiceBuilderExt;
use battlement::auth::{AuthLayer, Issuer, JwtValidator, RequireScopes};
use battlement::idempotency::IdempotencyLayer;
use battlement::rate_limit::{Quota, RateLimitLayer};
use battlement::trace::TraceLayer;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tonic::transport::Endpoint;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;

const SECRET: &[u8] = b"battlement-grpc-example-secret-0123456789";

fn token(subject: &str, scope: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
        + 600;
    let claims = serde_json::json!({
        "iss": "battlement-example", "aud": "health-api", "sub": subject,
        "exp": exp, "scope": scope,
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .expect("a signed token")
}

fn check(authorization: &[&str]) -> tonic::Request<HealthCheckRequest> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    for value in authorization {
        req.metadata_mut()
            .append("authorization", value.parse().expect("ascii metadata"));
    }
    req
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_span_list(false)
        .with_writer(std::io::stderr)
        .init();

    let jwt = JwtValidator::builder()
        .issuer(
            Issuer::new("battlement-example", ["health-api"]).hmac_key(Algorithm::HS256, SECRET),
        )
        .algorithms([Algorithm::HS256])
        .build()
        .expect("valid validator");
    let stack = ServiceBuilder::new()
        .trace(TraceLayer::builder().build().expect("valid trace layer"))
        .auth(
            AuthLayer::builder()
                .jwt(jwt)
                .realm("health-api")
                .build()
                .expect("valid auth layer"),
        )
        .require_scopes(RequireScopes::all(["health:read"]).realm("health-api"))
        // After auth: one budget per token subject.
        .limit_requests(
            RateLimitLayer::builder()
                .policy(
                    "per-minute",
                    Quota::requests_per(3, Duration::from_secs(60)),
                )
                .key(battlement::key::Principal)
                .build()
                .expect("valid rate limit"),
        )
        // A call retried with the same `idempotency-key` metadata gets the first answer
        // again, trailers (`grpc-status`) included.
        .idempotency(
            IdempotencyLayer::builder()
                .build()
                .expect("valid idempotency layer"),
        )
        .into_inner();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("bound address");
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(stack)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .expect("the gRPC server runs");
    });
    println!("gRPC health service behind battlement on {addr}");

    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid endpoint")
        .connect()
        .await
        .expect("connect to the server");
    let mut client = HealthClient::new(channel);
    let reader = format!("Bearer {}", token("alice", "health:read"));
    let other = format!("Bearer {}", token("bob", "metrics:read"));

    let mut calls: Vec<(&str, tonic::Request<HealthCheckRequest>)> = vec![
        ("no token", check(&[])),
        ("a token without health:read", check(&[&other])),
        ("two authorization values", check(&[&reader, &reader])),
    ];
    for i in 1..=4 {
        let label: &str = match i {
            1 => "a good token, call 1",
            2 => "a good token, call 2",
            3 => "a good token, call 3",
            _ => "a good token, call 4",
        };
        calls.push((label, check(&[&reader])));
    }
    let carol = format!("Bearer {}", token("carol", "health:read"));
    for label in ["idempotent call", "idempotent call, retried"] {
        let mut request = check(&[&carol]);
        request
            .metadata_mut()
            .insert("idempotency-key", "\"check-1\"".parse().expect("ascii"));
        calls.push((label, request));
    }
    for (label, request) in calls {
        match client.check(request).await {
            Ok(response) => {
                let replayed = match response.metadata().get("idempotent-replayed") {
                    Some(_) => " idempotent-replayed: true",
                    None => "",
                };
                println!(
                    "{label:32} -> OK ({:?}){replayed}",
                    response.get_ref().status()
                );
            }
            Err(status) => {
                let extra = ["www-authenticate", "grpc-retry-pushback-ms"]
                    .iter()
                    .filter_map(|k| {
                        status
                            .metadata()
                            .get(*k)
                            .and_then(|v| v.to_str().ok())
                            .map(|v| format!(" {k}: {v}"))
                    })
                    .collect::<String>();
                println!(
                    "{label:32} -> {:?}: {}{extra}",
                    status.code(),
                    status.message()
                );
            }
        }
    }
}
