//! Authorization: scopes required per route, and policy hooks for object-level checks.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use serde_json::Value;
use tower_layer::Layer;
use tower_service::Service;

use super::jwt::Registered;
use super::revoke::BoxFuture;
use super::{AuthFailure, Challenge, annotate, valid_realm};
use crate::body::ResponseBody;
use crate::key::RequestHead;
use crate::principal::Principal;

/// Where a token's scopes are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScopeClaim {
    /// The `scope` claim: a space-separated string (RFC 8693, RFC 9068), or an array.
    #[default]
    Scope,
    /// The `scp` claim (Azure AD, Okta): an array or a space-separated string.
    Scp,
    /// The `permissions` claim (Auth0 RBAC): an array.
    Permissions,
    /// `realm_access.roles` (Keycloak): an array.
    RealmRoles,
    /// A dotted path of your own, for example `["resource_access", "orders", "roles"]`.
    Path(Vec<String>),
}

impl ScopeClaim {
    /// The scopes of a token; none when the claim is absent or of another type. `raw` is
    /// the whole claims object, read only for a custom path.
    pub(crate) fn scopes(&self, registered: &Registered, raw: &[u8]) -> Vec<String> {
        let parsed;
        let value = match self {
            ScopeClaim::Scope => registered.scope.as_ref(),
            ScopeClaim::Scp => registered.scp.as_ref(),
            ScopeClaim::Permissions => registered.permissions.as_ref(),
            ScopeClaim::RealmRoles => registered
                .realm_access
                .as_ref()
                .and_then(|v| v.get("roles")),
            ScopeClaim::Path(path) => {
                parsed = serde_json::from_slice::<Value>(raw).unwrap_or(Value::Null);
                path.iter()
                    .try_fold(&parsed, |v, segment| v.get(segment.as_str()))
            }
        };
        match value {
            Some(Value::String(s)) => s.split_ascii_whitespace().map(str::to_owned).collect(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    All,
    Any,
}

/// Requires scopes of the [`Principal`] an auth layer outside it set: `403` with
/// `error="insufficient_scope"` and the required `scope` (gRPC `PERMISSION_DENIED`), or
/// `401` when there is no principal at all.
///
/// ```
/// use battlement::auth::RequireScopes;
/// use battlement::principal::{AuthScheme, Principal};
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use std::convert::Infallible;
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let service = ServiceBuilder::new()
///     .layer(RequireScopes::all(["orders:write"]))
///     .service_fn(|_req: Request<()>| async {
///         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"paid"))))
///     });
/// let reader = Principal::new("u1", AuthScheme::Bearer).with_scopes(["orders:read"]);
/// let res = service
///     .oneshot(Request::builder().extension(reader).body(()).unwrap())
///     .await
///     .unwrap();
/// assert_eq!(res.status(), StatusCode::FORBIDDEN);
/// assert!(res.headers()["www-authenticate"].to_str().unwrap().contains("scope=\"orders:write\""));
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RequireScopes {
    inner: Arc<ScopeRule>,
}

#[derive(Debug)]
struct ScopeRule {
    scopes: Vec<String>,
    joined: String,
    mode: Mode,
    realm: String,
}

impl RequireScopes {
    fn new<I, T>(scopes: I, mode: Mode) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let scopes: Vec<String> = scopes.into_iter().map(Into::into).collect();
        Self {
            inner: Arc::new(ScopeRule {
                joined: scopes.join(" "),
                scopes,
                mode,
                realm: "api".to_owned(),
            }),
        }
    }

    /// Requires every one of `scopes`.
    pub fn all<I, T>(scopes: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        Self::new(scopes, Mode::All)
    }

    /// Requires at least one of `scopes`.
    pub fn any<I, T>(scopes: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        Self::new(scopes, Mode::Any)
    }

    /// The realm named in challenges (default `api`). A realm that cannot be quoted in a
    /// header is ignored.
    #[must_use]
    pub fn realm(self, realm: &str) -> Self {
        if !valid_realm(realm) {
            return self;
        }
        let rule = &self.inner;
        Self {
            inner: Arc::new(ScopeRule {
                scopes: rule.scopes.clone(),
                joined: rule.joined.clone(),
                mode: rule.mode,
                realm: realm.to_owned(),
            }),
        }
    }

    fn allows(&self, principal: &Principal) -> bool {
        let rule = &self.inner;
        match rule.mode {
            Mode::All => rule.scopes.iter().all(|s| principal.has_scope(s)),
            Mode::Any => rule.scopes.iter().any(|s| principal.has_scope(s)),
        }
    }
}

impl<S> Layer<S> for RequireScopes {
    type Service = RequireScopesService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireScopesService {
            inner,
            rule: self.clone(),
        }
    }
}

/// The service made by [`RequireScopes`].
#[derive(Clone, Debug)]
pub struct RequireScopesService<S> {
    inner: S,
    rule: RequireScopes,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequireScopesService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ScopeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let failure = match Principal::of(req.extensions()) {
            None => AuthFailure::Missing,
            Some(p) if self.rule.allows(p) => {
                return ScopeFuture::inner(self.inner.call(req));
            }
            Some(_) => AuthFailure::InsufficientScope,
        };
        annotate(req.extensions(), None, Some(failure));
        let rule = &self.rule.inner;
        let rejection = failure.rejection(&rule.realm, Challenge::Bearer, Some(&rule.joined));
        ScopeFuture::refused(rejection.render(&RequestHead::of(&req)))
    }
}

