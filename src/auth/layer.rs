//! [`AuthLayer`] and its builder.

use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use http::Extensions;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tower_layer::Layer;

use super::api_key::ApiKeys;
use super::jwt::JwtValidator;
use super::service::Auth;
use super::{AuthFailure, Challenge, ConfigError, valid_realm};
use crate::key::RequestHead;

/// Every claim of a verified token, in the request extensions for handlers. The claims are
/// kept as the token's JSON and decoded on first use (the validator itself decodes only the
/// claims it checks).
///
/// ```
/// use battlement::auth::Claims;
///
/// let claims = Claims::from_json(r#"{"sub": "u1", "tenant": "acme"}"#);
/// assert_eq!(claims.get("tenant").and_then(|v| v.as_str()), Some("acme"));
///
/// #[derive(serde::Deserialize)]
/// struct Mine { tenant: String }
/// assert_eq!(claims.deserialize::<Mine>().unwrap().tenant, "acme");
/// ```
#[derive(Clone)]
pub struct Claims {
    raw: Bytes,
    parsed: Arc<OnceLock<Value>>,
}

impl fmt::Debug for Claims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claims")
            .field("bytes", &self.raw.len())
            .finish_non_exhaustive()
    }
}

impl Claims {
    /// Claims from a JSON object.
    pub fn from_json(json: impl Into<Bytes>) -> Self {
        Self {
            raw: json.into(),
            parsed: Arc::default(),
        }
    }

    /// The claims as a JSON value (`Null` if they are not JSON), decoded once.
    pub fn value(&self) -> &Value {
        self.parsed
            .get_or_init(|| serde_json::from_slice(&self.raw).unwrap_or(Value::Null))
    }

    /// The claim `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.value().get(name)
    }

    /// The claims as your own type, decoded from the JSON.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.raw)
    }

    /// The claims' JSON, as the token carried it.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }
}

type CustomSource = dyn Fn(&RequestHead<'_>) -> Option<String> + Send + Sync;
type ClaimsInserter = dyn Fn(&Claims, &mut Extensions) -> bool + Send + Sync;

/// Where a bearer token may be found. A request carrying one in more than one place is
/// refused with `400 invalid_request`.
#[derive(Clone)]
#[non_exhaustive]
pub enum TokenSource {
    /// `Authorization: Bearer <token>` (the scheme name in any case).
    Bearer,
    /// A cookie of this name.
    Cookie(String),
    /// A function of your own.
    Custom(Arc<CustomSource>),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Bearer => f.write_str("Bearer"),
            TokenSource::Cookie(name) => f.debug_tuple("Cookie").field(name).finish(),
            TokenSource::Custom(_) => f.write_str("Custom"),
        }
    }
}

pub(crate) struct Shared {
    pub(crate) jwt: Option<Arc<JwtValidator>>,
    pub(crate) api_keys: Option<ApiKeys>,
    pub(crate) sources: Vec<TokenSource>,
    pub(crate) realm: String,
    pub(crate) optional: bool,
    pub(crate) claims: Option<Arc<ClaimsInserter>>,
}

impl Shared {
    pub(crate) fn challenge(&self) -> Challenge {
        if self.jwt.is_some() {
            Challenge::Bearer
        } else {
            Challenge::ApiKey
        }
    }
}

/// Authenticates requests with JWT bearer tokens and/or API keys, and puts the
/// [`Principal`](crate::principal::Principal) (and, for tokens, the [`Claims`]) into the
/// request extensions. Without credentials it refuses with `401` (or lets the request pass
/// as anonymous, in optional mode); with bad credentials it always refuses.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer")
            .field("jwt", &self.shared.jwt)
            .field("api_keys", &self.shared.api_keys)
            .field("realm", &self.shared.realm)
            .field("optional", &self.shared.optional)
            .finish_non_exhaustive()
    }
}

impl AuthLayer {
    /// A builder.
    pub fn builder() -> AuthBuilder {
        AuthBuilder {
            jwt: None,
            api_keys: None,
            sources: Vec::new(),
            realm: "api".to_owned(),
            optional: false,
            claims: None,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth::new(inner, self.shared.clone())
    }
}

/// Builds an [`AuthLayer`].
#[must_use]
pub struct AuthBuilder {
    jwt: Option<JwtValidator>,
    api_keys: Option<ApiKeys>,
    sources: Vec<TokenSource>,
    realm: String,
    optional: bool,
    claims: Option<Arc<ClaimsInserter>>,
}

impl fmt::Debug for AuthBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthBuilder")
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

impl AuthBuilder {
    /// Accepts JWT bearer tokens checked by `validator`.
    pub fn jwt(mut self, validator: JwtValidator) -> Self {
        self.jwt = Some(validator);
        self
    }

