//! JSON Web Tokens, sans IO: parsing a bearer token (bounded), choosing the
//! key from a JWKS, verifying the signature (RS256, ES256, EdDSA — never
//! `none`, and never an algorithm the key was not made for) and checking
//! the claims against an issuer's rules with the caller's clock.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{self, UnparsedPublicKey};
use serde_json::Value;
use thiserror::Error;

/// Longest token accepted (bytes).
pub const MAX_TOKEN: usize = 8 * 1024;
/// Largest JWKS document accepted (bytes).
pub const MAX_JWKS: usize = 64 * 1024;
/// Most keys one JWKS may hold.
pub const MAX_KEYS: usize = 32;

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JwtError {
    /// Not three base64url parts, or not JSON where JSON belongs.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// Longer than [`MAX_TOKEN`].
    #[error("token longer than {MAX_TOKEN} bytes")]
    TooLong,
    /// An algorithm this gateway does not accept (`none` included).
    #[error("algorithm {0:?} is not accepted (use RS256, ES256 or EdDSA)")]
    Algorithm(String),
    /// No key of the issuer's set fits the token (kid and algorithm).
    #[error("no key of the issuer's key set matches the token")]
    NoKey,
    /// The signature does not verify.
    #[error("bad signature")]
    Signature,
    /// `iss` is not a configured issuer.
    #[error("issuer {0:?} is not trusted")]
    Issuer(String),
    /// `aud` names none of the configured audiences.
    #[error("audience is not one of {0:?}")]
    Audience(Vec<String>),
    /// Past `exp` (with the allowed skew).
    #[error("token expired")]
    Expired,
    /// Before `nbf` (with the allowed skew).
    #[error("token not valid yet")]
    NotYet,
}

impl JwtError {
    /// Bounded label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            JwtError::Malformed(_) => "malformed",
            JwtError::TooLong => "too_long",
            JwtError::Algorithm(_) => "algorithm",
            JwtError::NoKey => "no_key",
            JwtError::Signature => "signature",
            JwtError::Issuer(_) => "issuer",
            JwtError::Audience(_) => "audience",
            JwtError::Expired => "expired",
            JwtError::NotYet => "not_yet_valid",
        }
    }
}

/// The signing algorithms accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (2048-8192 bit keys).
    Rs256,
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// Ed25519.
    EdDsa,
}

impl Alg {
    fn parse(s: &str) -> Result<Self, JwtError> {
        match s {
            "RS256" => Ok(Alg::Rs256),
            "ES256" => Ok(Alg::Es256),
            "EdDSA" => Ok(Alg::EdDsa),
            other => Err(JwtError::Algorithm(other.chars().take(16).collect())),
        }
    }
}

/// One public key of a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    /// Its `kid`, if any.
    pub kid: Option<String>,
    /// The only algorithm it verifies (from its type).
    pub alg: Alg,
    /// RSA: modulus and exponent; EC: the uncompressed point; OKP: the key.
    material: KeyMaterial,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyMaterial {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    Point(Vec<u8>),
}

/// Parses a JWKS document (`{"keys": [...]}`), keeping the keys of the
/// accepted kinds (RSA; EC P-256; OKP Ed25519) and skipping others (e.g.
/// encryption keys). Errors name what is wrong.
pub fn parse_jwks(text: &[u8]) -> Result<Vec<Jwk>, String> {
    if text.len() > MAX_JWKS {
        return Err(format!("key set larger than {MAX_JWKS} bytes"));
    }
    let v: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no \"keys\" list")?;
    if keys.len() > MAX_KEYS {
        return Err(format!("more than {MAX_KEYS} keys"));
    }
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let field = |name: &str| -> Result<Vec<u8>, String> {
            let s = k
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("keys[{i}].{name}: missing"))?;
            URL_SAFE_NO_PAD
                .decode(s.trim_end_matches('='))
                .map_err(|_| format!("keys[{i}].{name}: not base64url"))
        };
        if k.get("use")
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
        {
            continue;
        }
        let kid = k.get("kid").and_then(Value::as_str).map(str::to_string);
        let kty = k.get("kty").and_then(Value::as_str).unwrap_or("");
        let crv = k.get("crv").and_then(Value::as_str).unwrap_or("");
        let (alg, material) = match (kty, crv) {
            ("RSA", _) => (
                Alg::Rs256,
                KeyMaterial::Rsa {
                    n: field("n")?,
                    e: field("e")?,
                },
            ),
            ("EC", "P-256") => {
                let (x, y) = (field("x")?, field("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(format!("keys[{i}]: a P-256 point has 32-byte x and y"));
                }
                let mut p = vec![4u8];
                p.extend_from_slice(&x);
                p.extend_from_slice(&y);
                (Alg::Es256, KeyMaterial::Point(p))
            }
            ("OKP", "Ed25519") => {
                let x = field("x")?;
                if x.len() != 32 {
                    return Err(format!("keys[{i}].x: an Ed25519 key is 32 bytes"));
                }
                (Alg::EdDsa, KeyMaterial::Point(x))
            }
            _ => continue,
        };
        // A key that says which algorithm it is for must agree.
        if let Some(a) = k.get("alg").and_then(Value::as_str) {
            if Alg::parse(a).ok() != Some(alg) {
                continue;
            }
        }
        out.push(Jwk { kid, alg, material });
    }
    Ok(out)
}

