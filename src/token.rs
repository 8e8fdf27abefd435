//! Sealed token format: `osb_sealed_` followed by 32 lowercase hex characters.
//!
//! Tokens are 128 random bits from the OS CSPRNG, minted fresh per (sandbox, secret); they are
//! never derived from the secret value. Recognition is purely syntactic: whether a well-formed
//! token *means* anything is decided by the sandbox registry.

use std::fmt;

/// The literal prefix of every sealed token.
pub const PREFIX: &[u8] = b"osb_sealed_";
/// Number of hex characters after the prefix.
pub const HEX_LEN: usize = 32;
/// Total token length in bytes (11 + 32 = 43).
pub const TOKEN_LEN: usize = PREFIX.len() + HEX_LEN;

/// A well-formed sealed token (exactly [`TOKEN_LEN`] ASCII bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token([u8; TOKEN_LEN]);

impl Token {
    /// Mints a fresh random token.
    ///
    /// # Panics
    /// Panics if the OS random number generator fails (nothing safe can continue then).
    pub fn generate() -> Self {
        let mut raw = [0u8; HEX_LEN / 2];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .expect("OS CSPRNG failed");
        let mut out = [0u8; TOKEN_LEN];
        out[..PREFIX.len()].copy_from_slice(PREFIX);
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in raw.iter().enumerate() {
            out[PREFIX.len() + 2 * i] = HEX[(b >> 4) as usize];
            out[PREFIX.len() + 2 * i + 1] = HEX[(b & 0xf) as usize];
        }
        Token(out)
    }

    /// Parses `bytes` as a token if it is exactly one well-formed token.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != TOKEN_LEN || !bytes.starts_with(PREFIX) {
            return None;
        }
        if !bytes[PREFIX.len()..].iter().all(is_lower_hex) {
            return None;
        }
        let mut out = [0u8; TOKEN_LEN];
        out.copy_from_slice(bytes);
        Some(Token(out))
    }

    /// The token's bytes.
    pub fn as_bytes(&self) -> &[u8; TOKEN_LEN] {
        &self.0
    }

    /// The token as a string slice (always ASCII).
    pub fn as_str(&self) -> &str {
        // Invariant: constructed only from ASCII prefix + hex digits.
        std::str::from_utf8(&self.0).expect("token is ASCII")
    }
}

/// True for `0-9a-f` (uppercase is not part of the format).
pub fn is_lower_hex(b: &u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(b)
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens are placeholders, not secrets: they may be printed.
        write!(f, "Token({})", self.as_str())
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_well_formed_and_distinct() {
        let a = Token::generate();
        let b = Token::generate();
        assert_ne!(a, b);
        assert_eq!(Token::parse(a.as_bytes()), Some(a));
        assert_eq!(a.as_str().len(), TOKEN_LEN);
    }

    #[test]
    fn parse_rejects_near_misses() {
        assert!(Token::parse(b"osb_sealed_0123456789abcdef0123456789abcdeF").is_none());
        assert!(Token::parse(b"osb_sealed_0123456789abcdef0123456789abcde").is_none());
        assert!(Token::parse(b"osb_sealeD_0123456789abcdef0123456789abcdef").is_none());
        assert!(Token::parse(b"osb_sealed_0123456789abcdef0123456789abcdef").is_some());
    }
}
