//! Authentication in one page: JWT bearer tokens with a required scope, and the RFC 6750
//! refusals. Runs in-process and prints each answer.
//!
//! ```text
//! cargo run --example auth
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::routing::get;
use axum::{Extension, Router};
use battlement::auth::{AuthLayer, Issuer, JwtValidator, RequireScopes};
use battlement::principal::Principal;
use http::Request;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tower::ServiceExt;

const SECRET: &[u8] = b"battlement-auth-example-secret-0123456789";

fn token(scope: &str, audience: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = serde_json::json!({
        "iss": "https://issuer.example", "aud": audience, "sub": "user-7", "exp": exp,
        "scope": scope,
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

#[tokio::main]
async fn main() {
    // The builder refuses a validator without issuer, audience or algorithm allowlist.
    let jwt = JwtValidator::builder()
        .issuer(
            Issuer::new("https://issuer.example", ["reports-api"])
                .hmac_key(Algorithm::HS256, SECRET),
        )
        .algorithms([Algorithm::HS256])
        .build()
        .expect("a valid validator");
    let app = Router::new()
        .route(
            "/reports",
            get(|Extension(who): Extension<Principal>| async move {
                format!("reports for {}", who.subject())
            })
            .layer(RequireScopes::all(["reports:read"]).realm("reports-api")),
        )
        .layer(
            AuthLayer::builder()
                .jwt(jwt)
                .realm("reports-api")
                .build()
                .expect("valid auth"),
        );

    let mut statuses = Vec::new();
    for (label, authorization) in [
        ("no token", None),
        (
            "token for another audience",
            Some(token("reports:read", "billing-api")),
        ),
        (
            "token without the scope",
            Some(token("profile", "reports-api")),
        ),
        ("good token", Some(token("reports:read", "reports-api"))),
    ] {
        let mut req = Request::get("/reports");
        if let Some(t) = &authorization {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let res = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
        println!(
            "{label:28} -> {} {}",
            res.status(),
            res.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        );
    }
    assert_eq!(statuses, [401, 401, 403, 200]);
}
