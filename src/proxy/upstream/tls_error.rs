//! A failed upstream TLS handshake, described in fixed words.
//!
//! Invariant: the description never contains text the upstream chose. rustls's own messages
//! quote what the peer presented — a certificate's names ("certificate is only valid for
//! DnsName(…)") — and an upstream that knows a real value can put it there (an outside test
//! did, and it reached the sandbox's 502 and the audit log). So only the *kind* of failure is
//! named, from a closed list; anything else is "handshake failed".

use std::io;

use rustls::{AlertDescription, CertificateError, Error};

/// What went wrong with the handshake `e` reports, in words the upstream cannot choose.
pub fn describe(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(tls) => describe_tls(tls),
        None => io_kind(e).to_owned(),
    }
}

fn describe_tls(e: &Error) -> String {
    match e {
        Error::InvalidCertificate(c) => format!("invalid peer certificate: {}", certificate(c)),
        Error::NoCertificatesPresented => "the upstream presented no certificate".into(),
        // What an origin answers when it shares no version or suite with sealgate: say which
        // ones sealgate has (an outside pass met TLS 1.2 origins with CBC or RSA key exchange
        // only, which curl reaches and rustls does not implement).
        Error::AlertReceived(
            a @ (AlertDescription::HandshakeFailure
            | AlertDescription::ProtocolVersion
            | AlertDescription::InsufficientSecurity),
        ) => format!(
            "the upstream sent the TLS alert {} (sealgate offers TLS 1.3, and TLS 1.2 with \
             ECDHE key exchange and AEAD suites only)",
            alert(a)
        ),
        Error::AlertReceived(a) => format!("the upstream sent the TLS alert {}", alert(a)),
        Error::NoApplicationProtocol => "no application protocol in common".into(),
        Error::PeerIncompatible(_) => {
            "the upstream's TLS is incompatible (versions, suites)".into()
        }
        Error::PeerMisbehaved(_) | Error::InappropriateMessage { .. } => {
            "the upstream broke the TLS protocol".into()
        }
        Error::InappropriateHandshakeMessage { .. } | Error::InvalidMessage(_) => {
            "the upstream sent a malformed TLS message".into()
        }
        Error::DecryptError => "a TLS record did not decrypt".into(),
        _ => "handshake failed".into(),
    }
}

fn certificate(c: &CertificateError) -> &'static str {
    match c {
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "not valid for the destination's name"
        }
        CertificateError::UnknownIssuer => {
            "unknown issuer (not in the webpki roots or [upstream] ca_files)"
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "not valid yet"
        }
        CertificateError::Revoked => "revoked",
        CertificateError::BadSignature => "bad signature",
        CertificateError::BadEncoding => "malformed",
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "not for server authentication"
        }
        _ => "rejected",
    }
}

/// An alert's name: its `Debug` form for the alerts rustls knows, a number otherwise.
fn alert(a: &rustls::AlertDescription) -> String {
    match a {
        rustls::AlertDescription::Unknown(n) => format!("#{n}"),
        known => format!("{known:?}"),
    }
}

fn io_kind(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "the upstream closed the connection during the handshake",
        io::ErrorKind::ConnectionReset => "the upstream reset the connection during the handshake",
        io::ErrorKind::TimedOut => "the handshake timed out",
        _ => "handshake failed (I/O error)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;

    fn io(e: Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn names_the_certificate_presented_never_appear() {
        let e = io(Error::InvalidCertificate(
            CertificateError::NotValidForNameContext {
                expected: ServerName::try_from("api.example.test").unwrap(),
                presented: vec!["DnsName(\"sk-real-0123456789.attacker.example\")".into()],
            },
        ));
        let text = describe(&e);
        assert_eq!(
            text,
            "invalid peer certificate: not valid for the destination's name"
        );
        assert!(!text.contains("sk-real"));
    }

    #[test]
    fn every_kind_gets_fixed_words() {
        let cases = [
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "unknown issuer",
            ),
            (
                Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
                "alert HandshakeFailure (sealgate offers TLS 1.3, and TLS 1.2 with ECDHE",
            ),
            (
                Error::AlertReceived(rustls::AlertDescription::Unknown(201)),
                "alert #201",
            ),
            (
                Error::General("sk-real-from-somewhere".into()),
                "handshake failed",
            ),
        ];
        for (e, want) in cases {
            let text = describe(&io(e));
            assert!(text.contains(want), "{text}");
            assert!(!text.contains("sk-real"), "{text}");
        }
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "sk-real-in-an-io-error");
        assert!(!describe(&eof).contains("sk-real"));
    }
}
