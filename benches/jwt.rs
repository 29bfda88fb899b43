//! `auth_jwt` cost per request: a cold verification (signature + claims)
//! against a remembered token (SHA-256 of the token + a cache lookup), for
//! HS256, RS256, ES256 and EdDSA. Keys are generated at start.
//!
//! `cargo bench --bench jwt -- --warm-up-time 1 --measurement-time 3`

// A failed setup step should stop the test with its panic.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::config::model::{JwtAlg, JwtDef, JwtKeySource, TokenFrom};
use tollgate::policy::jwt::JwtVerifier;

type SignFn = Box<dyn Fn(&[u8]) -> Vec<u8>>;

const NOW: u64 = 1_800_000_000;
const SECRET: &[u8] = b"a shared secret of thirty-two by";

/// (alg, verifier, token) for one algorithm.
fn setup(alg: JwtAlg, dir: &std::path::Path) -> (JwtVerifier, String) {
    let rng = SystemRandom::new();
    let (name, pem_der, sign): (&str, Option<Vec<u8>>, SignFn) = match alg {
        JwtAlg::HS256 => (
            "HS256",
            None,
            Box::new(|m: &[u8]| {
                let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET);
                aws_lc_rs::hmac::sign(&k, m).as_ref().to_vec()
            }),
        ),
        JwtAlg::RS256 => {
            let k = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
            let der = k.public_key().as_der().unwrap().as_ref().to_vec();
            (
                "RS256",
                Some(der),
                Box::new(move |m: &[u8]| {
                    let mut sig = vec![0; k.public_modulus_len()];
                    k.sign(&signature::RSA_PKCS1_SHA256, &rng, m, &mut sig)
                        .unwrap();
                    sig
                }),
            )
        }
        JwtAlg::ES256 => {
            let k = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
            let der = k.public_key().as_der().unwrap().as_ref().to_vec();
            (
                "ES256",
                Some(der),
                Box::new(move |m: &[u8]| k.sign(&rng, m).unwrap().as_ref().to_vec()),
            )
        }
        JwtAlg::EdDSA => {
            let k = Ed25519KeyPair::generate().unwrap();
            let der = k.public_key().as_der().unwrap().as_ref().to_vec();
            (
                "EdDSA",
                Some(der),
                Box::new(move |m: &[u8]| k.sign(m).as_ref().to_vec()),
            )
        }
        other => unreachable!("{other:?} is not benched"),
    };
    let keys = match pem_der {
        None => JwtKeySource::Secret(String::from_utf8(SECRET.to_vec()).unwrap()),
        Some(der) => {
            let path = dir.join(format!("{name}.pem"));
            std::fs::write(&path, pem::encode(&pem::Pem::new("PUBLIC KEY", der))).unwrap();
            JwtKeySource::KeyFile(path)
        }
    };
    let def = JwtDef {
        name: "bench".into(),
        span: Default::default(),
        algorithms: vec![alg],
        keys,
        issuer: Some("https://auth.example.com/".into()),
        audience: Some("orders-api".into()),
        leeway: Duration::from_secs(30),
        require_claims: vec!["sub".into()],
        token_from: TokenFrom::Header("authorization".into()),
        forward_claims: vec![],
    };
    let header = serde_json::json!({"alg": name, "typ": "JWT"});
    let claims = serde_json::json!({
        "sub": "user-1234567890", "iss": "https://auth.example.com/", "aud": "orders-api",
        "exp": NOW + 3600, "iat": NOW, "scope": "orders:read orders:write", "tenant": "acme"
    });
    let msg = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let token = format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sign(msg.as_bytes())));
    (JwtVerifier::new(&def).unwrap(), token)
}

fn verify(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let mut g = c.benchmark_group("jwt_verify");
    for alg in [JwtAlg::HS256, JwtAlg::RS256, JwtAlg::ES256, JwtAlg::EdDSA] {
        let (v, token) = setup(alg, dir.path());
        assert!(v.verify_uncached(&token, now).is_ok());
        g.bench_function(format!("{alg:?}/cold"), |b| {
            b.iter(|| v.verify_uncached(black_box(&token), black_box(now)))
        });
        assert!(v.verify(&token, now).is_ok());
        g.bench_function(format!("{alg:?}/remembered"), |b| {
            b.iter(|| v.verify(black_box(&token), black_box(now)))
        });
    }
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
