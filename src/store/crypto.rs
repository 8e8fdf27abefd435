//! The master key and the envelope AEAD (AES-256-GCM) that seals every value the store persists.
//!
//! Sealed format, version 1 (the only one):
//!
//! ```text
//! 0x01 || nonce (12 random bytes) || ciphertext (same length as the plaintext) || tag (16 bytes)
//! ```
//!
//! Invariants:
//! - Each ciphertext is bound to its row by associated data built by exactly one function per
//!   kind ([`secret_aad`], [`sandbox_ca_aad_v2`], [`snapshot_aad`], [`key_check_aad`]), so a
//!   ciphertext copied into another row fails to open. A sandbox CA key's binds every column
//!   that decides what the sandbox is ([`SandboxColumns`]).
//! - Nonces are 96 random bits from the OS CSPRNG. With random nonces AES-GCM stays within its
//!   bounds for 2^32 seals per key; a store re-seals a few rows per API call, far below that.
//! - Key material and plaintexts live in zeroizing buffers; no error message contains either.
//! - Policy is authenticated too. The columns that decide where a value may go — a secret's
//!   `allowed_hosts` and `locations`, a store's `egress_allowlist` — are not secret, so they
//!   are stored in clear, but each row carries an HMAC-SHA256 over them ([`SecretPolicy`],
//!   [`StorePolicy`]) under a subkey derived from the master key (HKDF-SHA256, info
//!   `sealgate/policy-mac/v1`). Someone who can write the database but lacks the master key
//!   cannot point a secret at another host: the row fails verification and is refused,
//!   exactly like an altered ciphertext. These are plain functions of the row's values, so
//!   every backend computes the same MACs.

use std::fmt;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use zeroize::Zeroizing;

use crate::secret::{Location, SecretValue};

/// Length of a master key in bytes (AES-256).
pub const KEY_LEN: usize = 32;

/// File name of the master key inside `data_dir`.
pub const KEY_FILE_NAME: &str = "master.key";

/// The environment variable that carries a master key (read by the caller).
pub const KEY_ENV_VAR: &str = "SEALGATE_MASTER_KEY";

/// The first byte of every sealed value.
const FORMAT_V1: u8 = 1;

/// AES-GCM tag length.
const TAG_LEN: usize = 16;

/// Bytes a sealed value adds to its plaintext: format byte, nonce and tag (29).
pub const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

/// Largest key file we read; a base64 key is 44 bytes plus a newline.
const MAX_KEY_FILE_LEN: u64 = 1024;

/// Errors of the master key and of sealing. Messages never contain key bytes or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The text is not a master key; the reason never quotes the input.
    #[error("invalid master key: {0}")]
    InvalidKey(&'static str),
    /// The key given by `origin` (the env var or a key file) is not a master key.
    #[error("the master key from {origin} is invalid: {reason}")]
    InvalidKeyAt {
        /// `SEALGATE_MASTER_KEY` or the key file path.
        origin: String,
        /// Why, without quoting the key.
        reason: &'static str,
    },
    /// The key file can be read or written by group or others.
    #[error(
        "the master key file {} has mode {mode:03o}; it must not be accessible by group or others \
         (run `chmod 600 {}`); refusing to use it",
        path.display(),
        path.display()
    )]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading or creating the key file (or its directory) failed.
    #[error("master key file {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A database already exists but its key file does not: the key that sealed it is
    /// elsewhere. Nothing was created.
    #[error(
        "the master key file {} is missing, but the database {} already exists and was sealed \
         with a key that is not here; restore the key file (or set {KEY_ENV_VAR}). Refusing to \
         start; no new key was written",
        path.display(),
        database.display()
    )]
    MissingKeyFile {
        /// The expected key file.
        path: PathBuf,
        /// The existing database (file, or a description of it for other backends).
        database: PathBuf,
    },
    /// The sealed bytes are too short or carry an unknown format version.
    #[error("sealed data is malformed (too short or unknown format version)")]
    Malformed,
    /// Authentication failed: wrong key, or the ciphertext was moved to another row or altered.
    #[error("sealed data failed to authenticate (wrong key, moved or altered)")]
    Decrypt,
    /// A row's policy columns do not match their MAC: altered outside sealgate (or missing).
    #[error(
        "policy failed to authenticate (allowed_hosts, locations or egress_allowlist altered \
         outside sealgate, or its MAC is missing)"
    )]
    PolicyTampered,
}

