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

/// The base58 alphabet (Bitcoin's, as the `bs58` crate and Unkey use).
const BASE58: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// Base58 digits an id carries: 17 digits are 99.6 random bits, as many as the 12 random
/// bytes ids had before.
const ID_DIGITS: usize = 17;

/// A new id of the form `<prefix>_<base58>`: 17 base58 digits, 10 of one random 64-bit
/// number and 7 of another (58^10 < 2^64: each digit is of random bits). A request id is
/// made on every request, so this divides two machine words rather than running a
/// general base conversion over a byte buffer (or dividing a 128-bit number, a library
/// call per digit).
pub fn new_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 1 + ID_DIGITS);
    id.push_str(prefix);
    id.push('_');
    for (mut n, digits) in [
        (rand::random::<u64>(), 10),
        (rand::random::<u64>(), ID_DIGITS - 10),
    ] {
        for _ in 0..digits {
            id.push(char::from(BASE58[usize::try_from(n % 58).unwrap_or(0)]));
            n /= 58;
        }
    }
    id
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(secret.as_bytes());
    let mut hash = String::with_capacity(2 * digest.len());
    for b in digest {
        hash.push(char::from(HEX[usize::from(b >> 4)]));
        hash.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    hash
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

    #[test]
    fn a_secret_hashes_to_its_sha256_in_lowercase_hex() {
        // FIPS 180-2's first example.
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn ids_are_the_prefix_and_17_base58_digits() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_id("req")).collect();
        assert_eq!(ids.len(), 1000, "no id repeats");
        for id in &ids {
            let digits = id.strip_prefix("req_").expect("the prefix");
            assert_eq!(digits.len(), ID_DIGITS, "{id}");
            assert!(digits.bytes().all(|c| BASE58.contains(&c)), "{id}");
        }
        // Every digit position takes many values (the number is not mostly zero).
        for pos in 0..ID_DIGITS {
            let seen: std::collections::HashSet<u8> =
                ids.iter().map(|id| id.as_bytes()[4 + pos]).collect();
            assert!(seen.len() > 40, "position {pos}: {} values", seen.len());
        }
    }
}
