//! OIDC: verifies bearer JWTs with the issuer's public keys (its JWKS), and turns their claims
//! into an [`Identity`].
//!
//! - Only asymmetric algorithms are accepted (RS*, PS*, ES256, ES384, EdDSA); `none` and every
//!   HMAC algorithm are refused before any key is looked at, and the token's algorithm must fit
//!   the key's type (and the key's `alg`, when the JWKS names one), so a public key can never be
//!   used as an HMAC secret.
//! - The signature, `exp` and `nbf` (with [`LEEWAY_SECS`] of leeway), `iss` (exactly the
//!   configured issuer) and `aud` (must contain the configured audience) are checked; `exp`,
//!   `iss`, `aud` and `sub` are required.
//! - The JWKS is fetched lazily, kept in memory, and fetched again when a token names a `kid`
//!   the cache does not have, or when the cached keys are older than [`MAX_KEY_AGE`] (so a key
//!   the issuer withdrew stops being accepted). Fetches are at most one per
//!   [`REFETCH_INTERVAL`], whatever the outcome, so a flood of tokens with made-up `kid`s cannot
//!   hammer the issuer; each fetch has a [`FETCH_TIMEOUT`] and a size cap. A failed refresh
//!   keeps the keys already known.
//! - Tokens are never logged; failures carry short, fixed messages.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::auth::{Identity, TokenVerifier};
use crate::config::OidcConfig;
use crate::error::{Error, Result};

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;
/// At most one JWKS fetch per this interval.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// Timeout of one JWKS fetch, body included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Cached keys older than this are fetched again before use.
pub const MAX_KEY_AGE: Duration = Duration::from_secs(15 * 60);
/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// The longest token looked at.
const MAX_TOKEN_BYTES: usize = 64 << 10;

/// The only algorithms a token may use.
const ALLOWED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];
const RSA_ALGS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

#[derive(Debug, Clone, Copy)]
struct Limits {
    refetch_interval: Duration,
    fetch_timeout: Duration,
    max_key_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            refetch_interval: REFETCH_INTERVAL,
            fetch_timeout: FETCH_TIMEOUT,
            max_key_age: MAX_KEY_AGE,
        }
    }
}

/// One signing key of the issuer, with the algorithms it may verify.
struct Key {
    kid: Option<String>,
    algs: Vec<Algorithm>,
    key: DecodingKey,
}

#[derive(Default)]
struct KeySet {
    keys: Vec<Arc<Key>>,
    /// When these keys were fetched; `None` until the first successful fetch.
    fetched: Option<Instant>,
}

enum Lookup {
    Found(Arc<Key>),
    /// The `kid` is known but not for this algorithm.
    WrongAlg,
    Unknown,
    /// The token has no `kid` and the set has more than one key.
    Ambiguous,
}

impl KeySet {
    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Lookup {
        let candidates: Vec<&Arc<Key>> = match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None if self.keys.len() > 1 => return Lookup::Ambiguous,
            None => self.keys.iter().collect(),
        };
        if candidates.is_empty() {
            return Lookup::Unknown;
        }
        candidates
            .into_iter()
            .find(|k| k.algs.contains(&alg))
            .map_or(Lookup::WrongAlg, |k| Lookup::Found(Arc::clone(k)))
    }
}

/// Verifies OIDC JWTs against the issuer's JWKS; see the module documentation.
pub struct Oidc {
    cfg: OidcConfig,
    limits: Limits,
    client: std::result::Result<reqwest::Client, String>,
    keys: RwLock<KeySet>,
    /// When the last fetch was started; held across a fetch so concurrent refreshes queue up
    /// and find the new keys (or the rate limit) instead of fetching again.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl fmt::Debug for Oidc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.cfg.issuer)
            .field("audience", &self.cfg.audience)
            .field("jwks_url", &self.cfg.jwks_url)
            .finish_non_exhaustive()
    }
}

fn unauthorized(message: &str) -> Error {
    Error::Unauthorized(message.to_owned())
}

impl Oidc {
    /// A verifier for `cfg`. Nothing is fetched until the first token arrives.
    pub fn new(cfg: OidcConfig) -> Self {
        Self::with_limits(cfg, Limits::default())
    }

