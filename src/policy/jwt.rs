//! JWT authentication (LANGUAGE.md §6, §13.10): the `auth_jwt` verifier.
//!
//! Built once per `auth_jwt` block when a config is compiled, then shared by
//! every request of every route that names the block. The request pipeline
//! calls [`extract`] (or [`JwtVerifier::authenticate`]), answers a
//! [`Reject`] with 401 plus [`www_authenticate`], and hands the [`Claims`]
//! to templates (`$jwt_claim_NAME`) and to `forward_claim`.
//!
//! What the token says is never trusted to choose how it is checked: the
//! accepted algorithms come from the config, the key must be of the type the
//! algorithm needs, `alg: none` and any `crit` header are refused, and the
//! token's own key hints (`jku`, `jwk`, `x5u`) are ignored. Signatures go
//! through `jsonwebtoken::crypto::verify` (aws-lc-rs); the claim rules are
//! ours, so that time is injected and every rule of §6 is explicit.
//!
//! A verified token is remembered (keyed by the token itself, bounded by count
//! and by bytes, never used at or past its `exp` + leeway), which turns the
//! per-request cost of a returning client from a signature check into a hash
//! and a lookup. The key is the whole token, not a digest of it: a hit
//! compares every byte, so no collision can ever answer for another token,
//! and the lookup hashes with the cache's seeded fast hasher instead of
//! running SHA-256 over the token on every request.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::config::model::{JwtAlg, JwtDef, JwtKeySource, TokenFrom};

/// Tokens longer than this are refused before any work (§6).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// How many verified tokens each verifier is sized to remember (the table's
/// starting size; [`TOKEN_CACHE_BYTES`] is the bound).
pub const TOKEN_CACHE_CAPACITY: usize = 10_000;
/// How many bytes of remembered tokens each verifier keeps (at most): each
/// entry weighs its token's length plus [`TOKEN_ENTRY_OVERHEAD`].
pub const TOKEN_CACHE_BYTES: u64 = 4 * 1024 * 1024;
/// What one remembered token weighs beyond its bytes (the entry, the claims'
/// `Arc`, the table's slot), so that many short tokens are bounded too.
const TOKEN_ENTRY_OVERHEAD: u64 = 128;
/// The largest JWKS document accepted from `jwks_url`.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How long one JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed fetch, try again this soon (or at `refresh`, if sooner).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- errors

