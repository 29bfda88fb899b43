//! `auth_jwt` verification (LANGUAGE.md §6, §13.10): every rejection reason,
//! key sources (PEM, secret, JWKS file, JWKS over HTTP with refresh), token
//! extraction, the remembered-token cache. Keys are generated at test time.

// A failed setup step should stop the test with its panic.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue};
use serde_json::{Value, json};
use tollgate::config::model::{JwtAlg, JwtDef, JwtKeySource, TokenFrom};
use tollgate::policy::jwt::{JwtVerifier, Reject, extract, www_authenticate};

enum Signer {
    Hmac(Vec<u8>),
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

impl Signer {
    fn rsa() -> Signer {
        Signer::Rsa(RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap())
    }
    fn es256() -> Signer {
        Signer::Ec(EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap())
    }
    fn es384() -> Signer {
        Signer::Ec(EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING).unwrap())
    }
    fn ed() -> Signer {
        Signer::Ed(Ed25519KeyPair::generate().unwrap())
    }

    fn alg(&self) -> &'static str {
        match self {
            Signer::Hmac(_) => "HS256",
            Signer::Rsa(_) => "RS256",
            Signer::Ec(k) if k.public_key().as_ref().len() == 65 => "ES256",
            Signer::Ec(_) => "ES384",
            Signer::Ed(_) => "EdDSA",
        }
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match self {
            Signer::Hmac(s) => {
                let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, s);
                aws_lc_rs::hmac::sign(&key, msg).as_ref().to_vec()
            }
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .unwrap();
                sig
            }
            Signer::Ec(k) => k.sign(&rng, msg).unwrap().as_ref().to_vec(),
            Signer::Ed(k) => k.sign(msg).as_ref().to_vec(),
        }
    }

    fn public_pem(&self) -> String {
        let der = match self {
            Signer::Hmac(_) => unreachable!(),
            Signer::Rsa(k) => k.public_key().as_der().unwrap().as_ref().to_vec(),
            Signer::Ec(k) => k.public_key().as_der().unwrap().as_ref().to_vec(),
            Signer::Ed(k) => k.public_key().as_der().unwrap().as_ref().to_vec(),
        };
        pem::encode(&pem::Pem::new("PUBLIC KEY", der))
    }

    fn jwk(&self, kid: &str) -> Value {
        let b = |v: &[u8]| URL_SAFE_NO_PAD.encode(v);
        match self {
            Signer::Ec(k) => {
                let p = k.public_key().as_ref();
                let n = (p.len() - 1) / 2;
                let crv = if n == 32 { "P-256" } else { "P-384" };
                json!({"kty": "EC", "crv": crv, "kid": kid, "x": b(&p[1..1 + n]), "y": b(&p[1 + n..])})
            }
            Signer::Ed(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b(k.public_key().as_ref())})
            }
            _ => unreachable!("the JWKS tests use EC and Ed25519 keys"),
        }
    }

    /// A token with this header (alg filled in unless given) and claims.
    fn token_with(&self, mut header: Value, claims: &Value) -> String {
        if header.get("alg").is_none() {
            header["alg"] = json!(self.alg());
        }
        let msg = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = URL_SAFE_NO_PAD.encode(self.sign(msg.as_bytes()));
        format!("{msg}.{sig}")
    }

    fn token(&self, claims: &Value) -> String {
        self.token_with(json!({"typ": "JWT"}), claims)
    }
}

const NOW: u64 = 1_800_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn good_claims() -> Value {
    json!({"sub": "alice", "exp": NOW + 600, "iat": NOW, "iss": "https://auth.example.com/", "aud": "orders-api", "admin": true, "n": 7, "roles": ["a", "b"]})
}

fn def(algs: &[JwtAlg], keys: JwtKeySource) -> JwtDef {
    JwtDef {
        name: "users_api".into(),
        span: Default::default(),
        algorithms: algs.to_vec(),
        keys,
        issuer: None,
        audience: None,
        leeway: Duration::from_secs(30),
        require_claims: vec![],
        token_from: TokenFrom::Header("authorization".into()),
        forward_claims: vec![],
    }
}

fn key_file(dir: &tempfile::TempDir, name: &str, signers: &[&Signer]) -> JwtKeySource {
    let path = dir.path().join(name);
    let text: String = signers.iter().map(|s| s.public_pem()).collect();
    std::fs::write(&path, text).unwrap();
    JwtKeySource::KeyFile(path)
}

