//! [`ServiceBuilderExt`]: the layers as methods of tower's `ServiceBuilder`, so a stack reads
//! in the order requests go through it.
//!
//! ```
//! use battlement::ServiceBuilderExt;
//! use battlement::rate_limit::{Quota, RateLimitLayer};
//! use battlement::trace::TraceLayer;
//! use http::{Request, Response};
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new()
//!     // Outermost: it sees every request and every other layer's decision.
//!     .trace(TraceLayer::builder().build().unwrap())
//!     .limit_requests(
//!         RateLimitLayer::builder()
//!             .policy("per-minute", Quota::requests_per(600, Duration::from_secs(60)))
//!             .key(battlement::key::Global)
//!             .build()
//!             .unwrap(),
//!     )
//!     .service_fn(|_req: Request<String>| async {
//!         Ok::<_, Infallible>(Response::new(String::from("hello")))
//!     });
//! let res = svc.oneshot(Request::new(String::new())).await.unwrap();
//! assert_eq!(res.status(), 200);
//! # }
//! ```

use tower::ServiceBuilder;
// Unused only in a build with no layer enabled.
#[allow(unused_imports)]
use tower::layer::util::Stack;

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// Adds battlement's layers to [`tower::ServiceBuilder`] as named methods (as tower-http's
/// own `ServiceBuilderExt` does). Each method takes the built layer and adds it below the
/// ones already there: the first call is the outermost layer.
pub trait ServiceBuilderExt<L>: sealed::Sealed + Sized {
    /// Adds a [`TraceLayer`](crate::trace::TraceLayer): put it first (outermost).
    #[cfg(feature = "trace")]
    fn trace(
        self,
        layer: crate::trace::TraceLayer,
    ) -> ServiceBuilder<Stack<crate::trace::TraceLayer, L>>;

    /// Adds a [`RateLimitLayer`](crate::rate_limit::RateLimitLayer). (Not `rate_limit`:
    /// tower's `ServiceBuilder` has an inherent method of that name, which would win.)
    #[cfg(feature = "rate-limit")]
    fn limit_requests<X, Bk, M>(
        self,
        layer: crate::rate_limit::RateLimitLayer<X, Bk, M>,
    ) -> ServiceBuilder<Stack<crate::rate_limit::RateLimitLayer<X, Bk, M>, L>>;

    /// Adds an [`AuthLayer`](crate::auth::AuthLayer).
    #[cfg(feature = "auth")]
    fn auth(
        self,
        layer: crate::auth::AuthLayer,
    ) -> ServiceBuilder<Stack<crate::auth::AuthLayer, L>>;

    /// Adds a [`RequireScopes`](crate::auth::RequireScopes) check (below `auth`).
    #[cfg(feature = "auth")]
    fn require_scopes(
        self,
        layer: crate::auth::RequireScopes,
    ) -> ServiceBuilder<Stack<crate::auth::RequireScopes, L>>;

    /// Adds a [`ValidateLayer`](crate::validate::ValidateLayer).
    #[cfg(feature = "validate")]
    fn validate(
        self,
        layer: crate::validate::ValidateLayer,
    ) -> ServiceBuilder<Stack<crate::validate::ValidateLayer, L>>;

    /// Adds a [`CacheLayer`](crate::cache::CacheLayer).
    #[cfg(feature = "cache")]
    fn cache(
        self,
        layer: crate::cache::CacheLayer,
    ) -> ServiceBuilder<Stack<crate::cache::CacheLayer, L>>;

    /// Adds a [`LockLayer`](crate::lock::LockLayer).
    #[cfg(feature = "lock")]
    fn lock(
        self,
        layer: crate::lock::LockLayer,
    ) -> ServiceBuilder<Stack<crate::lock::LockLayer, L>>;

    /// Adds an [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) (below `auth`, so
    /// keys are scoped by the principal).
    #[cfg(feature = "idempotency")]
    fn idempotency(
        self,
        layer: crate::idempotency::IdempotencyLayer,
    ) -> ServiceBuilder<Stack<crate::idempotency::IdempotencyLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "trace")]
    fn trace(
        self,
        layer: crate::trace::TraceLayer,
    ) -> ServiceBuilder<Stack<crate::trace::TraceLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "rate-limit")]
    fn limit_requests<X, Bk, M>(
        self,
        layer: crate::rate_limit::RateLimitLayer<X, Bk, M>,
    ) -> ServiceBuilder<Stack<crate::rate_limit::RateLimitLayer<X, Bk, M>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "auth")]
    fn auth(
        self,
        layer: crate::auth::AuthLayer,
    ) -> ServiceBuilder<Stack<crate::auth::AuthLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "auth")]
    fn require_scopes(
        self,
        layer: crate::auth::RequireScopes,
    ) -> ServiceBuilder<Stack<crate::auth::RequireScopes, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "validate")]
    fn validate(
        self,
        layer: crate::validate::ValidateLayer,
    ) -> ServiceBuilder<Stack<crate::validate::ValidateLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "cache")]
    fn cache(
        self,
        layer: crate::cache::CacheLayer,
    ) -> ServiceBuilder<Stack<crate::cache::CacheLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "lock")]
    fn lock(
        self,
        layer: crate::lock::LockLayer,
    ) -> ServiceBuilder<Stack<crate::lock::LockLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "idempotency")]
    fn idempotency(
        self,
        layer: crate::idempotency::IdempotencyLayer,
    ) -> ServiceBuilder<Stack<crate::idempotency::IdempotencyLayer, L>> {
        self.layer(layer)
    }
}