/// Why an `auth_jwt` block could not be built (config-time, not per request).
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}`: {reason}")]
    BadKeyFile { path: String, reason: String },
    #[error("`{path}` holds no usable public key")]
    NoKeys { path: String },
    #[error("JWKS: {0}")]
    BadJwks(String),
    #[error("fetching `{url}`: {reason}")]
    Fetch { url: String, reason: String },
}

/// Why a request's token was refused. Every reason but [`Reject::Missing`]
/// answers "Invalid token"; the reason itself is for the log only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("no token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("algorithm not accepted")]
    BadAlg,
    #[error("alg none")]
    NoneAlg,
    #[error("key type does not fit the algorithm")]
    KeyTypeMismatch,
    #[error("unknown kid")]
    UnknownKid,
    #[error("bad signature")]
    BadSignature,
    #[error("expired")]
    Expired,
    #[error("not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    BadIssuer,
    #[error("wrong audience")]
    BadAudience,
    #[error("missing claim `{0}`")]
    MissingClaim(String),
    #[error("crit header")]
    UnknownCrit,
    #[error("token over 8k")]
    TooLarge,
}

impl Reject {
    /// The `error` of the 401 JSON body.
    pub fn message(&self) -> &'static str {
        match self {
            Reject::Missing => "No token provided",
            _ => "Invalid token",
        }
    }

    /// Whether `WWW-Authenticate` carries `error="invalid_token"`.
    pub fn is_invalid(&self) -> bool {
        !matches!(self, Reject::Missing)
    }

    /// The answer's status: always 401.
    pub fn status(&self) -> http::StatusCode {
        http::StatusCode::UNAUTHORIZED
    }
}

/// `WWW-Authenticate` for a 401 (§6): `Bearer realm="NAME"`, plus
/// `, error="invalid_token"` when a token was there but refused.
pub fn www_authenticate(realm: &str, invalid: bool) -> HeaderValue {
    let mut v = String::with_capacity(realm.len() + 40);
    v.push_str("Bearer realm=\"");
    for c in realm.chars() {
        if c == '"' || c == '\\' {
            v.push('\\');
        }
        v.push(c);
    }
    v.push('"');
    if invalid {
        v.push_str(", error=\"invalid_token\"");
    }
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}

// ---------------------------------------------------------------- extraction

/// The token a request carries, from where `token_from` says; `None` (an
/// absent or empty value) means [`Reject::Missing`].
///
/// `Authorization` must use the `Bearer` scheme; another header may carry the
/// token bare or after `Bearer `. Cookies come from the `Cookie` headers of
/// `headers`; `query` is the raw query string (no `?`).
pub fn extract<'a>(headers: &'a HeaderMap, query: &'a str, from: &TokenFrom) -> Option<&'a str> {
    extract_named(headers, query, from, None)
}

/// [`extract`], with the header's name already parsed when `from` names a
/// header (the verifier parses it once, not per request).
fn extract_named<'a>(
    headers: &'a HeaderMap,
    query: &'a str,
    from: &TokenFrom,
    parsed: Option<&HeaderName>,
) -> Option<&'a str> {
    let token = match from {
        TokenFrom::Header(name) => {
            let value = match parsed {
                Some(n) => crate::proxy::headers::get(headers, n)?,
                None => headers.get(name.as_str())?,
            };
            // A header value's text is visible ASCII (and spaces, tabs):
            // ASCII trimming is the whole of trimming.
            let raw = value.to_str().ok()?.trim_ascii();
            match strip_bearer(raw) {
                Some(t) => t,
                None if name.eq_ignore_ascii_case("authorization") => return None,
                None => raw,
            }
        }
        TokenFrom::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|h| h.to_str().ok())
            .flat_map(|h| h.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim_matches('"'))?,
        TokenFrom::Query(name) => query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)?,
    };
    // Header values and a URI's query are ASCII (see above).
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// What follows `Bearer ` (any case), trimmed; `None` for another scheme.
fn strip_bearer(v: &str) -> Option<&str> {
    let b = v.as_bytes();
    let bearer = b.get(6) == Some(&b' ') && b[..6].eq_ignore_ascii_case(b"bearer");
    bearer.then(|| v[7..].trim_ascii())
}

// ---------------------------------------------------------------- claims

/// The claims of a verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    map: Map<String, Value>,
}

impl Claims {
    /// A claim as text for `$jwt_claim_NAME` and `forward_claim`: strings as
    /// they are, numbers and booleans formatted, anything else as JSON.
    pub fn get(&self, name: &str) -> Option<String> {
        Some(match self.map.get(name)? {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }

    /// [`Claims::get`] appended to `out` (no copy of a string claim made
    /// first); false when there is no such claim.
    pub fn push_to(&self, name: &str, out: &mut String) -> bool {
        use std::fmt::Write as _;
        match self.map.get(name) {
            None => false,
            Some(Value::String(s)) => {
                out.push_str(s);
                true
            }
            Some(other) => {
                let _ = write!(out, "{other}");
                true
            }
        }
    }

    /// A claim as JSON.
    pub fn get_value(&self, name: &str) -> Option<&Value> {
        self.map.get(name)
    }

    /// Every claim.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.map
    }
}

// ---------------------------------------------------------------- keys

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Hmac,
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match alg {
            HS256 | HS384 | HS512 => self == KeyKind::Hmac,
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => self == KeyKind::Rsa,
            ES256 => self == KeyKind::P256,
            ES384 => self == KeyKind::P384,
            EdDSA => self == KeyKind::Ed25519,
            // An algorithm this code does not know is in no config list.
            _ => false,
        }
    }
}

struct Key {
    kid: Option<String>,
    kind: KeyKind,
    /// A JWK's `alg`: the only algorithm the key may verify.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl Key {
    fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

#[derive(Default)]
struct KeySet {
    keys: Vec<Key>,
    /// Keys come from a JWKS: the token's `kid` selects one.
    by_kid: bool,
}

fn map_alg(a: JwtAlg) -> Algorithm {
    match a {
        JwtAlg::HS256 => Algorithm::HS256,
        JwtAlg::HS384 => Algorithm::HS384,
        JwtAlg::HS512 => Algorithm::HS512,
        JwtAlg::RS256 => Algorithm::RS256,
        JwtAlg::RS384 => Algorithm::RS384,
        JwtAlg::RS512 => Algorithm::RS512,
        JwtAlg::PS256 => Algorithm::PS256,
        JwtAlg::PS384 => Algorithm::PS384,
        JwtAlg::PS512 => Algorithm::PS512,
        JwtAlg::ES256 => Algorithm::ES256,
        JwtAlg::ES384 => Algorithm::ES384,
        JwtAlg::EdDSA => Algorithm::EdDSA,
    }
}

// DER encodings of the algorithm OIDs found in a SubjectPublicKeyInfo.
const OID_RSA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every public key in a PEM file (`PUBLIC KEY` or `RSA PUBLIC KEY` blocks).
fn load_pem_keys(text: &[u8], path: &str) -> Result<Vec<Key>, JwtError> {
    let bad = |reason: String| JwtError::BadKeyFile {
        path: path.to_string(),
        reason,
    };
    let blocks = pem::parse_many(text).map_err(|e| bad(e.to_string()))?;
    let mut keys = Vec::new();
    for block in blocks {
        let encoded = pem::encode(&block);
        let (kind, key) = match block.tag() {
            "RSA PUBLIC KEY" => (KeyKind::Rsa, DecodingKey::from_rsa_pem(encoded.as_bytes())),
            "PUBLIC KEY" => {
                let der = block.contents();
                // The curve OIDs follow the id-ecPublicKey OID, so test them first.
                if contains(der, OID_P256) {
                    (KeyKind::P256, DecodingKey::from_ec_pem(encoded.as_bytes()))
                } else if contains(der, OID_P384) {
                    (KeyKind::P384, DecodingKey::from_ec_pem(encoded.as_bytes()))
                } else if contains(der, OID_ED25519) {
                    (
                        KeyKind::Ed25519,
                        DecodingKey::from_ed_pem(encoded.as_bytes()),
                    )
                } else if contains(der, OID_RSA) {
                    (KeyKind::Rsa, DecodingKey::from_rsa_pem(encoded.as_bytes()))
                } else {
                    return Err(bad("a public key of an unsupported type".into()));
                }
            }
            other => {
                return Err(bad(format!(
                    "a `{other}` block; only public keys belong here"
                )));
            }
        };
        let key = key.map_err(|e| bad(e.to_string()))?;
        keys.push(Key {
            kid: None,
            kind,
            alg: None,
            key,
        });
    }
    if keys.is_empty() {
        return Err(JwtError::NoKeys {
            path: path.to_string(),
        });
    }
    Ok(keys)
}

/// The signing keys of a JWKS document. Keys of other types, curves or uses
/// are skipped (one odd key must not take the others down); symmetric
/// (`oct`) keys are never taken from a JWKS.
fn parse_jwks(body: &[u8]) -> Result<Vec<Key>, JwtError> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| JwtError::BadJwks(e.to_string()))?;
    let list = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| JwtError::BadJwks("no `keys` array".into()))?;
    let mut keys = Vec::new();
    for jwk in list {
        if let Some(k) = jwk_key(jwk) {
            keys.push(k);
        }
    }
    Ok(keys)
}

fn jwk_key(jwk: &Value) -> Option<Key> {
    let s = |name: &str| jwk.get(name).and_then(Value::as_str);
    if s("use").is_some_and(|u| u != "sig") {
        return None;
    }
    let alg = match s("alg") {
        Some(a) => Some(a.parse::<Algorithm>().ok()?),
        None => None,
    };
    let b64len = |name: &str| {
        s(name)
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
            .map(|v| v.len())
    };
    let (kind, key) = match s("kty")? {
        "RSA" => (
            KeyKind::Rsa,
            DecodingKey::from_rsa_components(s("n")?, s("e")?).ok()?,
        ),
        "EC" => {
            let (kind, len) = match s("crv")? {
                "P-256" => (KeyKind::P256, 32),
                "P-384" => (KeyKind::P384, 48),
                _ => return None,
            };
            if b64len("x")? != len || b64len("y")? != len {
                return None;
            }
            (
                kind,
                DecodingKey::from_ec_components(s("x")?, s("y")?).ok()?,
            )
        }
        "OKP" if s("crv")? == "Ed25519" => (
            KeyKind::Ed25519,
            DecodingKey::from_ed_components(s("x")?).ok()?,
        ),
        _ => return None,
    };
    Some(Key {
        kid: s("kid").map(str::to_string),
        kind,
        alg,
        key,
    })
}

// ---------------------------------------------------------------- JWKS over HTTP

/// Fetches a JWKS document. Only `http://` for now: `https://` needs the
/// TLS client work of issue 6 and is refused with a clear error until then.
pub async fn fetch_jwks(url: &str) -> Result<Vec<u8>, JwtError> {
    use http_body_util::{BodyExt as _, Empty, Limited};
    let fail = |reason: String| JwtError::Fetch {
        url: url.to_string(),
        reason,
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| fail(e.to_string()))?;
    // https:// is verified against the system roots (as `https://`
    // upstreams without `proxy_ssl_trusted_certificate`).
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(FETCH_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*crate::tls::system_trust().config).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<bytes::Bytes>>(connector);
    let req = http::Request::get(uri)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| fail(e.to_string()))?;
    let work = async {
        let resp = client.request(req).await.map_err(|e| fail(e.to_string()))?;
        if resp.status() != http::StatusCode::OK {
            return Err(fail(format!("status {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .map_err(|_| fail("timed out".into()))?
}

struct Remote {
    url: String,
    refresh: Duration,
    /// Wakes the refresh task: an unknown `kid`, or the verifier going away.
    wake: Arc<Notify>,
    /// When an unknown `kid` last asked for a refetch.
    last_kid_refetch: Mutex<Option<Instant>>,
}

// ---------------------------------------------------------------- the verifier

struct Inner {
    name: String,
    algorithms: Vec<Algorithm>,
    keys: ArcSwap<KeySet>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: f64,
    require_claims: Vec<String>,
    token_from: TokenFrom,
    /// `token_from`'s header name, parsed once.
    token_header: Option<HeaderName>,
    cache: quick_cache::sync::Cache<Box<str>, Remembered, TokenWeight>,
    remote: Option<Remote>,
}

/// Weighs a remembered token by its length (see [`TOKEN_CACHE_BYTES`]).
#[derive(Clone)]
struct TokenWeight;

impl quick_cache::Weighter<Box<str>, Remembered> for TokenWeight {
    fn weight(&self, token: &Box<str>, _: &Remembered) -> u64 {
        token.len() as u64 + TOKEN_ENTRY_OVERHEAD
    }
}

#[derive(Clone)]
struct Remembered {
    claims: Arc<Claims>,
    /// `exp` + leeway, in Unix seconds: the entry is dead from then on.
    until: f64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(r) = &self.remote {
            r.wake.notify_one();
        }
    }
}

/// One `auth_jwt` block, ready to verify tokens. Cheap to clone.
#[derive(Clone)]
pub struct JwtVerifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("name", &self.inner.name)
            .field("keys", &self.inner.keys.load().keys.len())
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// Builds the verifier of `def`, reading its key file or JWKS file now.
    ///
    /// With `jwks_url`, the keys start empty and a background task (spawned
    /// on the current tokio runtime, if there is one) fetches them at once
    /// and then every `refresh`; it ends when the verifier is dropped. Await
    /// [`JwtVerifier::refresh_keys`] to have keys before serving.
    pub fn new(def: &JwtDef) -> Result<JwtVerifier, JwtError> {
        let (keys, remote) = match &def.keys {
            JwtKeySource::Secret(s) => (
                KeySet {
                    keys: vec![Key {
                        kid: None,
                        kind: KeyKind::Hmac,
                        alg: None,
                        key: DecodingKey::from_secret(s.as_bytes()),
                    }],
                    by_kid: false,
                },
                None,
            ),
            JwtKeySource::KeyFile(p) => {
                let path = p.display().to_string();
                let text = std::fs::read(p).map_err(|source| JwtError::Io {
                    path: path.clone(),
                    source,
                })?;
                let keys = load_pem_keys(&text, &path)?;
                (
                    KeySet {
                        keys,
                        by_kid: false,
                    },
                    None,
                )
            }
            JwtKeySource::JwksFile(p) => {
                let path = p.display().to_string();
                let text = std::fs::read(p).map_err(|source| JwtError::Io {
                    path: path.clone(),
                    source,
                })?;
                let keys = parse_jwks(&text)?;
                if keys.is_empty() {
                    return Err(JwtError::NoKeys { path });
                }
                (KeySet { keys, by_kid: true }, None)
            }
            JwtKeySource::JwksUrl { url, refresh } => (
                KeySet {
                    keys: Vec::new(),
                    by_kid: true,
                },
                Some(Remote {
                    url: url.clone(),
                    refresh: (*refresh).max(Duration::from_secs(1)),
                    wake: Arc::new(Notify::new()),
                    last_kid_refetch: Mutex::new(None),
                }),
            ),
        };
        let inner = Arc::new(Inner {
            name: def.name.clone(),
            algorithms: def.algorithms.iter().copied().map(map_alg).collect(),
            keys: ArcSwap::from_pointee(keys),
            issuer: def.issuer.clone(),
            audience: def.audience.clone(),
            leeway: def.leeway.as_secs_f64(),
            require_claims: def.require_claims.clone(),
            token_from: def.token_from.clone(),
            token_header: match &def.token_from {
                TokenFrom::Header(name) => HeaderName::from_bytes(name.as_bytes()).ok(),
                _ => None,
            },
            cache: quick_cache::sync::Cache::with_weighter(
                TOKEN_CACHE_CAPACITY,
                TOKEN_CACHE_BYTES,
                TokenWeight,
            ),
            remote,
        });
        if inner.remote.is_some()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(refresh_loop(Arc::downgrade(&inner)));
        }
        Ok(JwtVerifier { inner })
    }

    /// The block's name: the realm of `WWW-Authenticate`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Where the token is read from.
    pub fn token_from(&self) -> &TokenFrom {
        &self.inner.token_from
    }

    /// How many keys are held now.
    pub fn key_count(&self) -> usize {
        self.inner.keys.load().keys.len()
    }

    /// How many verified tokens are remembered now.
    pub fn remembered(&self) -> usize {
        self.inner.cache.len()
    }

    /// Fetches `jwks_url` now and swaps the keys in; on failure the held keys
    /// stay. Returns how many keys are held. A no-op for other key sources.
    pub async fn refresh_keys(&self) -> Result<usize, JwtError> {
        refresh_once(&self.inner).await
    }

    /// [`extract`] then [`JwtVerifier::verify`].
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query: &str,
        now: SystemTime,
    ) -> Result<Arc<Claims>, Reject> {
        let inner = &*self.inner;
        let token = extract_named(
            headers,
            query,
            &inner.token_from,
            inner.token_header.as_ref(),
        )
        .ok_or(Reject::Missing)?;
        self.verify(token, now)
    }

    /// Verifies `token` at `now`, answering from the remembered tokens when
    /// it can.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Arc<Claims>, Reject> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Reject::TooLarge);
        }
        let now = unix_secs(now);
        if let Some(r) = self.inner.cache.get(token) {
            if now < r.until {
                return Ok(r.claims);
            }
            self.inner.cache.remove(token);
            return Err(Reject::Expired);
        }
        let (claims, exp) = self.check(token, now)?;
        let claims = Arc::new(claims);
        self.inner.cache.insert(
            token.into(),
            Remembered {
                claims: claims.clone(),
                until: exp + self.inner.leeway,
            },
        );
        Ok(claims)
    }

    /// Verifies `token` at `now` without the remembered tokens: the cold path.
    pub fn verify_uncached(&self, token: &str, now: SystemTime) -> Result<Claims, Reject> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Reject::TooLarge);
        }
        self.check(token, unix_secs(now)).map(|(c, _)| c)
    }

    /// The whole check; returns the claims and `exp`.
    fn check(&self, token: &str, now: f64) -> Result<(Claims, f64), Reject> {
        let inner = &*self.inner;
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Reject::Malformed);
        };
        let header = decode_object(h64)?;
        if header.contains_key("crit") {
            return Err(Reject::UnknownCrit);
        }
        let alg = match header.get("alg") {
            Some(Value::String(a)) => a,
            _ => return Err(Reject::Malformed),
        };
        if alg.eq_ignore_ascii_case("none") {
            return Err(Reject::NoneAlg);
        }
        let alg: Algorithm = alg.parse().map_err(|_| Reject::BadAlg)?;
        if !inner.algorithms.contains(&alg) {
            return Err(Reject::BadAlg);
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(Reject::Malformed),
        };

        let keys = inner.keys.load();
        let mut candidates = keys.keys.iter().peekable();
        let by_kid: Box<dyn Iterator<Item = &Key>> = match (keys.by_kid, kid) {
            (true, Some(kid)) => {
                let mut found = keys
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .peekable();
                if found.peek().is_none() {
                    self.unknown_kid();
                    return Err(Reject::UnknownKid);
                }
                Box::new(found)
            }
            _ => {
                if candidates.peek().is_none() {
                    self.unknown_kid();
                    return Err(Reject::UnknownKid);
                }
                Box::new(candidates)
            }
        };
        let message = &token.as_bytes()[..h64.len() + 1 + p64.len()];
        let mut fitted = false;
        let mut verified = false;
        for key in by_kid.filter(|k| k.fits(alg)) {
            fitted = true;
            if jsonwebtoken::crypto::verify(sig, message, &key.key, alg).unwrap_or(false) {
                verified = true;
                break;
            }
        }
        if !fitted {
            return Err(Reject::KeyTypeMismatch);
        }
        if !verified {
            return Err(Reject::BadSignature);
        }

        let claims = decode_object(p64)?;
        let exp = match claims.get("exp") {
            None => return Err(Reject::MissingClaim("exp".into())),
            Some(v) => v.as_f64().ok_or(Reject::Malformed)?,
        };
        let nbf = match claims.get("nbf") {
            None => None,
            Some(v) => Some(v.as_f64().ok_or(Reject::Malformed)?),
        };
        if claims.get("iat").is_some_and(|v| !v.is_number()) {
            return Err(Reject::Malformed);
        }
        if now >= exp + inner.leeway {
            return Err(Reject::Expired);
        }
        if nbf.is_some_and(|nbf| now + inner.leeway < nbf) {
            return Err(Reject::NotYetValid);
        }
        if let Some(want) = &inner.issuer {
            match claims.get("iss") {
                None => return Err(Reject::MissingClaim("iss".into())),
                Some(Value::String(iss)) if iss == want => {}
                Some(_) => return Err(Reject::BadIssuer),
            }
        }
        if let Some(want) = &inner.audience {
            let ok = match claims.get("aud") {
                None => return Err(Reject::MissingClaim("aud".into())),
                Some(Value::String(aud)) => aud == want,
                Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(want)),
                Some(_) => false,
            };
            if !ok {
                return Err(Reject::BadAudience);
            }
        }
        for name in &inner.require_claims {
            if claims.get(name).is_none_or(Value::is_null) {
                return Err(Reject::MissingClaim(name.clone()));
            }
        }
        Ok((Claims { map: claims }, exp))
    }

    /// An unknown `kid` asks the refresh task for a refetch, at most once
    /// per `refresh`; the request itself is answered with the keys held.
    fn unknown_kid(&self) {
        let Some(r) = &self.inner.remote else { return };
        let mut last = r.last_kid_refetch.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < r.refresh) {
            return;
        }
        *last = Some(Instant::now());
        r.wake.notify_one();
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn decode_object(part: &str) -> Result<Map<String, Value>, Reject> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| Reject::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Reject::Malformed),
    }
}

