//! Request validation in one page: a JSON Schema, and what bad bodies get (every
//! violation, values never echoed). Runs in-process and prints each answer.
//!
//! ```text
//! cargo run --example validate
//! ```

use axum::body::Body;
use axum::routing::post;
use axum::{Extension, Router};
use battlement::validate::{ParsedJson, ValidateLayer};
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

#[tokio::main]
async fn main() {
    let layer = ValidateLayer::builder()
        .max_body(1024)
        .content_types(["application/json"])
        .schema(serde_json::json!({
            "type": "object",
            "properties": {
                "sku": {"type": "string", "maxLength": 16, "pattern": "^[A-Z0-9-]{3,16}$"},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 10}
            },
            "required": ["sku", "quantity"],
            "additionalProperties": false
        }))
        .build()
        .expect("a valid schema");
    // The handler gets the body parsed once, by the layer.
    let app = Router::new()
        .route(
            "/cart",
            post(
                |Extension(ParsedJson(body)): Extension<ParsedJson>| async move {
                    format!("added {} x {}", body["quantity"], body["sku"])
                },
            ),
        )
        .layer(layer);

    let mut statuses = Vec::new();
    for (label, content_type, body) in [
        (
            "valid",
            "application/json",
            r#"{"sku":"AB-12","quantity":2}"#,
        ),
        (
            "schema violations",
            "application/json",
            r#"{"sku":"bad sku!","quantity":99,"x":1}"#,
        ),
        ("malformed JSON", "application/json", r#"{"sku":"AB-12","#),
        ("wrong media type", "text/plain", "sku=AB-12"),
    ] {
        let req = Request::post("/cart")
            .header("content-type", content_type)
            .body(Body::from(body))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        statuses.push(status.as_u16());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        println!("{label:18} -> {status} {}", String::from_utf8_lossy(&body));
    }
    assert_eq!(statuses, [200, 422, 400, 415]);
}
