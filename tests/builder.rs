//! The whole stack through `ServiceBuilderExt`, in the order the README's guide gives.

#![cfg(all(
    feature = "trace",
    feature = "rate-limit",
    feature = "auth",
    feature = "validate",
    feature = "lock",
    feature = "idempotency",
    feature = "axum"
))]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use battlement::ServiceBuilderExt;
use battlement::annotate::{Annotation, LockOutcome};
use battlement::auth::{AuthLayer, Issuer, JwtValidator, RequireScopes};
use battlement::idempotency::IdempotencyLayer;
use battlement::key::Global;
use battlement::lock::{HeldLock, LockLayer, LockManager};
use battlement::rate_limit::{Quota, RateLimitLayer};
use battlement::trace::TraceLayer;
use battlement::validate::ValidateLayer;
use http::{Request, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use tower::{ServiceBuilder, ServiceExt};

const SECRET: &[u8] = b"builder-test-secret-0123456789abcdef";

fn token(scope: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "iss", "aud": "aud", "sub": "user-1", "exp": now + 600, "scope": scope,
    });
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

#[tokio::test]
async fn every_layer_stacks_through_service_builder() {
    let auth = AuthLayer::builder()
        .jwt(
            JwtValidator::builder()
                .issuer(Issuer::new("iss", ["aud"]).hmac_key(Algorithm::HS256, SECRET))
                .algorithms([Algorithm::HS256])
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let handler = Router::new().route(
        "/orders",
        post(|lock: axum::Extension<HeldLock>| async move {
            (
                StatusCode::CREATED,
                format!("fence {}", lock.fencing_token()),
            )
        }),
    );
    let svc = ServiceBuilder::new()
        .trace(TraceLayer::builder().build().unwrap())
        .limit_requests(
            RateLimitLayer::builder()
                .policy("burst", Quota::requests_per(5, Duration::from_secs(60)))
                .key(Global)
                .build()
                .unwrap(),
        )
        .auth(auth)
        .require_scopes(RequireScopes::all(["orders:write"]))
        .idempotency(IdempotencyLayer::builder().build().unwrap())
        .validate(
            ValidateLayer::builder()
                .content_types(["application/json"])
                .schema(serde_json::json!({"type": "object", "required": ["qty"]}))
                .build()
                .unwrap(),
        )
        .lock(LockLayer::new(LockManager::memory(), |_| {
            Some("orders".into())
        }))
        .service(handler);

    let order = |token: Option<&str>, body: &'static str| {
        let mut req = Request::post("/orders")
            .header("content-type", "application/json")
            .header("idempotency-key", "\"k-1\"");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let mut req = req.body(Body::from(body)).unwrap();
        let annotation = Annotation::new();
        req.extensions_mut().insert(annotation.clone());
        (req, annotation)
    };

    let (req, _) = order(None, r#"{"qty":1}"#);
    assert_eq!(
        svc.clone().oneshot(req).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let (req, _) = order(Some(&token("orders:read")), r#"{"qty":1}"#);
    assert_eq!(
        svc.clone().oneshot(req).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let (req, _) = order(Some(&token("orders:write")), r#"{"other":1}"#);
    assert_eq!(
        svc.clone().oneshot(req).await.unwrap().status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // The 422's body was never read: its record was released, so the key is free again.
    let (req, annotation) = order(Some(&token("orders:write")), r#"{"qty":1}"#);
    let first = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let body = http_body_util::BodyExt::collect(first.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(body.starts_with(b"fence "), "{body:?}");
    let record = annotation.snapshot();
    assert_eq!(record.lock.map(|l| l.outcome), Some(LockOutcome::Acquired));
    assert!(record.auth.and_then(|a| a.subject).is_some());
    assert_eq!(record.rate_limits.len(), 1);
    assert!(record.idempotency.is_some(), "the idempotency layer ran");

    // The retry is replayed (the handler, and the lock, are not involved).
    let (req, annotation) = order(Some(&token("orders:write")), r#"{"qty":1}"#);
    let replay = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert!(annotation.snapshot().lock.is_none());

    // The shared limit of 5 is spent: the next request is refused before auth runs.
    let (req, _) = order(None, r#"{"qty":1}"#);
    assert_eq!(
        svc.clone().oneshot(req).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}