    fn with_limits(cfg: OidcConfig, limits: Limits) -> Self {
        // Only the RustCrypto provider is compiled in; installing it explicitly keeps
        // verification working should feature unification ever enable a second one.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        match reqwest::Url::parse(&cfg.jwks_url) {
            Ok(url) if url.scheme() == "https" => {}
            Ok(url)
                if url.scheme() == "http"
                    && matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]")) => {}
            Ok(url) => tracing::warn!(
                url = %url,
                "the OIDC JWKS URL is not https: its keys could be replaced in transit"
            ),
            Err(e) => {
                tracing::warn!(url = %cfg.jwks_url, error = %e, "the OIDC JWKS URL is not valid")
            }
        }
        let client = reqwest::Client::builder()
            .timeout(limits.fetch_timeout)
            .connect_timeout(limits.fetch_timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("agentbox-controlplane/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string());
        Self {
            cfg,
            limits,
            client,
            keys: RwLock::new(KeySet::default()),
            last_fetch: tokio::sync::Mutex::new(None),
        }
    }

    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> (Lookup, Option<Instant>) {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        (keys.lookup(kid, alg), keys.fetched)
    }

    /// The key for `kid` and `alg`, refreshing the JWKS when the key is unknown or the cache
    /// is old (both subject to the rate limit).
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<Key>> {
        let (found, fetched) = self.lookup(kid, alg);
        let fresh = fetched.is_some_and(|t| t.elapsed() < self.limits.max_key_age);
        let (found, fetched) = match found {
            Lookup::Found(key) if fresh => return Ok(key),
            Lookup::WrongAlg if fresh => return Err(unauthorized("algorithm not allowed")),
            _ => {
                self.refresh().await;
                self.lookup(kid, alg)
            }
        };
        match found {
            Lookup::Found(key) => Ok(key),
            Lookup::WrongAlg => Err(unauthorized("algorithm not allowed")),
            Lookup::Ambiguous => Err(unauthorized("token names no signing key (kid)")),
            Lookup::Unknown if fetched.is_none() => {
                Err(unauthorized("the issuer's signing keys are unavailable"))
            }
            Lookup::Unknown => Err(unauthorized("unknown signing key")),
        }
    }

    /// Fetches the JWKS unless a fetch started less than `refetch_interval` ago. On failure
    /// the keys already known stay in force.
    async fn refresh(&self) {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.limits.refetch_interval) {
            return;
        }
        *last = Some(Instant::now());
        let fetched = match tokio::time::timeout(self.limits.fetch_timeout, self.fetch_jwks()).await
        {
            Ok(result) => result,
            Err(_) => Err("timed out".to_owned()),
        };
        match fetched {
            Ok(keys) => {
                tracing::info!(url = %self.cfg.jwks_url, keys = keys.len(), "OIDC JWKS fetched");
                if keys.is_empty() {
                    tracing::warn!(url = %self.cfg.jwks_url, "the OIDC JWKS has no usable signing key");
                }
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = KeySet {
                    keys,
                    fetched: Some(Instant::now()),
                };
            }
            Err(e) => {
                tracing::warn!(url = %self.cfg.jwks_url, error = %e, "OIDC JWKS fetch failed");
            }
        }
    }

    async fn fetch_jwks(&self) -> std::result::Result<Vec<Arc<Key>>, String> {
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let mut response = client
            .get(&self.cfg.jwks_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP status {}", response.status()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body)
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<Identity> {
        let text = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let sub = text("sub").ok_or_else(|| unauthorized("token has no subject"))?;
        let groups = strings(claims.get("groups")).unwrap_or_default();
        let admin = self
            .cfg
            .admin_group
            .as_ref()
            .is_some_and(|g| groups.contains(g));
        Ok(Identity {
            sub,
            name: text("name").or_else(|| text("preferred_username")),
            email: text("email"),
            namespaces: namespaces(claims.get(&self.cfg.namespaces_claim)),
            groups,
            admin,
        })
    }
}

/// The usable signing keys of a JWKS document; entries that are not (encryption keys, HMAC
/// secrets, unsupported curves, unparseable entries) are skipped.
fn parse_jwks(body: &[u8]) -> std::result::Result<Vec<Arc<Key>>, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<Value>,
    }
    let doc: Document =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    Ok(doc
        .keys
        .into_iter()
        .filter_map(|entry| {
            let jwk: Jwk = serde_json::from_value(entry).ok()?;
            let kid = jwk.common.key_id.clone();
            let key = usable_key(&jwk);
            if key.is_none() {
                tracing::debug!(kid = ?kid, "OIDC JWKS entry skipped: not a usable signing key");
            }
            key
        })
        .collect())
}

/// The key, when `jwk` is a public signing key of a supported type; its algorithms are those
/// its type allows, narrowed to its `alg` when it names one.
fn usable_key(jwk: &Jwk) -> Option<Arc<Key>> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    if jwk
        .common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return None;
    }
    let by_type: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &RSA_ALGS,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            _ => return None,
        },
        // `oct` (HMAC secrets) and unknown key types are never used.
        _ => return None,
    };
    let algs = match jwk.common.key_algorithm {
        None => by_type.to_vec(),
        Some(named) => {
            let alg = Algorithm::try_from(named).ok()?;
            if !by_type.contains(&alg) {
                return None;
            }
            vec![alg]
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Arc::new(Key {
        kid: jwk.common.key_id.clone(),
        algs,
        key,
    }))
}