/// The 32-byte master key. Zeroized on drop; `Debug` prints `[redacted]`; not `Clone`, so
/// every copy is deliberate ([`MasterKey::duplicate`]).
pub struct MasterKey(Zeroizing<[u8; KEY_LEN]>);

/// Where the master key came from, for the startup log line (never the key itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `SEALGATE_MASTER_KEY`.
    Env,
    /// A new key file was written at this path.
    Created(PathBuf),
    /// An existing key file was read from this path.
    Loaded(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Env => write!(f, "from {KEY_ENV_VAR}"),
            KeySource::Created(p) => write!(f, "created new key file {}", p.display()),
            KeySource::Loaded(p) => write!(f, "loaded from key file {}", p.display()),
        }
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl MasterKey {
    /// Parses standard base64 (with padding) of exactly 32 bytes; surrounding whitespace is
    /// ignored so a key file may end with a newline.
    ///
    /// # Errors
    /// [`CryptoError::InvalidKey`] for anything else; the message never quotes the input.
    pub fn from_base64(s: &str) -> Result<Self, CryptoError> {
        let decoded = Zeroizing::new(
            STANDARD
                .decode(s.trim())
                .map_err(|_| CryptoError::InvalidKey("not standard base64"))?,
        );
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if decoded.len() != KEY_LEN {
            return Err(CryptoError::InvalidKey(
                "expected base64 of exactly 32 bytes",
            ));
        }
        key.copy_from_slice(&decoded);
        Ok(MasterKey(key))
    }

    /// A fresh random key from the OS CSPRNG.
    ///
    /// # Panics
    /// If the operating system's random number generator fails (nothing safe can continue).
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(&mut key[..]);
        MasterKey(key)
    }

    /// Standard base64 of the key, in a buffer wiped on drop. Only for writing a key file or
    /// showing a newly generated key to the operator once.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(&self.0[..]))
    }

    /// A second, independent copy of this key (used when a rotation installs a new key).
    pub(crate) fn duplicate(&self) -> Self {
        MasterKey(Zeroizing::new(*self.0))
    }

    /// The key for this process: `env_value` (the value of `SEALGATE_MASTER_KEY`, read by the
    /// caller) wins; else `data_dir/master.key` (base64 text) is read; else a new key is written
    /// there with mode 0600 (`create_new`, then fsync of file and directory).
    ///
    /// # Errors
    /// An invalid env value or key file ([`CryptoError::InvalidKeyAt`]); an existing key file
    /// readable or writable by group or others ([`CryptoError::InsecureKeyFile`]); any I/O
    /// failure ([`CryptoError::Io`]).
    pub fn load_or_create(
        data_dir: &Path,
        env_value: Option<&str>,
    ) -> Result<(Self, KeySource), CryptoError> {
        match env_value {
            Some(value) => Ok((from_origin(value, KEY_ENV_VAR)?, KeySource::Env)),
            None => Self::load_or_create_file(&data_dir.join(KEY_FILE_NAME)),
        }
    }

    /// Like [`MasterKey::load_or_create`], for a data directory whose database already exists
    /// (`database` names it): a missing key file is an error and **nothing is created** — a
    /// fresh key could never open that database, and writing one would leave a key file that
    /// looks right beside a database it does not fit.
    ///
    /// # Errors
    /// [`CryptoError::MissingKeyFile`], or as [`MasterKey::load_or_create`].
    pub fn load_existing(
        data_dir: &Path,
        env_value: Option<&str>,
        database: &Path,
    ) -> Result<(Self, KeySource), CryptoError> {
        if let Some(value) = env_value {
            return Ok((from_origin(value, KEY_ENV_VAR)?, KeySource::Env));
        }
        let path = data_dir.join(KEY_FILE_NAME);
        match read_key_file(&path)? {
            Some(key) => Ok((key, KeySource::Loaded(path))),
            None => Err(CryptoError::MissingKeyFile {
                path,
                database: database.to_owned(),
            }),
        }
    }

    /// The key in the key file at `path` (base64 text, mode 0600 or stricter), or a new random
    /// key written there (mode 0600, `create_new`, fsync of file and directory; a missing parent
    /// directory is created 0700). Also the way to make a rotation's new key durable before
    /// calling [`crate::store::Store::rotate_master_key`].
    ///
    /// # Errors
    /// As [`MasterKey::load_or_create`], for the file.
    pub fn load_or_create_file(path: &Path) -> Result<(Self, KeySource), CryptoError> {
        if let Some(key) = read_key_file(path)? {
            return Ok((key, KeySource::Loaded(path.to_owned())));
        }
        create_key_file(path)
    }

    /// The policy-MAC subkey: HKDF-SHA256 of the master key, info `sealgate/policy-mac/v1`.
    fn policy_key(&self) -> hmac::Key {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(&self.0[..]);
        let okm = prk
            .expand(&[POLICY_MAC_INFO], hmac::HMAC_SHA256)
            // Fails only when the requested length exceeds 255 hash lengths; 32 bytes never does.
            .expect("HKDF output of one hash length");
        hmac::Key::from(okm)
    }

    fn aead_key(&self) -> LessSafeKey {
        // A 32-byte slice is always a valid AES-256 key; `UnboundKey::new` fails only on length.
        let unbound = UnboundKey::new(&AES_256_GCM, &self.0[..]).expect("32-byte AES-256 key");
        LessSafeKey::new(unbound)
    }
}