    /// Accepts the API keys in `keys` (from their header).
    pub fn api_keys(mut self, keys: ApiKeys) -> Self {
        self.api_keys = Some(keys);
        self
    }

    /// Where tokens are looked for (default: only `Authorization: Bearer`). Call it once per
    /// source.
    pub fn token_source(mut self, source: TokenSource) -> Self {
        self.sources.push(source);
        self
    }

    /// The realm of `WWW-Authenticate` challenges (default `api`).
    pub fn realm(mut self, realm: impl Into<String>) -> Self {
        self.realm = realm.into();
        self
    }

    /// Lets requests without any credentials through as anonymous (no principal). Bad
    /// credentials are still refused.
    pub fn optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }

    /// Deserializes every verified token's claims into `C` and puts it into the request
    /// extensions; a token whose claims do not fit `C` is refused (`401`, reason
    /// `missing_claim`).
    pub fn claims<C>(mut self) -> Self
    where
        C: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        self.claims = Some(Arc::new(
            |claims: &Claims, ext: &mut Extensions| match claims.deserialize::<C>() {
                Ok(typed) => {
                    ext.insert(typed);
                    true
                }
                Err(_) => false,
            },
        ));
        self
    }

    /// The layer, or what is wrong with the configuration.
    pub fn build(self) -> Result<AuthLayer, ConfigError> {
        if self.jwt.is_none() && self.api_keys.is_none() {
            return Err(ConfigError::NoScheme);
        }
        if !valid_realm(&self.realm) {
            return Err(ConfigError::Realm);
        }
        let sources = if self.sources.is_empty() {
            vec![TokenSource::Bearer]
        } else {
            self.sources
        };
        Ok(AuthLayer {
            shared: Arc::new(Shared {
                jwt: self.jwt.map(Arc::new),
                api_keys: self.api_keys,
                sources,
                realm: self.realm,
                optional: self.optional,
                claims: self.claims,
            }),
        })
    }
}

/// What a request presented.
pub(crate) enum Credentials {
    None,
    Token(String),
    ApiKey(String),
}

/// Finds the request's credentials: exactly one, or none, or [`AuthFailure::Ambiguous`].
pub(crate) fn credentials(
    shared: &Shared,
    head: &RequestHead<'_>,
) -> Result<Credentials, AuthFailure> {
    let mut found = Credentials::None;
    let mut put = |c: Credentials| -> Result<(), AuthFailure> {
        if matches!(found, Credentials::None) {
            found = c;
            Ok(())
        } else {
            Err(AuthFailure::Ambiguous)
        }
    };
    if shared.jwt.is_some() {
        for source in &shared.sources {
            match source {
                TokenSource::Bearer => {
                    let mut values = head.headers.get_all(http::header::AUTHORIZATION).iter();
                    if let Some(value) = values.next() {
                        if values.next().is_some() {
                            return Err(AuthFailure::Ambiguous);
                        }
                        if let Some(token) = bearer(value.as_bytes())? {
                            put(Credentials::Token(token.to_owned()))?;
                        }
                    }
                }
                TokenSource::Cookie(name) => {
                    for value in head.headers.get_all(http::header::COOKIE) {
                        let Ok(text) = value.to_str() else { continue };
                        for pair in text.split(';') {
                            if let Some((k, v)) = pair.trim().split_once('=')
                                && k == name
                            {
                                put(Credentials::Token(v.to_owned()))?;
                            }
                        }
                    }
                }
                TokenSource::Custom(find) => {
                    if let Some(token) = find(head) {
                        put(Credentials::Token(token))?;
                    }
                }
            }
        }
    }
    if let Some(keys) = &shared.api_keys {
        let mut values = head.headers.get_all(keys.header_name()).iter();
        if let Some(value) = values.next() {
            if values.next().is_some() {
                return Err(AuthFailure::Ambiguous);
            }
            let key = value.to_str().map_err(|_| AuthFailure::ApiKey)?;
            put(Credentials::ApiKey(key.trim().to_owned()))?;
        }
    }
    Ok(found)
}

/// The token of an `Authorization: Bearer <token>` value; `None` for another scheme.
fn bearer(value: &[u8]) -> Result<Option<&str>, AuthFailure> {
    if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return Ok(None);
    }
    let token = std::str::from_utf8(&value[7..])
        .map_err(|_| AuthFailure::Malformed)?
        .trim();
    if token.is_empty() {
        return Err(AuthFailure::Malformed);
    }
    Ok(Some(token))
}