/// A claim that is a string or an array of strings (other array items are ignored); `None`
/// when absent or of another type.
fn strings(value: Option<&Value>) -> Option<Vec<String>> {
    match value? {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) => Some(
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
        ),
        _ => None,
    }
}

/// The namespaces claim, a string or an array of strings:
/// - containing `*` → all namespaces (`None`);
/// - absent, empty, or not a string/array → no namespaces at all (`Some(vec![])`): the caller
///   sees nothing unless an administrator. Failing closed means an issuer that forgets the
///   claim grants nothing, rather than everything;
/// - otherwise exactly the namespaces named (empty strings dropped).
fn namespaces(value: Option<&Value>) -> Option<Vec<String>> {
    let mut list = strings(value).unwrap_or_default();
    if list.iter().any(|n| n == "*") {
        return None;
    }
    list.retain(|n| !n.is_empty());
    list.dedup();
    Some(list)
}

/// What the token's header says, read before any verification to refuse what must never be
/// verified (`none`, HMAC, critical extensions).
fn header_of(token: &str) -> Result<(Algorithm, Option<String>)> {
    let malformed = || unauthorized("token malformed");
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let bytes = URL_SAFE_NO_PAD.decode(header).map_err(|_| malformed())?;
    let header: Map<String, Value> = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(|a| Algorithm::from_str(a).ok())
        .filter(|a| ALLOWED.contains(a))
        .ok_or_else(|| unauthorized("algorithm not allowed"))?;
    if header.contains_key("crit") {
        return Err(unauthorized("token has critical header extensions"));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(malformed()),
    };
    Ok((alg, kid))
}

fn verification_error(e: &jsonwebtoken::errors::Error) -> Error {
    let message = match e.kind() {
        ErrorKind::InvalidSignature => "token signature invalid",
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not yet valid",
        ErrorKind::InvalidIssuer => "token issuer not accepted",
        ErrorKind::InvalidAudience => "token audience not accepted",
        ErrorKind::MissingRequiredClaim(claim) => {
            return Error::Unauthorized(match claim.as_str() {
                "exp" | "iss" | "aud" | "sub" | "nbf" => format!("token has no {claim} claim"),
                _ => "token lacks a required claim".to_owned(),
            })
        }
        ErrorKind::InvalidClaimFormat(_) => "token claims malformed",
        ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => "algorithm not allowed",
        ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidKeyFormat => "signing key unusable",
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => "token malformed",
        _ => "token not valid",
    };
    unauthorized(message)
}

