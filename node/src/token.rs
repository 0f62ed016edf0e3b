//! Client tokens: JWT signed with HS256 under the cluster secret.
//!
//! Claims: `sub` (user id, 1-128 bytes), `exp` (seconds since the Unix epoch), `iat`
//! (optional), `roles` (optional list of strings, e.g. `["operator"]`). Nothing else is
//! trusted. Verification checks the algorithm (HS256 only), the signature and `exp` with
//! no leeway beyond [`EXPIRY_LEEWAY_SECS`].

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Clock skew tolerated on `exp`, in seconds.
pub const EXPIRY_LEEWAY_SECS: u64 = 5;
/// Longest accepted user id, in bytes.
pub const USER_ID_BYTES_MAX: usize = 128;
/// Longest accepted token, in bytes (checked before any decoding).
pub const TOKEN_BYTES_MAX: usize = 4096;

/// The claims Chorus reads from a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Optional roles (e.g. `operator`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// Malformed, wrong algorithm, or a signature that does not verify.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Signing failed (bad secret).
    #[error("cannot sign token: {0}")]
    Sign(String),
}

/// Signs and verifies tokens with one secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str("TokenKeys(<redacted>)")
    }
}

impl TokenKeys {
    /// Keys from a shared secret.
    pub fn new(secret: &[u8]) -> Self {
        TokenKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// Mints a token for `user_id` valid for `ttl_secs` from `now_secs`.
    pub fn mint(
        &self,
        user_id: &str,
        roles: &[String],
        now_secs: u64,
        ttl_secs: u64,
    ) -> Result<String, TokenError> {
        if user_id.is_empty() || user_id.len() > USER_ID_BYTES_MAX {
            return Err(TokenError::Sign(format!(
                "user id must be 1-{USER_ID_BYTES_MAX} bytes"
            )));
        }
        let claims = Claims {
            sub: user_id.to_string(),
            exp: now_secs.saturating_add(ttl_secs),
            iat: Some(now_secs),
            roles: roles.to_vec(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| TokenError::Sign(e.to_string()))
    }

    /// Verifies a token at `now_secs` and returns its claims.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, TokenError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(TokenError::Invalid("token too long".into()));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        // We check expiry ourselves against the injected clock.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| TokenError::Invalid(explain(&e)))?;
        let claims = data.claims;
        if claims.sub.is_empty() || claims.sub.len() > USER_ID_BYTES_MAX {
            return Err(TokenError::Invalid(format!(
                "sub must be 1-{USER_ID_BYTES_MAX} bytes"
            )));
        }
        if claims.exp.saturating_add(EXPIRY_LEEWAY_SECS) < now_secs {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// A token refusal in words, with the likely cause.
fn explain(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::InvalidSignature => "the signature does not verify: the token was signed \
            with another secret than this node's (CHORUS_SECRET)"
            .to_string(),
        ErrorKind::InvalidAlgorithm => "the token is not signed with HS256".to_string(),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => {
            "this is not a JWT (three base64url parts separated by dots)".to_string()
        }
        _ => error.to_string(),
    }
}

/// Seconds since the Unix epoch, from the system clock.
pub fn unix_now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_and_carry_claims() {
        let keys = TokenKeys::new(b"secret");
        let t = keys
            .mint("alice", &["operator".into()], 1000, 60)
            .expect("mint");
        let c = keys.verify(&t, 1010).expect("verify");
        assert_eq!(c.sub, "alice");
        assert_eq!(c.roles, vec!["operator".to_string()]);
    }

    #[test]
    fn expired_forged_and_garbage_tokens_are_refused() {
        let keys = TokenKeys::new(b"secret");
        let t = keys.mint("alice", &[], 1000, 60).expect("mint");
        assert_eq!(keys.verify(&t, 2000), Err(TokenError::Expired));
        let other = TokenKeys::new(b"other secret");
        assert!(matches!(
            other.verify(&t, 1010),
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            keys.verify("not.a.jwt", 1010),
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(keys.verify("", 1010), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn a_token_signed_with_another_secret_says_so() {
        let theirs = TokenKeys::new(b"another secret, not this node's");
        let ours = TokenKeys::new(b"this node's own secret, 32 bytes");
        let token = theirs.mint("alice", &[], 1_000, 60).expect("mint");
        let error = ours.verify(&token, 1_010).expect_err("refused");
        assert!(error.to_string().contains("another secret"), "{error}");
        let error = ours.verify("not a token", 1_010).expect_err("refused");
        assert!(error.to_string().contains("not a JWT"), "{error}");
    }

    #[test]
    fn alg_none_is_refused() {
        // header {"alg":"none","typ":"JWT"}, payload {"sub":"mallory","exp":99999999999}
        let t =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo5OTk5OTk5OTk5OX0.";
        let keys = TokenKeys::new(b"secret");
        assert!(matches!(keys.verify(t, 1), Err(TokenError::Invalid(_))));
    }
}
