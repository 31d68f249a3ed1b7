//! Bearer tokens, for the admin API and the ops port's config endpoints.
//! Tokens come from a YAML file (`tokens: [{name, token, role}]`), roles
//! are `admin` (read-write) and `viewer` (read-only). The `Bearer` scheme
//! is matched case-insensitively (RFC 7235 §2.1). Tokens are compared in
//! constant time (over their SHA-256 digests) and never logged; only the
//! token's name is.

use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Viewer,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    token: String,
    #[serde(default = "default_role")]
    role: Role,
}

fn default_role() -> Role {
    Role::Admin
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

/// The configured tokens. Empty means auth is off (allowed on loopback only).
#[derive(Default, Clone)]
pub struct Tokens {
    entries: Vec<(String, [u8; 32], Role)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.entries.len())
    }
}

/// The caller, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Tokens {
    pub fn load(path: &Path) -> anyhow::Result<Tokens> {
        let file: TokenFile = crate::node::load_yaml(path)?;
        let mut t = Tokens::default();
        for (i, e) in file.tokens.into_iter().enumerate() {
            if e.token.len() < 16 {
                anyhow::bail!(
                    "{}: tokens[{i}].token: must be at least 16 characters",
                    path.display()
                );
            }
            t.add(e.name, &e.token, e.role);
        }
        Ok(t)
    }

    pub fn add(&mut self, name: String, token: &str, role: Role) {
        self.entries.push((name, digest(token), role));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks an `Authorization` header value.
    pub fn check(&self, authorization: Option<&str>) -> Option<Caller> {
        if self.entries.is_empty() {
            return Some(Caller {
                name: "anonymous".into(),
                role: Role::Admin,
            });
        }
        let presented = bearer(authorization?)?;
        let digest = digest(presented);
        let mut found = None;
        // Walk every entry whatever matches, comparing without early exit.
        for (name, want, role) in &self.entries {
            if same_digest(want, &digest) && found.is_none() {
                found = Some(Caller {
                    name: name.clone(),
                    role: *role,
                });
            }
        }
        found
    }
}

/// The SHA-256 of a secret: what is kept and compared instead of it.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Lower-case hex of `bytes` (how a digest is written in an object).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A digest written as 64 hex digits, back into bytes.
pub fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Compares two digests in constant time (no early exit on a mismatch).
pub fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The credentials of `Bearer <token>`, the scheme in any case, then one
/// or more spaces.
pub fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once(' ')?;
    let token = token.trim_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_tokens_and_roles() {
        let mut t = Tokens::default();
        assert_eq!(t.check(None).unwrap().role, Role::Admin);
        t.add("ops".into(), "s3cret-s3cret-s3cret", Role::Admin);
        t.add("ro".into(), "read-only-read-only", Role::Viewer);
        assert!(t.check(None).is_none());
        assert!(t.check(Some("Bearer nope")).is_none());
        assert!(t.check(Some("s3cret-s3cret-s3cret")).is_none());
        assert_eq!(
            t.check(Some("Bearer s3cret-s3cret-s3cret")).unwrap().name,
            "ops"
        );
        assert_eq!(
            t.check(Some("Bearer read-only-read-only")).unwrap().role,
            Role::Viewer
        );
        // The scheme in any case, with any number of spaces (RFC 7235).
        for ok in [
            "bearer s3cret-s3cret-s3cret",
            "BEARER s3cret-s3cret-s3cret",
            "BeArEr   s3cret-s3cret-s3cret",
        ] {
            assert_eq!(t.check(Some(ok)).unwrap().name, "ops", "{ok}");
        }
        for bad in [
            "Bearer",
            "Bearer ",
            "Bearers s3cret-s3cret-s3cret",
            "Basic s3cret-s3cret-s3cret",
            "Bearer s3cret-s3cret-s3cre",
        ] {
            assert!(t.check(Some(bad)).is_none(), "{bad}");
        }
    }
}