async fn refresh_once(inner: &Inner) -> Result<usize, JwtError> {
    let Some(r) = &inner.remote else {
        return Ok(inner.keys.load().keys.len());
    };
    let body = fetch_jwks(&r.url).await?;
    let keys = parse_jwks(&body)?;
    if keys.is_empty() {
        return Err(JwtError::BadJwks("no usable signing key".into()));
    }
    let n = keys.len();
    inner.keys.store(Arc::new(KeySet { keys, by_kid: true }));
    // A key may have been withdrawn: forget what it verified.
    inner.cache.clear();
    Ok(n)
}

/// Fetches at once, then every `refresh` (sooner after a failure), or when an
/// unknown `kid` wakes it. Holds only a weak reference between fetches, so
/// it ends soon after the verifier is dropped.
async fn refresh_loop(weak: Weak<Inner>) {
    loop {
        let (wake, delay) = {
            let Some(inner) = weak.upgrade() else { return };
            let Some(r) = &inner.remote else { return };
            let delay = match refresh_once(&inner).await {
                Ok(n) => {
                    tracing::debug!(auth_jwt = %inner.name, keys = n, "jwks refreshed");
                    r.refresh
                }
                Err(e) => {
                    tracing::warn!(auth_jwt = %inner.name, error = %e, "jwks refresh failed; keeping the keys held");
                    r.refresh.min(RETRY_AFTER_FAILURE)
                }
            };
            (r.wake.clone(), delay)
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The scheme check as it was written first: split at the first space.
    fn strip_bearer_reference(v: &str) -> Option<&str> {
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    }

    proptest! {
        #[test]
        fn bearer_stripped_as_by_splitting(
            v in "((?i)bearer|basic|bear|bearerx)?[ \t]{0,3}[ -~\t]{0,12}"
        ) {
            prop_assert_eq!(strip_bearer(&v), strip_bearer_reference(&v));
        }

        #[test]
        fn a_parsed_header_name_finds_what_the_text_does(
            value in "[ -~\t]{0,24}",
            name in "(authorization|x-token|X-Token)",
        ) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(HeaderName::from_static("x-token"), v.clone());
                h.insert(http::header::AUTHORIZATION, v);
            }
            let from = TokenFrom::Header(name.clone());
            let parsed = HeaderName::from_bytes(name.as_bytes()).ok();
            prop_assert_eq!(
                extract_named(&h, "", &from, parsed.as_ref()),
                extract(&h, "", &from)
            );
        }
    }

    #[test]
    fn a_claim_appended_reads_as_the_claim() {
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(
            r#"{"sub":"u-1","n":42,"b":true,"o":{"a":[1,"x"]},"e":""}"#,
        ) else {
            panic!("the claims parse");
        };
        let c = Claims { map };
        for name in ["sub", "n", "b", "o", "e", "missing"] {
            let mut out = String::from("pre:");
            let found = c.push_to(name, &mut out);
            assert_eq!(found, c.get(name).is_some(), "{name}");
            assert_eq!(
                out,
                format!("pre:{}", c.get(name).unwrap_or_default()),
                "{name}"
            );
        }
    }
}