/// Parses a key, naming where it came from in the error.
fn from_origin(value: &str, origin: &str) -> Result<MasterKey, CryptoError> {
    if value.trim().is_empty() {
        return Err(CryptoError::InvalidKeyAt {
            origin: origin.to_owned(),
            reason: "it is empty",
        });
    }
    MasterKey::from_base64(value).map_err(|e| CryptoError::InvalidKeyAt {
        origin: origin.to_owned(),
        reason: match e {
            CryptoError::InvalidKey(reason) => reason,
            _ => "unreadable",
        },
    })
}

/// Reads an existing key file; `Ok(None)` if there is none.
fn read_key_file(path: &Path) -> Result<Option<MasterKey>, CryptoError> {
    let io_err = |source| CryptoError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match crate::fsutil::open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let mode = file.metadata().map_err(io_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CryptoError::InsecureKeyFile {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_KEY_FILE_LEN)
        .read_to_string(&mut text)
        .map_err(io_err)?;
    from_origin(&text, &path.display().to_string()).map(Some)
}

/// Writes a new random key to `path` (mode 0600, exclusive create, whole or not at all:
/// [`crate::fsutil::create_private_file_synced`]). If another process created the file
/// first, that file is loaded instead.
fn create_key_file(path: &Path) -> Result<(MasterKey, KeySource), CryptoError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    ensure_private_dir(dir)?;
    let io_err = |source| CryptoError::Io {
        path: path.to_owned(),
        source,
    };
    let key = MasterKey::generate();
    let mut text = key.to_base64();
    text.push('\n');
    match crate::fsutil::create_private_file_synced(path, text.as_bytes()) {
        Ok(()) => Ok((key, KeySource::Created(path.to_owned()))),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let key = read_key_file(path)?.ok_or_else(|| io_err(e))?;
            Ok((key, KeySource::Loaded(path.to_owned())))
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist yet; an existing directory
/// keeps its mode.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), CryptoError> {
    crate::fsutil::create_private_dir(dir).map_err(|source| CryptoError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// Fills `buf` from the OS CSPRNG.
///
/// # Panics
/// If the operating system's random number generator fails.
fn fill_random(buf: &mut [u8]) {
    SystemRandom::new()
        .fill(buf)
        .expect("the OS random number generator failed");
}

/// Seals `plaintext` under `key`, bound to `aad`: `0x01 || nonce || ciphertext || tag`.
///
/// The plaintext is copied straight into the output buffer, which is allocated at its final size
/// first, so no reallocation leaves a plaintext copy behind in freed memory.
///
/// # Memory usage
/// One allocation of `plaintext.len() + SEAL_OVERHEAD` bytes.
///
/// # Panics
/// If the OS random number generator fails.
pub fn seal(key: &MasterKey, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce);
    let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
    out.push(FORMAT_V1);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let body = &mut out[1 + NONCE_LEN..];
    let tag = key
        .aead_key()
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
        // Fails only for plaintexts beyond AES-GCM's ~64 GiB limit, which no store row reaches.
        .expect("plaintext within AES-GCM limits");
    out.extend_from_slice(tag.as_ref());
    out
}

/// Opens a value made by [`seal`] with the same `key` and `aad`.
///
/// # Errors
/// [`CryptoError::Malformed`] for a truncated value or unknown format byte;
/// [`CryptoError::Decrypt`] when authentication fails (wrong key, wrong row, altered bytes).
///
/// # Memory usage
/// One zeroizing buffer of `sealed.len() - 13` bytes, which becomes the returned value.
pub fn open(key: &MasterKey, aad: &[u8], sealed: &[u8]) -> Result<SecretValue, CryptoError> {
    if sealed.len() < SEAL_OVERHEAD || sealed[0] != FORMAT_V1 {
        return Err(CryptoError::Malformed);
    }
    let (nonce, body) = sealed[1..].split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Malformed)?;
    let mut buf = Zeroizing::new(body.to_vec());
    let plain_len = key
        .aead_key()
        .open_in_place(nonce, Aad::from(aad), &mut buf[..])
        .map_err(|_| CryptoError::Decrypt)?
        .len();
    buf.truncate(plain_len);
    Ok(SecretValue::new(std::mem::take(&mut *buf)))
}

/// Associated data of a secret value: `sealgate/secret/v1\0{store_id}\0{name}\0{version}`.
pub fn secret_aad(store_id: &str, name: &str, version: u64) -> Vec<u8> {
    format!("sealgate/secret/v1\0{store_id}\0{name}\0{version}").into_bytes()
}

/// HKDF info of the policy-MAC subkey.
const POLICY_MAC_INFO: &[u8] = b"sealgate/policy-mac/v1";

/// A secret's policy as authenticated: the row it belongs to and where it may be unsealed.
#[derive(Clone, Copy, Debug)]
pub struct SecretPolicy<'a> {
    /// The store's id.
    pub store_id: &'a str,
    /// The secret's name.
    pub name: &'a str,
    /// The secret's version (bound into its value's associated data too).
    pub version: u64,
    /// `allowed_hosts` as stored.
    pub allowed_hosts: Option<&'a [String]>,
    /// `locations` as stored.
    pub locations: &'a [Location],
}

