//! Request validation through the layer against a handler that does the same work itself,
//! in the same run.
//!
//! - `layer`: `ValidateLayer` (16 MiB limit, `application/json`, the schema below) and a
//!   handler that reads the parsed value (`ParsedJson`).
//! - `handler`: no layer; the handler collects the body, parses it with
//!   `serde_json::from_slice::<Value>` and validates it with a `jsonschema` validator built
//!   once (`jsonschema::validator_for`), as an application would without battlement.
//!
//! Both answer the same 2-byte body from the parsed `quantity`. The layer also checks depth,
//! sizes, duplicate keys and numbers, which the handler path does not. Bodies of about
//! 1.4 KB, 14 KB and 140 KB: an order with 20, 250 and 2,550 lines.
//!
//! The `parts` group measures the pieces on the 14 KB body: the layer's limited parse against
//! `serde_json::from_slice::<Value>`, and schema validation with each regex engine.
//!
//! Run with `cargo bench --all-features --bench validate`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Extension;
use axum::routing::post;
use battlement::validate::{ParsedJson, ValidateLayer};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "product_id": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_-]+$"},
            "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
            "note": {"type": "string", "maxLength": 500},
            "lines": {
                "type": "array",
                "maxItems": 10000,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 32, "pattern": "^[A-Z0-9-]+$"},
                        "qty": {"type": "integer", "minimum": 1},
                        "price": {"type": "number", "minimum": 0}
                    },
                    "required": ["sku", "qty", "price"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["product_id", "quantity"],
        "additionalProperties": false
    })
}

fn body(lines: usize) -> Bytes {
    let lines: Vec<Value> = (0..lines)
        .map(|i| json!({"sku": format!("SKU-{i:06}-XL"), "qty": i % 7 + 1, "price": 19.99 + i as f64}))
        .collect();
    let order = json!({
        "product_id": "p-12345",
        "quantity": 42,
        "note": "Please leave the parcel with the neighbour at number 12 if nobody answers.",
        "lines": lines,
    });
    Bytes::from(serde_json::to_vec(&order).unwrap())
}

fn layer_app() -> Router {
    let validate = ValidateLayer::builder()
        .max_body(16 * 1024 * 1024)
        .content_types(["application/json"])
        .schema(schema())
        .build()
        .unwrap();
    Router::new()
        .route(
            "/orders",
            post(
                |Extension(ParsedJson(v)): Extension<ParsedJson>| async move {
                    v["quantity"].to_string()
                },
            ),
        )
        .layer(validate)
}

fn handler_app() -> Router {
    let validator = Arc::new(jsonschema::validator_for(&schema()).unwrap());
    Router::new().route(
        "/orders",
        post(move |body: Bytes| {
            let validator = validator.clone();
            async move {
                let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                    return (StatusCode::BAD_REQUEST, String::new());
                };
                if !validator.is_valid(&v) {
                    return (StatusCode::UNPROCESSABLE_ENTITY, String::new());
                }
                (StatusCode::OK, v["quantity"].to_string())
            }
        }),
    )
}

async fn roundtrip(app: &Router, body: &Bytes) {
    let req = Request::post("/orders")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Body::from(body.clone()))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let out = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(out, "42");
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("validate");
    for lines in [20usize, 250, 2550] {
        let body = body(lines);
        group.throughput(Throughput::Bytes(body.len() as u64));
        for (name, app) in [("layer", layer_app()), ("handler", handler_app())] {
            rt.block_on(roundtrip(&app, &body));
            group.bench_with_input(BenchmarkId::new(name, body.len()), &body, |b, body| {
                b.to_async(&rt).iter(|| roundtrip(&app, body))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches, parts_group);

fn parts(c: &mut Criterion) {
    let body = body(250);
    let mut group = c.benchmark_group("parts");
    let limits = battlement::validate::JsonLimits::default();
    group.bench_function("limits_parse", |b| b.iter(|| limits.parse(&body).unwrap()));
    group.bench_function("serde_value", |b| {
        b.iter(|| serde_json::from_slice::<Value>(&body).unwrap())
    });
    let v: Value = serde_json::from_slice(&body).unwrap();
    let fancy = jsonschema::validator_for(&schema()).unwrap();
    let linear = jsonschema::options()
        .with_pattern_options(jsonschema::PatternOptions::regex())
        .build(&schema())
        .unwrap();
    group.bench_function("is_valid_fancy", |b| b.iter(|| fancy.is_valid(&v)));
    group.bench_function("is_valid_regex", |b| b.iter(|| linear.is_valid(&v)));
    group.finish();
}

criterion_group!(parts_group, parts);