fn verifier(algs: &[JwtAlg], signer: &Signer) -> (JwtVerifier, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let keys = match signer {
        Signer::Hmac(s) => JwtKeySource::Secret(String::from_utf8(s.clone()).unwrap()),
        s => key_file(&dir, "pub.pem", &[s]),
    };
    (JwtVerifier::new(&def(algs, keys)).unwrap(), dir)
}

#[test]
fn each_algorithm_verifies_and_yields_claims() {
    let cases = [
        (
            JwtAlg::HS256,
            Signer::Hmac(b"a long enough shared secret!!".to_vec()),
        ),
        (JwtAlg::RS256, Signer::rsa()),
        (JwtAlg::ES256, Signer::es256()),
        (JwtAlg::ES384, Signer::es384()),
        (JwtAlg::EdDSA, Signer::ed()),
    ];
    for (alg, signer) in &cases {
        let (v, _dir) = verifier(&[*alg], signer);
        let claims = v
            .verify(&signer.token(&good_claims()), now())
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(claims.get("sub").as_deref(), Some("alice"));
        assert_eq!(claims.get("admin").as_deref(), Some("true"));
        assert_eq!(claims.get("n").as_deref(), Some("7"));
        assert_eq!(claims.get("roles").as_deref(), Some(r#"["a","b"]"#));
        assert_eq!(claims.get("nope"), None);
    }
}

#[test]
fn a_pem_file_may_hold_several_keys() {
    let (a, b) = (Signer::es256(), Signer::ed());
    let dir = tempfile::tempdir().unwrap();
    let v = JwtVerifier::new(&def(
        &[JwtAlg::ES256, JwtAlg::EdDSA],
        key_file(&dir, "k.pem", &[&a, &b]),
    ))
    .unwrap();
    assert_eq!(v.key_count(), 2);
    assert!(v.verify(&a.token(&good_claims()), now()).is_ok());
    assert!(v.verify(&b.token(&good_claims()), now()).is_ok());
    let other = Signer::es256();
    assert_eq!(
        v.verify(&other.token(&good_claims()), now()),
        Err(Reject::BadSignature)
    );
}

#[test]
fn the_algorithm_comes_from_the_config_never_the_token() {
    let rsa = Signer::rsa();
    let (v, _dir) = verifier(&[JwtAlg::RS256], &rsa);
    let claims = good_claims();
    // alg none, any casing, with or without a signature.
    for none in ["none", "None", "NONE"] {
        let t = rsa.token_with(json!({"alg": none}), &claims);
        assert_eq!(v.verify(&t, now()), Err(Reject::NoneAlg));
        let unsigned = format!("{}.", t.rsplit_once('.').unwrap().0);
        assert_eq!(v.verify(&unsigned, now()), Err(Reject::NoneAlg));
    }
    // A listed family but an unlisted algorithm, and a made-up one.
    assert_eq!(
        v.verify(&rsa.token_with(json!({"alg": "RS512"}), &claims), now()),
        Err(Reject::BadAlg)
    );
    assert_eq!(
        v.verify(&rsa.token_with(json!({"alg": "XX1"}), &claims), now()),
        Err(Reject::BadAlg)
    );
    // The classic confusion: HMAC keyed with the public key's PEM.
    let confused = Signer::Hmac(rsa.public_pem().into_bytes());
    assert_eq!(
        v.verify(&confused.token(&claims), now()),
        Err(Reject::BadAlg)
    );
    // Listed, but the key is of another type.
    let dir = tempfile::tempdir().unwrap();
    let v2 = JwtVerifier::new(&def(
        &[JwtAlg::RS256, JwtAlg::ES256],
        key_file(&dir, "k.pem", &[&rsa]),
    ))
    .unwrap();
    assert_eq!(
        v2.verify(&Signer::es256().token(&claims), now()),
        Err(Reject::KeyTypeMismatch)
    );
    // ES256 listed with a P-384 key.
    let p384 = Signer::es384();
    let v3 =
        JwtVerifier::new(&def(&[JwtAlg::ES256], key_file(&dir, "p384.pem", &[&p384]))).unwrap();
    assert_eq!(
        v3.verify(&p384.token_with(json!({"alg": "ES256"}), &claims), now()),
        Err(Reject::KeyTypeMismatch)
    );
}

#[test]
fn crit_headers_are_refused() {
    let s = Signer::ed();
    let (v, _dir) = verifier(&[JwtAlg::EdDSA], &s);
    for crit in [json!(["exp"]), json!([]), json!("b64")] {
        let t = s.token_with(json!({"crit": crit}), &good_claims());
        assert_eq!(v.verify(&t, now()), Err(Reject::UnknownCrit));
    }
}

#[test]
fn time_claims() {
    let s = Signer::ed();
    let (v, _dir) = verifier(&[JwtAlg::EdDSA], &s);
    let check = |claims: Value| v.verify_uncached(&s.token(&claims), now());
    assert_eq!(
        check(json!({"sub": "a"})),
        Err(Reject::MissingClaim("exp".into()))
    );
    assert_eq!(check(json!({"exp": NOW - 31})), Err(Reject::Expired));
    assert_eq!(check(json!({"exp": NOW - 30})), Err(Reject::Expired));
    assert!(
        check(json!({"exp": NOW - 29})).is_ok(),
        "within the 30s leeway"
    );
    assert_eq!(
        check(json!({"exp": NOW + 60, "nbf": NOW + 31})),
        Err(Reject::NotYetValid)
    );
    assert!(
        check(json!({"exp": NOW + 60, "nbf": NOW + 30})).is_ok(),
        "within the leeway"
    );
    assert!(
        check(json!({"exp": (NOW + 60) as f64 + 0.5})).is_ok(),
        "NumericDate may be fractional"
    );
    for bad in [
        json!({"exp": "1900000000"}),
        json!({"exp": NOW + 60, "nbf": "0"}),
        json!({"exp": NOW + 60, "iat": null}),
        json!({"exp": NOW + 60, "iat": "now"}),
        json!({"exp": true}),
    ] {
        assert_eq!(check(bad.clone()), Err(Reject::Malformed), "{bad}");
    }
}

#[test]
fn issuer_audience_and_required_claims() {
    let s = Signer::es256();
    let dir = tempfile::tempdir().unwrap();
    let mut d = def(&[JwtAlg::ES256], key_file(&dir, "k.pem", &[&s]));
    d.issuer = Some("https://auth.example.com/".into());
    d.audience = Some("orders-api".into());
    d.require_claims = vec!["sub".into()];
    let v = JwtVerifier::new(&d).unwrap();
    let check = |claims: Value| v.verify_uncached(&s.token(&claims), now());
    assert!(check(good_claims()).is_ok());
    let with = |k: &str, val: Value| {
        let mut c = good_claims();
        c[k] = val;
        c
    };
    let without = |k: &str| {
        let mut c = good_claims();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    assert_eq!(
        check(without("iss")),
        Err(Reject::MissingClaim("iss".into()))
    );
    assert_eq!(
        check(with("iss", json!("https://evil.example.com/"))),
        Err(Reject::BadIssuer)
    );
    assert_eq!(
        check(with("iss", json!(["https://auth.example.com/"]))),
        Err(Reject::BadIssuer)
    );
    assert_eq!(
        check(without("aud")),
        Err(Reject::MissingClaim("aud".into()))
    );
    assert_eq!(
        check(with("aud", json!("billing"))),
        Err(Reject::BadAudience)
    );
    assert!(check(with("aud", json!(["billing", "orders-api"]))).is_ok());
    assert_eq!(
        check(with("aud", json!(["billing"]))),
        Err(Reject::BadAudience)
    );
    assert_eq!(
        check(without("sub")),
        Err(Reject::MissingClaim("sub".into()))
    );
    assert_eq!(
        check(with("sub", Value::Null)),
        Err(Reject::MissingClaim("sub".into()))
    );
}

#[test]
fn malformed_tampered_and_oversized_tokens() {
    let s = Signer::Hmac(b"a long enough shared secret!!".to_vec());
    let (v, _dir) = verifier(&[JwtAlg::HS256], &s);
    let t = s.token(&good_claims());
    for bad in ["", "abc", "a.b", "a.b.c.d", "!!.e30.x", &format!("{t}.")] {
        assert_eq!(v.verify(bad, now()), Err(Reject::Malformed), "{bad:?}");
    }
    // A header that is JSON but not an object; padded base64.
    let arr = format!("{}.e30.sig", URL_SAFE_NO_PAD.encode("[1]"));
    assert_eq!(v.verify(&arr, now()), Err(Reject::Malformed));
    let (h, rest) = t.split_once('.').unwrap();
    assert_eq!(
        v.verify(&format!("{h}=.{rest}"), now()),
        Err(Reject::Malformed)
    );
    // A payload changed after signing.
    let (head, _) = t.rsplit_once('.').unwrap();
    let sig = t.rsplit_once('.').unwrap().1;
    let (h64, _) = head.split_once('.').unwrap();
    let mut evil = good_claims();
    evil["sub"] = json!("root");
    let forged = format!("{h64}.{}.{sig}", URL_SAFE_NO_PAD.encode(evil.to_string()));
    assert_eq!(v.verify(&forged, now()), Err(Reject::BadSignature));
    // Over 8k, refused before anything else.
    let mut big = good_claims();
    big["pad"] = json!("x".repeat(8 * 1024));
    assert_eq!(v.verify(&s.token(&big), now()), Err(Reject::TooLarge));
    assert_eq!(v.verify(&"a".repeat(8193), now()), Err(Reject::TooLarge));
}

#[test]
fn remembered_tokens_never_outlive_exp() {
    let s = Signer::ed();
    let (v, _dir) = verifier(&[JwtAlg::EdDSA], &s);
    let t = s.token(&json!({"sub": "a", "exp": NOW + 10}));
    let first = v.verify(&t, now()).unwrap();
    assert_eq!(v.remembered(), 1);
    let again = v.verify(&t, now()).unwrap();
    assert!(
        Arc::ptr_eq(&first, &again),
        "the second answer comes from the cache"
    );
    // exp + leeway (30s) is the end, remembered or not.
    assert!(v.verify(&t, now() + Duration::from_secs(39)).is_ok());
    assert_eq!(
        v.verify(&t, now() + Duration::from_secs(40)),
        Err(Reject::Expired)
    );
    assert_eq!(v.remembered(), 0);
    // A refused token is not remembered.
    let _ = v.verify(&Signer::ed().token(&good_claims()), now());
    assert_eq!(v.remembered(), 0);
}

#[test]
fn remembered_tokens_are_bounded_by_bytes_and_matched_whole() {
    use tollgate::policy::jwt::TOKEN_CACHE_BYTES;
    let s = Signer::ed();
    let (v, _dir) = verifier(&[JwtAlg::EdDSA], &s);
    // A remembered token answers only for exactly its own bytes: the same
    // token with its signature's last character changed is checked again.
    let t = s.token(&good_claims());
    v.verify(&t, now()).unwrap();
    let mut other = t.clone();
    let last = other.pop().unwrap();
    other.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(v.verify(&other, now()), Err(Reject::BadSignature));
    // Many large valid tokens: what is kept stays under the byte bound.
    let mut len = 0;
    for i in 0..800 {
        let mut c = good_claims();
        c["pad"] = json!(format!("{i}{}", "x".repeat(5 * 1024)));
        let t = s.token(&c);
        len = t.len();
        v.verify(&t, now()).unwrap();
    }
    let kept = v.remembered();
    assert!(kept > 100, "large tokens are still remembered ({kept})");
    assert!(
        (kept as u64) * (len as u64) <= TOKEN_CACHE_BYTES,
        "{kept} tokens of {len} bytes exceed {TOKEN_CACHE_BYTES}"
    );
}

#[test]
fn extraction() {
    let mut h = HeaderMap::new();
    let auth = TokenFrom::Header("authorization".into());
    assert_eq!(extract(&h, "", &auth), None);
    h.insert(
        "authorization",
        HeaderValue::from_static("Bearer abc.def.ghi"),
    );
    assert_eq!(extract(&h, "", &auth), Some("abc.def.ghi"));
    h.insert(
        "authorization",
        HeaderValue::from_static("bearer   abc.def.ghi "),
    );
    assert_eq!(extract(&h, "", &auth), Some("abc.def.ghi"));
    h.insert(
        "authorization",
        HeaderValue::from_static("Basic dXNlcjpwYXNz"),
    );
    assert_eq!(extract(&h, "", &auth), None);
    h.insert("authorization", HeaderValue::from_static("Bearer "));
    assert_eq!(extract(&h, "", &auth), None);

    let custom = TokenFrom::Header("x-token".into());
    h.insert("x-token", HeaderValue::from_static("t1.t2.t3"));
    assert_eq!(extract(&h, "", &custom), Some("t1.t2.t3"));

    let cookie = TokenFrom::Cookie("jwt".into());
    h.insert("cookie", HeaderValue::from_static("a=1; jwt=c1.c2.c3; b=2"));
    h.append("cookie", HeaderValue::from_static("z=9"));
    assert_eq!(extract(&h, "", &cookie), Some("c1.c2.c3"));
    assert_eq!(extract(&h, "", &TokenFrom::Cookie("jw".into())), None);

    let query = TokenFrom::Query("access_token".into());
    assert_eq!(
        extract(&h, "x=1&access_token=q1.q2.q3&y", &query),
        Some("q1.q2.q3")
    );
    assert_eq!(extract(&h, "access_token=", &query), None);
    assert_eq!(extract(&h, "access_tokens=a", &query), None);
}

#[test]
fn the_401_header_and_messages() {
    assert_eq!(
        www_authenticate("users_api", false),
        "Bearer realm=\"users_api\""
    );
    assert_eq!(
        www_authenticate("users_api", true),
        "Bearer realm=\"users_api\", error=\"invalid_token\""
    );
    assert_eq!(Reject::Missing.message(), "No token provided");
    assert!(!Reject::Missing.is_invalid());
    for r in [
        Reject::Expired,
        Reject::BadSignature,
        Reject::TooLarge,
        Reject::UnknownKid,
    ] {
        assert_eq!(r.message(), "Invalid token");
        assert!(r.is_invalid());
        assert_eq!(r.status(), 401);
    }
    let s = Signer::ed();
    let (v, _dir) = verifier(&[JwtAlg::EdDSA], &s);
    assert_eq!(
        v.authenticate(&HeaderMap::new(), "", now()),
        Err(Reject::Missing)
    );
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        format!("Bearer {}", s.token(&good_claims()))
            .parse()
            .unwrap(),
    );
    assert_eq!(
        v.authenticate(&h, "", now()).unwrap().get("sub").as_deref(),
        Some("alice")
    );
}

#[test]
fn key_files_that_are_not_public_keys_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.pem");
    std::fs::write(&p, "no pem here").unwrap();
    assert!(JwtVerifier::new(&def(&[JwtAlg::RS256], JwtKeySource::KeyFile(p.clone()))).is_err());
    std::fs::write(
        &p,
        pem::encode(&pem::Pem::new("PRIVATE KEY", vec![1, 2, 3])),
    )
    .unwrap();
    assert!(JwtVerifier::new(&def(&[JwtAlg::RS256], JwtKeySource::KeyFile(p))).is_err());
    let missing = dir.path().join("missing.pem");
    assert!(JwtVerifier::new(&def(&[JwtAlg::RS256], JwtKeySource::KeyFile(missing))).is_err());
}

fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

#[test]
fn jwks_file_selects_by_kid() {
    let (a, b, ed) = (Signer::es256(), Signer::es256(), Signer::ed());
    let mut ed_jwk = ed.jwk("e1");
    ed_jwk["alg"] = json!("EdDSA");
    let mut enc_only = a.jwk("enc");
    enc_only["use"] = json!("enc");
    let doc = jwks(&[
        a.jwk("k1"),
        b.jwk("k2"),
        ed_jwk,
        enc_only,
        json!({"kty": "weird"}),
        json!({"kty": "oct", "k": "c2VjcmV0", "kid": "h"}),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("jwks.json");
    std::fs::write(&p, doc).unwrap();
    let v = JwtVerifier::new(&def(
        &[JwtAlg::ES256, JwtAlg::EdDSA, JwtAlg::HS256],
        JwtKeySource::JwksFile(p),
    ))
    .unwrap();
    assert_eq!(
        v.key_count(),
        3,
        "odd, encryption-only and symmetric keys are skipped"
    );
    let c = good_claims();
    assert!(
        v.verify(&a.token_with(json!({"kid": "k1"}), &c), now())
            .is_ok()
    );
    assert!(
        v.verify(&b.token_with(json!({"kid": "k2"}), &c), now())
            .is_ok()
    );
    assert!(
        v.verify(&ed.token_with(json!({"kid": "e1"}), &c), now())
            .is_ok()
    );
    assert_eq!(
        v.verify(&a.token_with(json!({"kid": "k2"}), &c), now()),
        Err(Reject::BadSignature)
    );
    assert_eq!(
        v.verify(&a.token_with(json!({"kid": "k9"}), &c), now()),
        Err(Reject::UnknownKid)
    );
    assert_eq!(
        v.verify(&a.token_with(json!({"kid": "e1"}), &c), now()),
        Err(Reject::KeyTypeMismatch)
    );
    assert_eq!(
        v.verify(&a.token_with(json!({"kid": 5}), &c), now()),
        Err(Reject::Malformed)
    );
    // No kid: every key that fits is tried.
    assert!(v.verify(&b.token(&c), now()).is_ok());
    // A symmetric key never comes from a JWKS.
    let h = Signer::Hmac(b"secret".to_vec());
    assert_eq!(
        v.verify(&h.token_with(json!({"kid": "h"}), &c), now()),
        Err(Reject::UnknownKid)
    );
}

/// A JWKS server on 127.0.0.1:0 whose document and status can be changed,
/// counting the fetches and announcing each on a watch channel.
struct JwksServer {
    url: String,
    body: Arc<std::sync::Mutex<(u16, String)>>,
    hits: Arc<AtomicUsize>,
    hit_rx: tokio::sync::watch::Receiver<usize>,
}

impl JwksServer {
    async fn start(doc: String) -> JwksServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let body = Arc::new(std::sync::Mutex::new((200u16, doc)));
        let hits = Arc::new(AtomicUsize::new(0));
        let (tx, hit_rx) = tokio::sync::watch::channel(0);
        let (b, h) = (body.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let (status, doc) = b.lock().unwrap().clone();
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{doc}",
                    doc.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = tx.send(n);
            }
        });
        JwksServer {
            url,
            body,
            hits,
            hit_rx,
        }
    }

    fn set(&self, status: u16, doc: String) {
        *self.body.lock().unwrap() = (status, doc);
    }

    async fn wait_hits(&mut self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), self.hit_rx.wait_for(|h| *h >= n))
            .await
            .expect("the JWKS fetch came")
            .unwrap();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn jwks_url_fetches_refreshes_on_unknown_kid_and_keeps_keys_on_failure() {
    let (k1, k2, k3) = (Signer::es256(), Signer::es256(), Signer::es256());
    let mut server = JwksServer::start(jwks(&[k1.jwk("k1")])).await;
    let refresh = Duration::from_secs(3600);
    let v = JwtVerifier::new(&def(
        &[JwtAlg::ES256],
        JwtKeySource::JwksUrl {
            url: server.url.clone(),
            refresh,
        },
    ))
    .unwrap();
    // The background task fetches at once.
    server.wait_hits(1).await;
    assert_eq!(v.refresh_keys().await.unwrap(), 1);
    assert_eq!(server.hits.load(Ordering::SeqCst), 2);
    let c = good_claims();
    assert!(
        v.verify(&k1.token_with(json!({"kid": "k1"}), &c), now())
            .is_ok()
    );

    // Rotation: an unknown kid is refused with the keys held, and wakes one refetch.
    server.set(200, jwks(&[k1.jwk("k1"), k2.jwk("k2")]));
    let t2 = k2.token_with(json!({"kid": "k2"}), &c);
    assert_eq!(v.verify(&t2, now()), Err(Reject::UnknownKid));
    server.wait_hits(3).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while v.key_count() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refetched keys were swapped in"
        );
        tokio::task::yield_now().await;
    }
    assert!(v.verify(&t2, now()).is_ok());

    // A second unknown kid within the same `refresh` window fetches nothing.
    let t3 = k3.token_with(json!({"kid": "k3"}), &c);
    assert_eq!(v.verify(&t3, now()), Err(Reject::UnknownKid));
    assert_eq!(v.verify(&t3, now()), Err(Reject::UnknownKid));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.hits.load(Ordering::SeqCst), 3);

    // A failed fetch (bad status, then a broken document) keeps the keys held.
    server.set(500, String::new());
    assert!(v.refresh_keys().await.is_err());
    server.set(200, "{not json".into());
    assert!(v.refresh_keys().await.is_err());
    server.set(200, jwks(&[]));
    assert!(v.refresh_keys().await.is_err());
    assert_eq!(v.key_count(), 2);
    assert!(v.verify_uncached(&t2, now()).is_ok());
}

#[tokio::test(flavor = "current_thread")]
async fn jwks_https_is_verified_against_the_system_roots() {
    // A TLS server whose self-signed certificate no system root vouches
    // for: the fetch must speak TLS and refuse the certificate (it never
    // falls back to plain HTTP or skips verification).
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = acceptor.accept(s).await;
        }
    });
    let v = JwtVerifier::new(&def(
        &[JwtAlg::ES256],
        JwtKeySource::JwksUrl {
            url: format!("https://127.0.0.1:{port}/jwks.json"),
            refresh: Duration::from_secs(60),
        },
    ))
    .unwrap();
    assert!(
        v.refresh_keys().await.is_err(),
        "an untrusted certificate is refused"
    );
    assert!(
        handshakes.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "TLS was attempted"
    );
    assert_eq!(
        v.verify(
            &Signer::es256().token_with(json!({"kid": "a"}), &good_claims()),
            now()
        ),
        Err(Reject::UnknownKid)
    );
}