impl SecretPolicy<'_> {
    /// `sealgate/secret-policy/v1\0{store_id}\0{name}\0{version}\0{hosts JSON}\0{locations JSON}`.
    /// Ids, env-var names and JSON text contain no NUL, so the encoding is unambiguous.
    fn message(&self) -> Vec<u8> {
        let hosts = serde_json::to_string(&self.allowed_hosts).expect("strings serialise");
        let locations = serde_json::to_string(self.locations).expect("locations serialise");
        let (id, name, v) = (self.store_id, self.name, self.version);
        format!("sealgate/secret-policy/v1\0{id}\0{name}\0{v}\0{hosts}\0{locations}").into_bytes()
    }

    /// The MAC to store beside the row (HMAC-SHA256 under the policy subkey of `key`).
    pub fn mac(&self, key: &MasterKey) -> Vec<u8> {
        sign_mac(key, &self.message())
    }

    /// Checks the stored `mac` (constant time).
    ///
    /// # Errors
    /// [`CryptoError::PolicyTampered`] when it is missing or does not match.
    pub fn verify(&self, key: &MasterKey, mac: Option<&[u8]>) -> Result<(), CryptoError> {
        verify_mac(key, &self.message(), mac)
    }
}

/// A store's policy as authenticated: its id and `egress_allowlist`.
#[derive(Clone, Copy, Debug)]
pub struct StorePolicy<'a> {
    /// The store's id.
    pub store_id: &'a str,
    /// `egress_allowlist` as stored (`None` = unrestricted).
    pub egress_allowlist: Option<&'a [String]>,
}

