//! [`Principal`]: who the request is.
//!
//! Authentication layers put a [`Principal`] into the request extensions; handlers read it,
//! and the other layers key on it (`key::Principal` for per-user rate limits, per-user cache
//! scope, idempotency scope) without depending on how the caller authenticated.
//!
//! ```
//! use battlement::principal::{AuthScheme, Principal};
//!
//! let who = Principal::new("user-42", AuthScheme::Bearer)
//!     .with_issuer("https://id.example")
//!     .with_scopes(["orders:read", "orders:write"]);
//! assert_eq!(who.subject(), "user-42");
//! assert!(who.has_scope("orders:write"));
//! assert!(!who.has_scope("admin"));
//!
//! let mut req = http::Request::new(());
//! req.extensions_mut().insert(who);
//! assert!(Principal::of(req.extensions()).is_some());
//! ```

use std::fmt;
use std::sync::Arc;

use http::Extensions;

/// How a principal authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthScheme {
    /// A bearer token (JWT).
    Bearer,
    /// An API key.
    ApiKey,
    /// Something the application authenticated itself.
    Custom,
}

/// An authenticated caller: subject, issuer, scopes and scheme. Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct Principal {
    subject: Arc<str>,
    issuer: Option<Arc<str>>,
    scopes: Arc<[Box<str>]>,
    scheme: AuthScheme,
}

impl Principal {
    /// A principal with `subject`, no issuer and no scopes.
    pub fn new(subject: impl Into<Arc<str>>, scheme: AuthScheme) -> Self {
        Self {
            subject: subject.into(),
            issuer: None,
            scopes: Arc::from(Vec::new()),
            scheme,
        }
    }

    /// Sets the issuer.
    #[must_use]
    pub fn with_issuer(mut self, issuer: impl Into<Arc<str>>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// Sets the scopes.
    #[must_use]
    pub fn with_scopes<I, T>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<Box<str>>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// The principal in `extensions`, if an auth layer put one there.
    pub fn of(extensions: &Extensions) -> Option<&Principal> {
        extensions.get::<Principal>()
    }

    /// The subject (`sub` claim, API key owner, ...).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The subject as a shared string (no copy).
    pub fn subject_arc(&self) -> &Arc<str> {
        &self.subject
    }

    /// The issuer, if any.
    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }

    /// The granted scopes.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scopes.iter().map(|s| s.as_ref())
    }

    /// Whether `scope` was granted.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s.as_ref() == scope)
    }

    /// How the principal authenticated.
    pub fn scheme(&self) -> AuthScheme {
        self.scheme
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("subject", &self.subject)
            .field("issuer", &self.issuer)
            .field("scopes", &self.scopes)
            .field("scheme", &self.scheme)
            .finish()
    }
}
