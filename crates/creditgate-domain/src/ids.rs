//! Identifiers: `ws_…`, `api_…`, `key_…`, `rk_…`, random base58 like Unkey's.

use std::sync::Arc;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

fn random_base58(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    bs58::encode(buf).into_string()
}

/// A new id of the form `<prefix>_<base58>`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", random_base58(12))
}

/// An id is an `Arc<str>`: the request path copies ids into engine calls, analytics
/// rows and responses many times a second, and a clone is a reference count.
macro_rules! id_type {
    ($name:ident, $prefix:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Arc<str>);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn generate() -> Self {
                Self(new_id($prefix).into())
            }

            /// The shared string (a reference count, no copy).
            pub fn shared(&self) -> Arc<str> {
                self.0.clone()
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.into())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s.into())
            }
        }
    };
}

id_type!(WorkspaceId, "ws");
id_type!(ApiId, "api");
id_type!(KeyId, "key");
id_type!(RootKeyId, "rk");
id_type!(IdentityId, "id");

/// A new secret: optional `prefix_` then `byte_length` random bytes in base58.
pub fn new_secret(prefix: Option<&str>, byte_length: usize) -> String {
    let body = random_base58(byte_length);
    match prefix {
        Some(p) if !p.is_empty() => format!("{p}_{body}"),
        _ => body,
    }
}

/// Keys are stored only as the hex SHA-256 of the secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The visible start of a key: the prefix (if any) and the first 4 characters after it.
pub fn secret_start(secret: &str, prefix: Option<&str>) -> String {
    let skip = match prefix {
        Some(p) if !p.is_empty() => p.len() + 1,
        _ => 0,
    };
    secret.chars().take(skip + 4).collect()
}

/// A unique id for a ledger transfer or fence (`<kind>_<base58>`).
pub fn new_id_for_transfer(kind: &str) -> String {
    format!("{kind}_{}", random_base58(16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_hash_and_start() {
        let s = new_secret(Some("sk"), 16);
        assert!(s.starts_with("sk_"));
        assert_eq!(secret_start(&s, Some("sk")).len(), 7);
        assert_eq!(hash_secret("abc").len(), 64);
        assert_ne!(new_secret(None, 16), new_secret(None, 16));
        assert!(KeyId::generate().as_str().starts_with("key_"));
    }
}
