//! Randomness: the one place identifiers, proxy tokens and nonces are drawn from the OS CSPRNG.

/// `n` random bytes from the OS CSPRNG as lowercase hex (`2n` characters).
///
/// # Panics
/// If the OS CSPRNG fails (nothing safe can be issued without it).
pub fn random_hex(n: usize) -> String {
    let mut raw = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .expect("OS CSPRNG failed");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}