/// A token split and decoded, not yet verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// The header's algorithm.
    pub alg: Alg,
    /// The header's key id.
    pub kid: Option<String>,
    /// The claims.
    pub claims: BTreeMap<String, Value>,
    signed: Vec<u8>,
    signature: Vec<u8>,
}

/// Splits and decodes a compact JWS. Refuses `alg: none` and every
/// algorithm but the accepted three before looking further.
pub fn parse(token: &str) -> Result<Token, JwtError> {
    if token.len() > MAX_TOKEN {
        return Err(JwtError::TooLong);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three dot-separated parts"));
    };
    let b64 = |x: &str, what: &'static str| {
        URL_SAFE_NO_PAD
            .decode(x)
            .map_err(|_| JwtError::Malformed(what))
    };
    let header: Value = serde_json::from_slice(&b64(h, "header is not base64url")?)
        .map_err(|_| JwtError::Malformed("header is not JSON"))?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwtError::Malformed("header has no alg"))?;
    let alg = Alg::parse(alg)?;
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .map(str::to_string);
    let claims: BTreeMap<String, Value> =
        serde_json::from_slice(&b64(p, "payload is not base64url")?)
            .map_err(|_| JwtError::Malformed("payload is not a JSON object"))?;
    let signature = b64(s, "signature is not base64url")?;
    Ok(Token {
        alg,
        kid,
        claims,
        signed: token.as_bytes()[..h.len() + 1 + p.len()].to_vec(),
        signature,
    })
}