impl StorePolicy<'_> {
    /// `sealgate/store-policy/v1\0{store_id}\0{egress_allowlist JSON}`.
    fn message(&self) -> Vec<u8> {
        let list = serde_json::to_string(&self.egress_allowlist).expect("strings serialise");
        format!("sealgate/store-policy/v1\0{}\0{list}", self.store_id).into_bytes()
    }

    /// The MAC to store beside the row.
    pub fn mac(&self, key: &MasterKey) -> Vec<u8> {
        sign_mac(key, &self.message())
    }

    /// Checks the stored `mac` (constant time).
    ///
    /// # Errors
    /// [`CryptoError::PolicyTampered`] when it is missing or does not match.
    pub fn verify(&self, key: &MasterKey, mac: Option<&[u8]>) -> Result<(), CryptoError> {
        verify_mac(key, &self.message(), mac)
    }
}

fn sign_mac(key: &MasterKey, msg: &[u8]) -> Vec<u8> {
    hmac::sign(&key.policy_key(), msg).as_ref().to_vec()
}

fn verify_mac(key: &MasterKey, msg: &[u8], mac: Option<&[u8]>) -> Result<(), CryptoError> {
    let mac = mac.ok_or(CryptoError::PolicyTampered)?;
    hmac::verify(&key.policy_key(), msg, mac).map_err(|_| CryptoError::PolicyTampered)
}

/// Associated data of a sandbox's CA private key, v1: `sealgate/sandbox-ca/v1\0{id}`. Rows
/// written before [`sandbox_ca_aad_v2`] carry it; only the one-time migration opens with it.
pub fn sandbox_ca_aad(sandbox_id: &str) -> Vec<u8> {
    format!("sealgate/sandbox-ca/v1\0{sandbox_id}").into_bytes()
}

/// The columns of a `sandboxes` row that decide what the sandbox is: whose secrets it gets,
/// which node serves it, how long it lives, who may use it. They are stored in clear (the
/// database queries them) and bound into the associated data of the row's CA key
/// ([`sandbox_ca_aad_v2`]), which is opened whenever the row is loaded: a row with any of them
/// changed in the database fails to open and is refused, like a ciphertext copied into
/// another row. (Before this, someone who could write the database but lacked the master key
/// could re-point a sandbox at another store and have its tokens unseal that store's values.)
#[derive(Clone, Copy, Debug)]
pub struct SandboxColumns<'a> {
    /// `id`.
    pub id: &'a str,
    /// `store_id`.
    pub store_id: &'a str,
    /// `store_name`.
    pub store_name: &'a str,
    /// `node_id` in fleet mode; empty with SQLite.
    pub node: &'a str,
    /// `created_at`, nanoseconds since the epoch as stored.
    pub created_at: i64,
    /// `expires_at`, nanoseconds since the epoch as stored.
    pub expires_at: i64,
    /// `source_ip` as stored.
    pub source_ip: Option<&'a str>,
    /// `proxy_token_hash`.
    pub proxy_token_hash: &'a [u8],
    /// `ca_cert_pem`.
    pub ca_cert_pem: &'a str,
}