pin_project! {
    /// The response future of [`RequireScopesService`].
    pub struct ScopeFuture<F> {
        #[pin]
        state: ScopeState<F>,
    }
}

pin_project! {
    #[project = ScopeStateProj]
    enum ScopeState<F> {
        Inner { #[pin] future: F },
        Refused { response: Option<Response<Bytes>> },
    }
}

impl<F> ScopeFuture<F> {
    fn inner(future: F) -> Self {
        Self {
            state: ScopeState::Inner { future },
        }
    }

    fn refused(response: Response<Bytes>) -> Self {
        Self {
            state: ScopeState::Refused {
                response: Some(response),
            },
        }
    }
}

impl<F> fmt::Debug for ScopeFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopeFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ScopeFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            ScopeStateProj::Inner { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            ScopeStateProj::Refused { response } => Poll::Ready(Ok(response
                .take()
                .expect("ScopeFuture polled after completion")
                .map(ResponseBody::full))),
        }
    }
}

/// An object-level authorization check: sees the request and the principal, answers
/// whether the request may go on. Implemented for async closures
/// `Fn(&RequestHead<'_>, &Principal) -> impl Future<Output = bool>`; the future must own
/// what it needs (clone from the head).
pub trait Policy: Send + Sync + 'static {
    /// Whether `principal` may make `request`.
    fn allows(&self, request: &RequestHead<'_>, principal: &Principal) -> BoxFuture<'static, bool>;
}

impl<F, Fut> Policy for F
where
    F: Fn(&RequestHead<'_>, &Principal) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    fn allows(&self, request: &RequestHead<'_>, principal: &Principal) -> BoxFuture<'static, bool> {
        Box::pin(self(request, principal))
    }
}

/// Runs a [`Policy`] for every request that has a [`Principal`]: `403` (gRPC
/// `PERMISSION_DENIED`) when it says no, `401` when there is no principal.
///
/// ```
/// use battlement::auth::Authorize;
/// use battlement::key::RequestHead;
/// use battlement::principal::Principal;
///
/// // Only the owner may touch /accounts/{subject}/...
/// let owner_only = Authorize::new(|req: &RequestHead<'_>, who: &Principal| {
///     let allowed = req.uri.path().starts_with(&format!("/accounts/{}/", who.subject()));
///     async move { allowed }
/// });
/// # let _ = owner_only;
/// ```
#[derive(Clone)]
pub struct Authorize {
    policy: Arc<dyn Policy>,
}

impl fmt::Debug for Authorize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorize").finish_non_exhaustive()
    }
}

impl Authorize {
    /// A layer running `policy`.
    pub fn new(policy: impl Policy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for Authorize {
    type Service = AuthorizeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthorizeService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service made by [`Authorize`].
#[derive(Clone)]
pub struct AuthorizeService<S> {
    inner: S,
    policy: Arc<dyn Policy>,
}

impl<S: fmt::Debug> fmt::Debug for AuthorizeService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizeService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthorizeService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let check =
            Principal::of(req.extensions()).map(|p| self.policy.allows(&RequestHead::of(&req), p));
        // The service made ready goes with the request; a clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let failure = match check {
                None => AuthFailure::Missing,
                Some(check) => {
                    if check.await {
                        let response = inner.call(req).await?;
                        return Ok(response.map(ResponseBody::inner));
                    }
                    AuthFailure::Forbidden
                }
            };
            annotate(req.extensions(), None, Some(failure));
            let rejection = failure.rejection("api", Challenge::Bearer, None);
            Ok(rejection.into_response(&RequestHead::of(&req)))
        })
    }
}