impl Token {
    /// Verifies the signature with a key of `keys` made for the token's
    /// algorithm (the one its `kid` names, when it names one).
    pub fn verify(&self, keys: &[Jwk]) -> Result<(), JwtError> {
        let mut candidates = keys
            .iter()
            .filter(|k| k.alg == self.alg)
            .filter(|k| self.kid.is_none() || k.kid.is_none() || k.kid == self.kid)
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::NoKey);
        }
        for k in candidates {
            let ok = match (&k.material, self.alg) {
                (KeyMaterial::Rsa { n, e }, Alg::Rs256) => {
                    signature::RsaPublicKeyComponents { n, e }
                        .verify(
                            &signature::RSA_PKCS1_2048_8192_SHA256,
                            &self.signed,
                            &self.signature,
                        )
                        .is_ok()
                }
                (KeyMaterial::Point(p), Alg::Es256) => {
                    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, p)
                        .verify(&self.signed, &self.signature)
                        .is_ok()
                }
                (KeyMaterial::Point(p), Alg::EdDsa) => {
                    UnparsedPublicKey::new(&signature::ED25519, p)
                        .verify(&self.signed, &self.signature)
                        .is_ok()
                }
                _ => false,
            };
            if ok {
                return Ok(());
            }
        }
        Err(JwtError::Signature)
    }

    /// Checks `iss`, `aud`, `exp` and `nbf` at `now_s` (seconds since the
    /// epoch), allowing `skew_s` either way. `audiences` empty: any.
    pub fn check_claims(
        &self,
        issuer: &str,
        audiences: &[String],
        now_s: u64,
        skew_s: u64,
    ) -> Result<(), JwtError> {
        let iss = self.claims.get("iss").and_then(Value::as_str).unwrap_or("");
        if iss != issuer {
            return Err(JwtError::Issuer(iss.chars().take(128).collect()));
        }
        if !audiences.is_empty() {
            let aud: Vec<&str> = match self.claims.get("aud") {
                Some(Value::String(s)) => vec![s.as_str()],
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            if !aud.iter().any(|a| audiences.iter().any(|w| w == a)) {
                return Err(JwtError::Audience(audiences.to_vec()));
            }
        }
        let number = |k: &str| self.claims.get(k).and_then(Value::as_f64);
        if let Some(exp) = number("exp") {
            if (now_s as f64) > exp + skew_s as f64 {
                return Err(JwtError::Expired);
            }
        }
        if let Some(nbf) = number("nbf") {
            if (now_s as f64) + (skew_s as f64) < nbf {
                return Err(JwtError::NotYet);
            }
        }
        Ok(())
    }

    /// A claim's values as strings: a string, each string of an array, a
    /// number or boolean as written; nothing for objects or absent claims.
    /// `path` may name a nested claim with dots (`realm.role`).
    pub fn claim_values(&self, path: &str) -> Vec<String> {
        let mut parts = path.split('.');
        let Some(first) = parts.next() else {
            return Vec::new();
        };
        let mut v = self.claims.get(first);
        for p in parts {
            v = v.and_then(|x| x.get(p));
        }
        let scalar = |x: &Value| match x {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        match v {
            Some(Value::Array(a)) => a.iter().filter_map(scalar).collect(),
            Some(x) => scalar(x).into_iter().collect(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};

    use super::*;

    fn b64(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    fn token(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = sign(signed.as_bytes());
        format!("{signed}.{}", b64(&sig))
    }

    fn es256() -> (EcdsaKeyPair, Value) {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let p = kp.public_key().as_ref();
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "ec1",
            "x": b64(&p[1..33]), "y": b64(&p[33..65])});
        (kp, jwk)
    }

    fn ed25519() -> (Ed25519KeyPair, Value) {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let jwk = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed1",
            "x": b64(kp.public_key().as_ref())});
        (kp, jwk)
    }

    fn claims(exp: u64) -> Value {
        serde_json::json!({"iss": "https://issuer.test", "aud": ["web", "other"], "exp": exp,
            "sub": "alice", "roles": ["admin", "dev"], "realm": {"tier": "gold"}})
    }

    #[test]
    fn good_tokens_of_each_kind_verify_and_bad_ones_say_why() {
        let (ec, ec_jwk) = es256();
        let (ed, ed_jwk) = ed25519();
        let jwks = serde_json::json!({"keys": [ec_jwk, ed_jwk,
            {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}]});
        let keys = parse_jwks(jwks.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 2, "the encryption key is skipped");
        let rng = SystemRandom::new();
        let sign_ec = |m: &[u8]| ec.sign(&rng, m).unwrap().as_ref().to_vec();
        let sign_ed = |m: &[u8]| ed.sign(m).as_ref().to_vec();
        let aud = vec!["web".to_string()];
        let now = 1_000_000;

        let t = token(
            &serde_json::json!({"alg": "ES256", "kid": "ec1"}),
            &claims(now + 60),
            sign_ec,
        );
        let t = parse(&t).unwrap();
        assert_eq!(t.verify(&keys), Ok(()));
        assert_eq!(t.check_claims("https://issuer.test", &aud, now, 0), Ok(()));
        assert_eq!(t.claim_values("roles"), ["admin", "dev"]);
        assert_eq!(t.claim_values("realm.tier"), ["gold"]);
        assert_eq!(t.claim_values("sub"), ["alice"]);

        let t = parse(&token(
            &serde_json::json!({"alg": "EdDSA"}),
            &claims(now + 60),
            sign_ed,
        ))
        .unwrap();
        assert_eq!(t.verify(&keys), Ok(()));

        // Expired (beyond the skew), wrong audience, wrong issuer.
        let old = parse(&token(
            &serde_json::json!({"alg": "EdDSA"}),
            &claims(now - 100),
            sign_ed,
        ))
        .unwrap();
        assert_eq!(
            old.check_claims("https://issuer.test", &aud, now, 60),
            Err(JwtError::Expired)
        );
        assert_eq!(
            old.check_claims("https://issuer.test", &aud, now, 120),
            Ok(())
        );
        let t = parse(&token(
            &serde_json::json!({"alg": "EdDSA"}),
            &claims(now + 60),
            sign_ed,
        ))
        .unwrap();
        assert_eq!(
            t.check_claims("https://issuer.test", &["billing".to_string()], now, 0),
            Err(JwtError::Audience(vec!["billing".into()]))
        );
        assert!(matches!(
            t.check_claims("https://other", &aud, now, 0),
            Err(JwtError::Issuer(_))
        ));

        // Signed by a key not in the set.
        let (other, _) = es256();
        let t = parse(&token(
            &serde_json::json!({"alg": "ES256"}),
            &claims(now + 60),
            |m| other.sign(&rng, m).unwrap().as_ref().to_vec(),
        ))
        .unwrap();
        assert_eq!(t.verify(&keys), Err(JwtError::Signature));
        // A kid the set does not have.
        let t = parse(&token(
            &serde_json::json!({"alg": "ES256", "kid": "gone"}),
            &claims(now + 60),
            sign_ec,
        ))
        .unwrap();
        assert_eq!(t.verify(&keys), Err(JwtError::NoKey));

        // alg none, and an algorithm a key was not made for.
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none"}"#),
            b64(claims(now + 60).to_string().as_bytes())
        );
        assert_eq!(parse(&none), Err(JwtError::Algorithm("none".into())));
        let hs = token(
            &serde_json::json!({"alg": "HS256"}),
            &claims(now + 60),
            |_| vec![1; 32],
        );
        assert_eq!(parse(&hs), Err(JwtError::Algorithm("HS256".into())));
        // An Ed25519 signature presented as ES256 finds no key that verifies.
        let mixed = token(
            &serde_json::json!({"alg": "ES256", "kid": "ed1"}),
            &claims(now + 60),
            sign_ed,
        );
        assert_eq!(parse(&mixed).unwrap().verify(&keys), Err(JwtError::NoKey));
    }

    #[test]
    fn rs256_tokens_verify_with_the_rsa_key_of_the_set() {
        // A 2048-bit test key (tests/data; ring cannot generate RSA keys).
        let kp =
            signature::RsaKeyPair::from_der(include_bytes!("../../../tests/data/jwt-rsa-2048.der"))
                .unwrap();
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(kp.public());
        let jwk = serde_json::json!({"kty": "RSA", "kid": "rsa1", "alg": "RS256",
            "n": b64(&public.n), "e": b64(&public.e)});
        let keys = parse_jwks(serde_json::json!({"keys": [jwk]}).to_string().as_bytes()).unwrap();
        let rng = SystemRandom::new();
        let sign = |m: &[u8]| {
            let mut sig = vec![0; kp.public().modulus_len()];
            kp.sign(&signature::RSA_PKCS1_SHA256, &rng, m, &mut sig)
                .unwrap();
            sig
        };
        let t = parse(&token(
            &serde_json::json!({"alg": "RS256", "kid": "rsa1"}),
            &claims(10),
            sign,
        ))
        .unwrap();
        assert_eq!(t.verify(&keys), Ok(()));
        let forged = token(
            &serde_json::json!({"alg": "RS256"}),
            &serde_json::json!({"sub": "mallory"}),
            |_| vec![0; 256],
        );
        assert_eq!(
            parse(&forged).unwrap().verify(&keys),
            Err(JwtError::Signature)
        );
    }

    #[test]
    fn malformed_tokens_and_key_sets_are_refused() {
        assert!(matches!(parse("a.b"), Err(JwtError::Malformed(_))));
        assert!(matches!(parse("a.b.c.d"), Err(JwtError::Malformed(_))));
        assert!(matches!(parse("!!.b.c"), Err(JwtError::Malformed(_))));
        assert_eq!(parse(&"a".repeat(MAX_TOKEN + 1)), Err(JwtError::TooLong));
        assert!(parse_jwks(b"[]").is_err());
        assert!(
            parse_jwks(br#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "AQ", "y": "AQ"}]}"#)
                .is_err()
        );
        assert!(parse_jwks(&vec![b' '; MAX_JWKS + 1]).is_err());
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,300}") {
            let _ = parse(&s);
            let _ = parse_jwks(s.as_bytes());
        }

        #[test]
        fn dotted_base64_garbage_never_panics(
            a in proptest::collection::vec(any::<u8>(), 0..200),
            b in proptest::collection::vec(any::<u8>(), 0..200),
            c in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let t = format!("{}.{}.{}", b64(&a), b64(&b), b64(&c));
            if let Ok(tok) = parse(&t) {
                let _ = tok.verify(&[]);
                let _ = tok.check_claims("x", &[], 0, 0);
            }
        }
    }
}
