//! One-time join tokens: `cwj1.<base64url(JSON)>`.
//!
//! A token carries the secret, the site name it reserves, where the
//! controllers are, and the controller CA certificate itself, so the joining
//! gateway pins the CA from the token rather than trusting the network. The
//! controller stores only the SHA-256 of the secret.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::model::SiteName;

const PREFIX: &str = "cwj1.";
/// Upper bound on an encoded token, checked before any decoding.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Why a join token string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Longer than any token this controller issues.
    #[error("join token is longer than {MAX_TOKEN_LEN} bytes; paste the whole token printed by `causeway ctl cluster add` and nothing else")]
    TooLong,
    /// Not a causeway join token (wrong prefix).
    #[error("join token must start with '{PREFIX}'; use the token printed by `causeway ctl cluster add`")]
    BadPrefix,
    /// The body does not decode.
    #[error("join token is malformed ({0}); it may have been cut when copied")]
    Malformed(String),
}

/// A one-time join token: which site it admits, where the controllers
/// are, and the controller CA to pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    /// Public token id (hex): how the controller finds the token record.
    pub id: String,
    /// Secret (hex, 32 bytes).
    pub secret: String,
    /// The site it admits.
    pub site: SiteName,
    /// `host:port` of controller API endpoints.
    pub controllers: Vec<String>,
    /// The controller CA certificate (PEM) to pin.
    pub ca_pem: String,
}

impl JoinToken {
    /// A fresh token (random id and secret) for `site`.
    pub fn generate(site: SiteName, controllers: Vec<String>, ca_pem: String) -> Self {
        let id: [u8; 8] = rand::random();
        let secret: [u8; 32] = rand::random();
        Self {
            id: hex::encode(id),
            secret: hex::encode(secret),
            site,
            controllers,
            ca_pem,
        }
    }

    /// The token as the text an operator passes on.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("token serializes");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// A token from its text; bounded in size before anything is decoded.
    pub fn decode(s: &str) -> Result<Self, TokenError> {
        let s = s.trim();
        if s.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let body = s.strip_prefix(PREFIX).ok_or(TokenError::BadPrefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Malformed(format!("base64: {e}")))?;
        let token: JoinToken =
            serde_json::from_slice(&json).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let hex_ok = |v: &str, n: usize| v.len() == n && v.bytes().all(|c| c.is_ascii_hexdigit());
        if !hex_ok(&token.id, 16) || !hex_ok(&token.secret, 64) {
            return Err(TokenError::Malformed("bad id or secret".into()));
        }
        if token.controllers.is_empty() {
            return Err(TokenError::Malformed("no controller endpoints".into()));
        }
        Ok(token)
    }

    /// What the controller stores and compares.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

/// Whether `a` and `b` are equal, in time that depends on their lengths
/// only (for secrets and their hashes).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// SHA-256 of a token secret, hex: all the controller stores.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> JoinToken {
        JoinToken::generate(
            "east".parse().unwrap(),
            vec!["127.0.0.1:7001".into()],
            "-----BEGIN CERTIFICATE-----\n...".into(),
        )
    }

    #[test]
    fn round_trips() {
        let t = sample();
        assert_eq!(JoinToken::decode(&t.encode()).unwrap(), t);
        assert_eq!(t.secret_hash().len(), 64);
        assert_ne!(t.secret_hash(), t.secret);
    }

    #[test]
    fn clear_errors_for_bad_tokens() {
        assert_eq!(JoinToken::decode("hello"), Err(TokenError::BadPrefix));
        let cut = sample().encode();
        let cut = &cut[..cut.len() / 2];
        assert!(matches!(
            JoinToken::decode(cut),
            Err(TokenError::Malformed(_))
        ));
        let long = format!("cwj1.{}", "A".repeat(MAX_TOKEN_LEN));
        assert_eq!(JoinToken::decode(&long), Err(TokenError::TooLong));
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in ".{0,600}") {
            let _ = JoinToken::decode(&s);
            let _ = JoinToken::decode(&format!("cwj1.{s}"));
        }

        #[test]
        fn decode_never_panics_on_base64_of_junk(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = JoinToken::decode(&format!("cwj1.{}", URL_SAFE_NO_PAD.encode(bytes)));
        }
    }
}
