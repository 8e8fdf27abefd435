//! rcgen parameters for the sandbox CA and its leaves: names, validity, serials, extensions.
//!
//! rcgen's defaults are wrong for us (validity 1975–4096, serial derived from the public key so
//! every certificate over one key shares a serial, no authority key identifier), so every field
//! that matters is set here explicitly.

use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyIdMethod, KeyUsagePurpose, SanType, SerialNumber,
};

use super::{CaError, LeafName};

/// Both the CA and its leaves start one hour in the past, so a client whose clock lags ours
/// by up to an hour still accepts them.
pub(super) const BACKDATE: Duration = Duration::hours(1);

/// CA lifetime, counted from its (backdated) notBefore: ten years.
pub(super) const CA_LIFETIME: Duration = Duration::days(3652);

/// Leaf lifetime, counted from its (backdated) notBefore. DESIGN §3 asks for "under 200 days";
/// 199 keeps us clear of clients that cap leaf validity at 200 days.
pub(super) const LEAF_LIFETIME: Duration = Duration::days(199);

/// X.520 upper bound for a commonName. Longer host names go only into the SAN (the CN is
/// informational; every client we care about matches on the SAN).
const CN_MAX_LEN: usize = 64;

/// Serial numbers carry 128 random bits (RFC 5280 allows up to 20 octets; CA/B asks ≥ 64
/// bits). DER encodes them as positive integers (a 0x00 is prepended when the top bit is set).
const SERIAL_LEN: usize = 16;

/// Parameters of a sandbox CA created at `now`: CN `sealgate sandbox CA <id>`, O `sealgate`,
/// CA:TRUE pathlen 0, keyCertSign + cRLSign + digitalSignature, SKI (SHA-256 method), random
/// serial, valid from `now - 1h` for ten years.
pub(super) fn ca_params(
    sandbox_id: &str,
    now: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_name(sandbox_id);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.key_identifier_method = KeyIdMethod::Sha256;
    params.serial_number = Some(random_serial()?);
    params.not_before = whole_seconds(now) - BACKDATE;
    params.not_after = params.not_before + CA_LIFETIME;
    Ok(params)
}

fn ca_name(sandbox_id: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("sealgate sandbox CA {sandbox_id}"),
    );
    dn.push(DnType::OrganizationName, "sealgate");
    dn
}

/// Parameters of a leaf for `name` minted at `now` under a CA that expires at `ca_not_after`:
/// exact-host SAN, CN = host (when it fits), random serial, AKI on, serverAuth EKU,
/// digitalSignature KU, CA:FALSE, valid from `now - 1h` for [`LEAF_LIFETIME`] but never past
/// the CA's notAfter.
///
/// # Errors
/// [`CaError::InvalidName`] if the name is not a valid host name, [`CaError::CaExpired`] if the CA has no
/// validity left, [`CaError::Rng`] if the OS RNG fails.
pub(super) fn leaf_params(
    name: &LeafName,
    now: OffsetDateTime,
    ca_not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    if ca_not_after <= now {
        return Err(CaError::CaExpired);
    }
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![san(name)?];
    params.distinguished_name = leaf_subject(name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    params.not_before = whole_seconds(now) - BACKDATE;
    params.not_after = (params.not_before + LEAF_LIFETIME).min(ca_not_after);
    Ok(params)
}

/// `t` without its fraction of a second: certificates store whole seconds, and dropping the
/// fraction here keeps the in-memory times equal to the encoded ones.
fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t - Duration::nanoseconds(i64::from(t.nanosecond()))
}

fn san(name: &LeafName) -> Result<SanType, CaError> {
    match name {
        LeafName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
        LeafName::Dns(host) => dns_san(host).ok_or_else(|| CaError::InvalidName(host.clone())),
    }
}

/// A DNS SAN for `host` if it is a syntactically valid host name (the same rules a rustls
/// client applies to its server name: no wildcards, no IP-like names, label and length limits).
fn dns_san(host: &str) -> Option<SanType> {
    rustls_pki_types::DnsName::try_from(host).ok()?;
    host.try_into().ok().map(SanType::DnsName)
}

fn leaf_subject(name: &LeafName) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    let cn = name.to_string();
    if cn.len() <= CN_MAX_LEN {
        dn.push(DnType::CommonName, cn);
    }
    dn
}

/// 128 bits from the OS CSPRNG.
///
/// # Errors
/// [`CaError::Rng`] if the OS RNG fails.
pub(super) fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; SERIAL_LEN];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Rng)?;
    Ok(SerialNumber::from_slice(&bytes))
}