#[async_trait::async_trait]
impl TokenVerifier for Oidc {
    async fn verify(&self, token: &str) -> Result<Identity> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(unauthorized("token too large"));
        }
        let (alg, kid) = header_of(token)?;
        let key = self.key_for(kid.as_deref(), alg).await?;
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_issuer(&[&self.cfg.issuer]);
        validation.set_audience(&[&self.cfg.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|e| verification_error(&e))?;
        self.identity(&data.claims)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, OnceLock};

    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use jsonwebtoken::{EncodingKey, Header};
    use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    use rsa::traits::PublicKeyParts;
    use serde_json::json;

    use super::*;

    const ISS: &str = "https://issuer.test/realms/agentbox";
    const AUD: &str = "agentbox";

    struct TestKey {
        /// PKCS#1 DER of the private key.
        private_der: Vec<u8>,
        n: String,
        e: String,
        spki_pem: String,
        spki_der: Vec<u8>,
        pkcs1_pem: String,
        pkcs1_der: Vec<u8>,
    }

    /// Two 2048-bit RSA keys, generated once per test binary.
    fn keys() -> &'static [TestKey; 2] {
        static KEYS: OnceLock<[TestKey; 2]> = OnceLock::new();
        KEYS.get_or_init(|| {
            let make = || {
                let private =
                    rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("keygen");
                let public = private.to_public_key();
                TestKey {
                    private_der: private.to_pkcs1_der().expect("der").as_bytes().to_vec(),
                    n: URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                    e: URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
                    spki_pem: public.to_public_key_pem(LineEnding::LF).expect("pem"),
                    spki_der: public.to_public_key_der().expect("der").into_vec(),
                    pkcs1_pem: public.to_pkcs1_pem(LineEnding::LF).expect("pem"),
                    pkcs1_der: public.to_pkcs1_der().expect("der").into_vec(),
                }
            };
            [make(), make()]
        })
    }

    fn jwk(key: &TestKey, kid: &str, alg: Option<&str>) -> Value {
        let mut jwk = json!({ "kty": "RSA", "kid": kid, "use": "sig", "n": key.n, "e": key.e });
        if let Some(alg) = alg {
            jwk["alg"] = json!(alg);
        }
        jwk
    }

    /// A JWKS server on 127.0.0.1 counting its fetches; `None` as the document answers 500.
    struct Jwks {
        url: String,
        doc: Arc<Mutex<Option<Value>>>,
        fetches: Arc<AtomicUsize>,
    }

    impl Jwks {
        async fn serve(keys: Vec<Value>) -> Self {
            let doc = Arc::new(Mutex::new(Some(json!({ "keys": keys }))));
            let fetches = Arc::new(AtomicUsize::new(0));
            let (d, f) = (Arc::clone(&doc), Arc::clone(&fetches));
            let app = axum::Router::new().route(
                "/jwks",
                axum::routing::get(move || {
                    let (d, f) = (Arc::clone(&d), Arc::clone(&f));
                    async move {
                        f.fetch_add(1, Ordering::SeqCst);
                        match d.lock().expect("lock").clone() {
                            Some(doc) => axum::Json(doc).into_response(),
                            None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                        }
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
            tokio::spawn(async move { axum::serve(listener, app).await });
            Self { url, doc, fetches }
        }

        fn set(&self, doc: Option<Value>) {
            *self.doc.lock().expect("lock") = doc;
        }

        fn fetches(&self) -> usize {
            self.fetches.load(Ordering::SeqCst)
        }
    }

    fn config(url: &str) -> OidcConfig {
        OidcConfig {
            issuer: ISS.into(),
            audience: AUD.into(),
            jwks_url: url.into(),
            namespaces_claim: "namespaces".into(),
            admin_group: Some("agentbox-admins".into()),
        }
    }

    fn quick(refetch_interval: Duration) -> Limits {
        Limits {
            refetch_interval,
            fetch_timeout: Duration::from_millis(500),
            max_key_age: MAX_KEY_AGE,
        }
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn claims() -> Value {
        json!({
            "iss": ISS,
            "aud": AUD,
            "sub": "user-123",
            "email": "alice@example.com",
            "name": "Alice",
            "preferred_username": "alice",
            "groups": ["developers", "agentbox-admins"],
            "namespaces": ["team-a", "team-b"],
            "iat": now(),
            "exp": now() + 300,
        })
    }

    fn with(mut claims: Value, changes: Value) -> Value {
        for (k, v) in changes.as_object().expect("object") {
            if v.is_null() {
                claims.as_object_mut().expect("object").remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    }

    fn sign(key: &TestKey, kid: Option<&str>, alg: Algorithm, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_rsa_der(&key.private_der),
        )
        .expect("sign")
    }

    /// A token with a hand-made header, signed (RS256) with `key` when given.
    fn raw(header: &Value, claims: &Value, key: Option<&TestKey>) -> String {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = key.map_or_else(String::new, |k| {
            jsonwebtoken::crypto::sign(
                message.as_bytes(),
                &EncodingKey::from_rsa_der(&k.private_der),
                Algorithm::RS256,
            )
            .expect("sign")
        });
        format!("{message}.{signature}")
    }

    async fn refused(oidc: &Oidc, token: &str) -> String {
        match oidc.verify(token).await {
            Err(Error::Unauthorized(message)) => message,
            Err(other) => panic!("expected Unauthorized, got {other:?}"),
            Ok(id) => panic!("token accepted: {id:?}"),
        }
    }

    #[tokio::test]
    async fn valid_tokens_give_identities() {
        let [k1, _] = keys();
        let jwks = Jwks::serve(vec![jwk(k1, "k1", Some("RS256"))]).await;
        let oidc = Oidc::new(config(&jwks.url));

        let id = oidc
            .verify(&sign(k1, Some("k1"), Algorithm::RS256, &claims()))
            .await
            .expect("valid");
        assert_eq!(
            id,
            Identity {
                sub: "user-123".into(),
                name: Some("Alice".into()),
                email: Some("alice@example.com".into()),
                groups: vec!["developers".into(), "agentbox-admins".into()],
                namespaces: Some(vec!["team-a".into(), "team-b".into()]),
                admin: true,
            }
        );
        assert!(id.can_use("team-b") && id.can_use("elsewhere"));

        // Not in the admin group, a display name from preferred_username, one namespace as a
        // string, `aud` as an array that contains ours, `nbf` in the past.
        let plain = with(
            claims(),
            json!({
                "name": null, "email": null, "groups": ["developers"], "namespaces": "team-c",
                "aud": ["other", AUD], "nbf": now() - 10,
            }),
        );
        let id = oidc
            .verify(&sign(k1, Some("k1"), Algorithm::RS256, &plain))
            .await
            .expect("valid");
        assert_eq!(id.name.as_deref(), Some("alice"));
        assert_eq!(id.email, None);
        assert!(!id.admin);
        assert_eq!(id.namespaces, Some(vec!["team-c".to_owned()]));
        assert!(id.can_use("team-c") && !id.can_use("team-a"));

        // `*` means every namespace; an absent claim means none.
        let all = with(
            claims(),
            json!({ "groups": null, "namespaces": ["team-a", "*"] }),
        );
        let id = oidc
            .verify(&sign(k1, Some("k1"), Algorithm::RS256, &all))
            .await
            .expect("valid");
        assert_eq!(id.namespaces, None);
        assert!(!id.admin && id.groups.is_empty());
        let none = with(claims(), json!({ "groups": null, "namespaces": null }));
        let id = oidc
            .verify(&sign(k1, Some("k1"), Algorithm::RS256, &none))
            .await
            .expect("valid");
        assert_eq!(id.namespaces, Some(vec![]));
        assert!(!id.can_use("default"));

        assert_eq!(jwks.fetches(), 1, "the keys are cached");
    }

    #[tokio::test]
    async fn a_custom_namespaces_claim_and_no_admin_group() {
        let [k1, _] = keys();
        let jwks = Jwks::serve(vec![jwk(k1, "k1", None)]).await;
        let mut cfg = config(&jwks.url);
        cfg.namespaces_claim = "https://agentbox.dev/namespaces".into();
        cfg.admin_group = None;
        let oidc = Oidc::new(cfg);
        let token = sign(
            k1,
            Some("k1"),
            Algorithm::PS256,
            &with(
                claims(),
                json!({ "https://agentbox.dev/namespaces": ["ops"] }),
            ),
        );
        let id = oidc.verify(&token).await.expect("valid");
        assert_eq!(id.namespaces, Some(vec!["ops".to_owned()]));
        assert!(!id.admin, "no admin group configured, no administrators");
    }

    #[tokio::test]
    async fn time_claims_are_checked_with_leeway() {
        let [k1, _] = keys();
        let jwks = Jwks::serve(vec![jwk(k1, "k1", Some("RS256"))]).await;
        let oidc = Oidc::new(config(&jwks.url));
        let token =
            |changes: Value| sign(k1, Some("k1"), Algorithm::RS256, &with(claims(), changes));

        let expired = token(json!({ "exp": now() - 120 }));
        assert_eq!(refused(&oidc, &expired).await, "token expired");
        let future = token(json!({ "nbf": now() + 300 }));
        assert_eq!(refused(&oidc, &future).await, "token not yet valid");
        let no_exp = token(json!({ "exp": null }));
        assert_eq!(refused(&oidc, &no_exp).await, "token has no exp claim");
        // jsonwebtoken counts an `exp` it cannot read as missing.
        let bad_exp = token(json!({ "exp": "tomorrow" }));
        assert_eq!(refused(&oidc, &bad_exp).await, "token has no exp claim");
        let bad_nbf = token(json!({ "nbf": "soon" }));
        assert_eq!(refused(&oidc, &bad_nbf).await, "token claims malformed");

        // Within the leeway both ways.
        oidc.verify(&token(json!({ "exp": now() - 10 })))
            .await
            .expect("just expired, within leeway");
        oidc.verify(&token(json!({ "nbf": now() + 10 })))
            .await
            .expect("nearly valid, within leeway");
    }

    #[tokio::test]
    async fn issuer_audience_and_subject_are_checked() {
        let [k1, _] = keys();
        let jwks = Jwks::serve(vec![jwk(k1, "k1", Some("RS256"))]).await;
        let oidc = Oidc::new(config(&jwks.url));
        let token =
            |changes: Value| sign(k1, Some("k1"), Algorithm::RS256, &with(claims(), changes));

        let cases = [
            (
                json!({ "iss": "https://evil.test" }),
                "token issuer not accepted",
            ),
            (
                json!({ "iss": format!("{ISS}/") }),
                "token issuer not accepted",
            ),
            (json!({ "iss": null }), "token has no iss claim"),
            (
                json!({ "aud": "someone-else" }),
                "token audience not accepted",
            ),
            (json!({ "aud": ["a", "b"] }), "token audience not accepted"),
            (json!({ "aud": null }), "token has no aud claim"),
            (json!({ "sub": null }), "token has no sub claim"),
            (json!({ "sub": "" }), "token has no subject"),
        ];
        for (changes, message) in cases {
            let shown = changes.to_string();
            assert_eq!(refused(&oidc, &token(changes)).await, message, "{shown}");
        }
    }

    #[tokio::test]
    async fn signatures_are_checked() {
        let [k1, k2] = keys();
        let jwks = Jwks::serve(vec![jwk(k1, "k1", Some("RS256"))]).await;
        let oidc = Oidc::new(config(&jwks.url));

        let forged = sign(k2, Some("k1"), Algorithm::RS256, &claims());
        assert_eq!(refused(&oidc, &forged).await, "token signature invalid");

        // A genuine signature over other claims.
        let genuine = sign(k1, Some("k1"), Algorithm::RS256, &claims());
        let parts: Vec<&str> = genuine.split('.').collect();
        let admin = with(claims(), json!({ "sub": "root", "namespaces": ["*"] }));
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(admin.to_string()),
            parts[2]
        );
        assert_eq!(refused(&oidc, &tampered).await, "token signature invalid");
        let unsigned = format!("{}.{}.", parts[0], parts[1]);
        assert_eq!(refused(&oidc, &unsigned).await, "token signature invalid");
        oidc.verify(&genuine).await.expect("the genuine one passes");
    }

    #[tokio::test]
    async fn an_unknown_kid_refetches_the_keys() {
        let [k1, k2] = keys();
        let jwks = Jwks::serve(vec![jwk(k1, "k1", Some("RS256"))]).await;
        let oidc = Oidc::with_limits(config(&jwks.url), quick(Duration::ZERO));
        oidc.verify(&sign(k1, Some("k1"), Algorithm::RS256, &claims()))
            .await
            .expect("valid");
        assert_eq!(jwks.fetches(), 1);

        let rotated = sign(k2, Some("k2"), Algorithm::RS256, &claims());
        assert_eq!(refused(&oidc, &rotated).await, "unknown signing key");
        assert_eq!(jwks.fetches(), 2, "an unknown kid fetches the keys again");

        // The issuer rotates: k2 appears in the JWKS.
        jwks.set(Some(
            json!({ "keys": [jwk(k1, "k1", Some("RS256")), jwk(k2, "k2", Some("RS256"))] }),
        ));
        let id = oidc.verify(&rotated).await.expect("accepted after refetch");
        assert_eq!(id.sub, "user-123");
        assert_eq!(jwks.fetches(), 3);
        oidc.verify(&rotated).await.expect("cached");
        oidc.verify(&sign(k1, Some("k1"), Algorithm::RS256, &claims()))
            .await
            .expect("k1 still valid");
        assert_eq!(jwks.fetches(), 3, "known kids do not fetch");
    }

    #[tokio::test]
    async fn a_flood_of_unknown_kids_fetches_at_most_once_per_interval() {
        let [k1, k2] = keys();
        let jwks = Jwks::serve(vec![jwk(k1, "k1", Some("RS256"))]).await;
        let oidc = Arc::new(Oidc::new(config(&jwks.url)));

        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let oidc = Arc::clone(&oidc);
                // The kid is refused before any signature is checked, so none is made.
                let header = json!({ "alg": "RS256", "kid": format!("bogus-{i}") });
                let token = raw(&header, &claims(), None);
                tokio::spawn(async move { oidc.verify(&token).await })
            })
            .collect();
        for task in tasks {
            match task.await.expect("join") {
                Err(Error::Unauthorized(m)) => assert_eq!(m, "unknown signing key"),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(jwks.fetches(), 1, "one fetch for the whole flood");

        oidc.verify(&sign(k1, Some("k1"), Algorithm::RS256, &claims()))
            .await
            .expect("known keys keep working");
        // Even a kid the issuer has since published waits for the interval to pass.
        jwks.set(Some(
            json!({ "keys": [jwk(k1, "k1", None), jwk(k2, "k2", None)] }),
        ));
        let rotated = sign(k2, Some("k2"), Algorithm::RS256, &claims());
        assert_eq!(refused(&oidc, &rotated).await, "unknown signing key");
        assert_eq!(jwks.fetches(), 1);
    }

    #[tokio::test]
    async fn none_and_hmac_are_refused() {
        let [k1, _] = keys();
        let jwks = Jwks::serve(vec![jwk(k1, "k1", None)]).await;
        let oidc = Oidc::new(config(&jwks.url));

        for alg in ["none", "None", "NONE", "nOnE", ""] {
            let header = json!({ "alg": alg, "typ": "JWT", "kid": "k1" });
            assert_eq!(
                refused(&oidc, &raw(&header, &claims(), None)).await,
                "algorithm not allowed",
                "{alg}"
            );
        }
        let no_alg = raw(&json!({ "typ": "JWT", "kid": "k1" }), &claims(), None);
        assert_eq!(refused(&oidc, &no_alg).await, "algorithm not allowed");

        // HMAC keyed with the public key in each encoding an attacker might guess. Each forgery
        // is real: a verifier that took the header's word would accept it.
        let k = &keys()[0];
        let secrets: [&[u8]; 5] = [
            k.spki_pem.as_bytes(),
            &k.spki_der,
            k.pkcs1_pem.as_bytes(),
            &k.pkcs1_der,
            k.n.as_bytes(),
        ];
        for secret in secrets {
            for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                let mut header = Header::new(alg);
                header.kid = Some("k1".into());
                let token =
                    jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(secret))
                        .expect("sign");
                let mut naive = Validation::new(alg);
                naive.set_audience(&[AUD]);
                jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_secret(secret), &naive)
                    .expect("the forgery is well formed");
                assert_eq!(refused(&oidc, &token).await, "algorithm not allowed");
            }
        }
        assert_eq!(jwks.fetches(), 0, "refused before any key is looked up");
    }

    #[tokio::test]
    async fn the_algorithm_must_fit_the_key() {
        let [k1, k2] = keys();
        let secret = b"a shared secret that must never be used";
        let jwks = Jwks::serve(vec![
            jwk(k1, "rs256-only", Some("RS256")),
            jwk(k2, "any-rsa", None),
            json!({ "kty": "oct", "kid": "hmac", "k": URL_SAFE_NO_PAD.encode(secret) }),
            json!({ "kty": "RSA", "kid": "enc", "use": "enc", "n": k1.n, "e": k1.e }),
            json!({ "kty": "RSA", "kid": "labelled-hs", "alg": "HS256", "n": k1.n, "e": k1.e }),
            json!({ "kty": "RSA", "kid": "no-verify", "key_ops": ["encrypt"], "n": k1.n, "e": k1.e }),
            json!({ "kty": "weird", "kid": "weird" }),
        ])
        .await;
        let oidc = Oidc::new(config(&jwks.url));

        let ps = sign(k1, Some("rs256-only"), Algorithm::PS256, &claims());
        assert_eq!(refused(&oidc, &ps).await, "algorithm not allowed");
        let rs512 = sign(k1, Some("rs256-only"), Algorithm::RS512, &claims());
        assert_eq!(refused(&oidc, &rs512).await, "algorithm not allowed");
        for alg in [Algorithm::RS256, Algorithm::RS384, Algorithm::PS512] {
            oidc.verify(&sign(k2, Some("any-rsa"), alg, &claims()))
                .await
                .expect("any RSA algorithm fits an RSA key without alg");
        }
        // An ES256 header naming an RSA key.
        let es = raw(
            &json!({ "alg": "ES256", "kid": "any-rsa" }),
            &claims(),
            Some(k2),
        );
        assert_eq!(refused(&oidc, &es).await, "algorithm not allowed");

        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("hmac".into());
        let hmac = jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(secret))
            .expect("sign");
        assert_eq!(refused(&oidc, &hmac).await, "algorithm not allowed");

        for kid in ["enc", "labelled-hs", "no-verify", "weird"] {
            let token = sign(k1, Some(kid), Algorithm::RS256, &claims());
            assert_eq!(refused(&oidc, &token).await, "unknown signing key", "{kid}");
        }
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let [k1, _] = keys();
        let jwks = Jwks::serve(vec![jwk(k1, "k1", None)]).await;
        let oidc = Oidc::new(config(&jwks.url));
        let good = sign(k1, Some("k1"), Algorithm::RS256, &claims());
        let parts: Vec<&str> = good.split('.').collect();
        let long = format!("{}.{}.{}", parts[0], "A".repeat(MAX_TOKEN_BYTES), parts[2]);
        let garbage = [
            String::new(),
            "garbage".into(),
            "eyJ.eyJ.eyJ".into(),
            "a.b.c.d".into(),
            "....".into(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{good}.extra"),
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode("not json"),
                parts[1],
                parts[2]
            ),
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode("[1,2]"),
                parts[1],
                parts[2]
            ),
            format!("{}.{}.{}", parts[0], "!!!", parts[2]),
            format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode("[]"), parts[2]),
            format!("{}.{}.{}", parts[0], parts[1], "%%%"),
            raw(&json!({ "alg": "RS256", "kid": 7 }), &claims(), Some(k1)),
            long,
        ];
        for token in &garbage {
            let message = refused(&oidc, token).await;
            assert!(!message.contains(token.as_str()) || token.is_empty());
        }
        let crit = raw(
            &json!({ "alg": "RS256", "kid": "k1", "crit": ["exp"], "exp": 1 }),
            &claims(),
            Some(k1),
        );
        assert_eq!(
            refused(&oidc, &crit).await,
            "token has critical header extensions"
        );
        oidc.verify(&raw(
            &json!({ "alg": "RS256", "kid": "k1" }),
            &claims(),
            Some(k1),
        ))
        .await
        .expect("the same hand-made token without crit passes");
    }

    #[tokio::test]
    async fn a_token_without_kid_needs_a_single_key() {
        let [k1, k2] = keys();
        let jwks = Jwks::serve(vec![jwk(k1, "k1", None)]).await;
        let oidc = Oidc::with_limits(config(&jwks.url), quick(Duration::ZERO));
        oidc.verify(&sign(k1, None, Algorithm::RS256, &claims()))
            .await
            .expect("one key: it is the one");
        jwks.set(Some(
            json!({ "keys": [jwk(k1, "k1", None), jwk(k2, "k2", None)] }),
        ));
        oidc.verify(&sign(k2, Some("k2"), Algorithm::RS256, &claims()))
            .await
            .expect("refetched");
        let token = sign(k1, None, Algorithm::RS256, &claims());
        assert_eq!(
            refused(&oidc, &token).await,
            "token names no signing key (kid)"
        );
    }

    #[tokio::test]
    async fn jwks_failures_refuse_and_recover() {
        let [k1, _] = keys();
        let jwks = Jwks::serve(vec![jwk(k1, "k1", None)]).await;
        jwks.set(None);
        let oidc = Oidc::with_limits(config(&jwks.url), quick(Duration::ZERO));
        let token = sign(k1, Some("k1"), Algorithm::RS256, &claims());
        assert_eq!(
            refused(&oidc, &token).await,
            "the issuer's signing keys are unavailable"
        );
        jwks.set(Some(json!({ "not": "a jwks" })));
        assert_eq!(
            refused(&oidc, &token).await,
            "the issuer's signing keys are unavailable"
        );
        jwks.set(Some(json!({ "keys": [jwk(k1, "k1", None)] })));
        oidc.verify(&token).await.expect("recovered");
        assert_eq!(jwks.fetches(), 3);

        // Once keys are known, a failed refetch keeps them.
        jwks.set(None);
        let unknown = sign(k1, Some("k9"), Algorithm::RS256, &claims());
        assert_eq!(refused(&oidc, &unknown).await, "unknown signing key");
        oidc.verify(&token).await.expect("old keys kept");

        // Nothing listening.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let closed = format!("http://{}/jwks", listener.local_addr().expect("addr"));
        drop(listener);
        let oidc = Oidc::with_limits(config(&closed), quick(Duration::ZERO));
        assert_eq!(
            refused(&oidc, &token).await,
            "the issuer's signing keys are unavailable"
        );
    }

    #[tokio::test]
    async fn a_hanging_jwks_times_out() {
        let [k1, _] = keys();
        // Accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&held);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                keep.lock().expect("lock").push(socket);
            }
        });
        let oidc = Oidc::with_limits(config(&url), quick(Duration::ZERO));
        let started = Instant::now();
        let token = sign(k1, Some("k1"), Algorithm::RS256, &claims());
        assert_eq!(
            refused(&oidc, &token).await,
            "the issuer's signing keys are unavailable"
        );
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert!(!held.lock().expect("lock").is_empty(), "it did connect");
    }

    #[tokio::test]
    async fn an_oversized_jwks_is_refused() {
        let [k1, _] = keys();
        let padding = "x".repeat(MAX_JWKS_BYTES);
        let jwks = Jwks::serve(vec![jwk(k1, "k1", None), json!({ "padding": padding })]).await;
        let oidc = Oidc::with_limits(config(&jwks.url), quick(Duration::ZERO));
        let token = sign(k1, Some("k1"), Algorithm::RS256, &claims());
        assert_eq!(
            refused(&oidc, &token).await,
            "the issuer's signing keys are unavailable"
        );
    }

    #[tokio::test]
    async fn withdrawn_keys_stop_working_once_the_cache_ages() {
        let [k1, k2] = keys();
        let jwks = Jwks::serve(vec![jwk(k1, "k1", None)]).await;
        let limits = Limits {
            max_key_age: Duration::from_millis(300),
            ..quick(Duration::ZERO)
        };
        let oidc = Oidc::with_limits(config(&jwks.url), limits);
        let token = sign(k1, Some("k1"), Algorithm::RS256, &claims());
        oidc.verify(&token).await.expect("valid");

        // The issuer answers 500 for a while: old keys stay in force.
        jwks.set(None);
        tokio::time::sleep(Duration::from_millis(400)).await;
        oidc.verify(&token).await.expect("stale but kept");
        assert_eq!(jwks.fetches(), 2);

        // The issuer withdraws k1.
        jwks.set(Some(json!({ "keys": [jwk(k2, "k2", None)] })));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(refused(&oidc, &token).await, "unknown signing key");
    }
}