/// Associated data of a sandbox CA key, v2: `sealgate/sandbox-ca/v2` followed by every field of
/// [`SandboxColumns`], each as its length (8 bytes, big-endian) and its bytes (`-` and an
/// empty field are told apart by a flag byte before `source_ip`).
pub fn sandbox_ca_aad_v2(c: &SandboxColumns<'_>) -> Vec<u8> {
    let mut out = b"sealgate/sandbox-ca/v2".to_vec();
    let created = c.created_at.to_be_bytes();
    let expires = c.expires_at.to_be_bytes();
    let ip_flag = [u8::from(c.source_ip.is_some())];
    let fields: [&[u8]; 10] = [
        c.id.as_bytes(),
        c.store_id.as_bytes(),
        c.store_name.as_bytes(),
        c.node.as_bytes(),
        &created,
        &expires,
        &ip_flag,
        c.source_ip.unwrap_or("").as_bytes(),
        c.proxy_token_hash,
        c.ca_cert_pem.as_bytes(),
    ];
    for f in fields {
        out.extend_from_slice(&(f.len() as u64).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// Associated data of a sandbox snapshot: `sealgate/sandbox-snapshot/v1\0{id}`.
pub fn snapshot_aad(sandbox_id: &str) -> Vec<u8> {
    format!("sealgate/sandbox-snapshot/v1\0{sandbox_id}").into_bytes()
}

/// Associated data of the key-check record: `sealgate/key-check/v1`.
pub fn key_check_aad() -> &'static [u8] {
    b"sealgate/key-check/v1"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn seal_open_round_trip() {
        let key = MasterKey::generate();
        let sealed = seal(&key, b"aad", b"sk-live-123");
        assert_eq!(sealed.len(), 11 + SEAL_OVERHEAD);
        assert_eq!(sealed[0], FORMAT_V1);
        assert_eq!(
            open(&key, b"aad", &sealed).unwrap().expose(),
            b"sk-live-123"
        );
    }

    #[test]
    fn empty_plaintext_round_trips() {
        let key = MasterKey::generate();
        let sealed = seal(&key, b"", b"");
        assert!(open(&key, b"", &sealed).unwrap().is_empty());
    }

    #[test]
    fn nonces_differ() {
        let key = MasterKey::generate();
        assert_ne!(seal(&key, b"a", b"same"), seal(&key, b"a", b"same"));
    }

    #[test]
    fn wrong_aad_key_or_bits_fail() {
        let key = MasterKey::generate();
        let sealed = seal(&key, b"row-1", b"value");
        assert!(matches!(
            open(&key, b"row-2", &sealed),
            Err(CryptoError::Decrypt)
        ));
        let other = MasterKey::generate();
        assert!(matches!(
            open(&other, b"row-1", &sealed),
            Err(CryptoError::Decrypt)
        ));
        for i in 1..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(
                matches!(open(&key, b"row-1", &bad), Err(CryptoError::Decrypt)),
                "byte {i}"
            );
        }
    }

    #[test]
    fn malformed_inputs_fail() {
        let key = MasterKey::generate();
        let mut sealed = seal(&key, b"", b"v");
        assert!(matches!(
            open(&key, b"", &sealed[..SEAL_OVERHEAD - 1]),
            Err(CryptoError::Malformed)
        ));
        sealed[0] = 2;
        assert!(matches!(
            open(&key, b"", &sealed),
            Err(CryptoError::Malformed)
        ));
    }

    #[test]
    fn aad_strings_are_exact() {
        assert_eq!(secret_aad("s", "N", 3), b"sealgate/secret/v1\0s\0N\x003");
        assert_eq!(sandbox_ca_aad("sbx_1"), b"sealgate/sandbox-ca/v1\0sbx_1");
        assert_eq!(
            snapshot_aad("sbx_1"),
            b"sealgate/sandbox-snapshot/v1\0sbx_1"
        );
        assert_eq!(key_check_aad(), b"sealgate/key-check/v1");
    }

    #[test]
    fn policy_macs_bind_every_field_and_the_key() {
        let key = MasterKey::generate();
        let hosts = vec!["api.example.com".to_owned()];
        let evil = vec!["evil.example".to_owned()];
        let both = [Location::Header, Location::Body];
        let p = SecretPolicy {
            store_id: "s",
            name: "K",
            version: 2,
            allowed_hosts: Some(hosts.as_slice()),
            locations: &[Location::Header],
        };
        let mac = p.mac(&key);
        assert_eq!(mac.len(), 32);
        assert!(p.verify(&key, Some(&mac)).is_ok());
        let altered = [
            SecretPolicy {
                allowed_hosts: Some(evil.as_slice()),
                ..p
            },
            SecretPolicy {
                allowed_hosts: None,
                ..p
            },
            SecretPolicy {
                locations: &both,
                ..p
            },
            SecretPolicy { version: 3, ..p },
            SecretPolicy { name: "K2", ..p },
            SecretPolicy { store_id: "t", ..p },
        ];
        for a in altered {
            assert!(
                matches!(a.verify(&key, Some(&mac)), Err(CryptoError::PolicyTampered)),
                "{a:?}"
            );
        }
        assert!(p.verify(&MasterKey::generate(), Some(&mac)).is_err());
        assert!(p.verify(&key, None).is_err());

        let sp = StorePolicy {
            store_id: "s",
            egress_allowlist: Some(hosts.as_slice()),
        };
        let smac = sp.mac(&key);
        assert!(sp.verify(&key, Some(&smac)).is_ok());
        for a in [
            StorePolicy {
                egress_allowlist: None,
                ..sp
            },
            StorePolicy {
                egress_allowlist: Some(&[][..]),
                ..sp
            },
            StorePolicy {
                store_id: "t",
                ..sp
            },
        ] {
            assert!(a.verify(&key, Some(&smac)).is_err(), "{a:?}");
        }
        assert_ne!(smac, mac, "store and secret MACs are domain-separated");
    }

    #[test]
    fn base64_round_trip_and_errors_do_not_quote_input() {
        let key = MasterKey::generate();
        let again = MasterKey::from_base64(&format!(" {}\n", &*key.to_base64())).unwrap();
        assert_eq!(key.0[..], again.0[..]);
        assert_eq!(format!("{key:?}"), "[redacted]");

        let short = STANDARD.encode([7u8; 31]);
        let err = MasterKey::from_base64(&short).unwrap_err().to_string();
        assert!(err.contains("32 bytes") && !err.contains(&short), "{err}");
        let err = MasterKey::from_base64("not*base64-SECRETISH")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("SECRETISH"), "{err}");
    }

    #[test]
    fn key_file_is_created_0600_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let (created, source) = MasterKey::load_or_create(&data_dir, None).unwrap();
        let path = data_dir.join(KEY_FILE_NAME);
        assert_eq!(source, KeySource::Created(path.clone()));
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(mode_of(&data_dir), 0o700);

        let (loaded, source) = MasterKey::load_or_create(&data_dir, None).unwrap();
        assert_eq!(source, KeySource::Loaded(path.clone()));
        assert_eq!(created.0[..], loaded.0[..]);
        assert!(source.to_string().contains("master.key"));
    }

    #[test]
    fn key_file_at_any_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rotation").join("new.key");
        let (created, source) = MasterKey::load_or_create_file(&path).unwrap();
        assert_eq!(source, KeySource::Created(path.clone()));
        assert_eq!(mode_of(&path), 0o600);
        let (loaded, source) = MasterKey::load_or_create_file(&path).unwrap();
        assert_eq!(source, KeySource::Loaded(path));
        assert_eq!(created.0[..], loaded.0[..]);
    }

    #[test]
    fn group_readable_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        MasterKey::load_or_create(dir.path(), None).unwrap();
        let path = dir.path().join(KEY_FILE_NAME);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = MasterKey::load_or_create(dir.path(), None).unwrap_err();
        assert!(matches!(
            err,
            CryptoError::InsecureKeyFile { mode: 0o644, .. }
        ));
        let msg = err.to_string();
        assert!(msg.contains("644") && msg.contains("chmod 600"), "{msg}");
    }

    #[test]
    fn env_key_wins_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let (file_key, _) = MasterKey::load_or_create(dir.path(), None).unwrap();
        let env_key = MasterKey::generate();
        let (key, source) =
            MasterKey::load_or_create(dir.path(), Some(&env_key.to_base64())).unwrap();
        assert_eq!(source, KeySource::Env);
        assert_eq!(key.0[..], env_key.0[..]);
        assert_ne!(key.0[..], file_key.0[..]);
    }

    #[test]
    fn missing_key_file_beside_a_database_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sealgate.db");
        fs::write(&db, b"").unwrap();
        let err = MasterKey::load_existing(dir.path(), None, &db).unwrap_err();
        assert!(matches!(err, CryptoError::MissingKeyFile { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("master.key") && msg.contains("sealgate.db"),
            "{msg}"
        );
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the database: {names:?}");

        let (file_key, _) = MasterKey::load_or_create(dir.path(), None).unwrap();
        let (key, source) = MasterKey::load_existing(dir.path(), None, &db).unwrap();
        assert_eq!(key.0[..], file_key.0[..]);
        assert!(matches!(source, KeySource::Loaded(_)));
    }

    #[test]
    fn env_key_does_not_create_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let env_key = MasterKey::generate();
        MasterKey::load_or_create(dir.path(), Some(&env_key.to_base64())).unwrap();
        assert!(!dir.path().join(KEY_FILE_NAME).exists());
    }

    #[test]
    fn invalid_env_or_file_key_names_its_origin() {
        let dir = tempfile::tempdir().unwrap();
        let err = MasterKey::load_or_create(dir.path(), Some("")).unwrap_err();
        assert!(err.to_string().contains(KEY_ENV_VAR), "{err}");
        let path = dir.path().join(KEY_FILE_NAME);
        fs::write(&path, "garbage\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = MasterKey::load_or_create(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("master.key"), "{err}");
    }
}
