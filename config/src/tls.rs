//! TLS material as the config holds it: PEM certificate chains and private
//! keys, parsed and checked (the key belongs to the leaf, the leaf is not
//! expired), and described for people (subject, SANs, issuer, validity,
//! fingerprint), never showing the key. Every process parses certificates
//! here: the admin API on write, gateways when they compile `certs/`.
//!
//! Crypto is rustls's `ring` provider, the one the etcd client's TLS uses
//! too.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The crypto provider every TLS config of the product is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM chain, leaf first. Other PEM sections (a key
/// pasted beside it) are skipped; no certificate at all is an error.
pub fn parse_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut chain = Vec::new();
    for (i, c) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
        chain.push(c.map_err(|e| format!("PEM section {} is not a certificate: {e}", i + 1))?);
    }
    if chain.is_empty() {
        return Err("no PEM `CERTIFICATE` section found".into());
    }
    Ok(chain)
}

/// The first private key of a PEM text (PKCS#8, PKCS#1 RSA or SEC1 EC).
/// The error never quotes the text.
pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            "no PEM private key section found (`PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`)"
                .to_string()
        }
        _ => "the private key's PEM does not parse".to_string(),
    })
}

/// A chain and its key made ready to serve: the key loaded, and checked to
/// belong to the leaf.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'static>,
) -> Result<CertifiedKey, String> {
    let signing = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("unsupported or malformed private key: {e}"))?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(_) => Err("does not match the certificate's public key".into()),
    }
}

/// What GET shows of a certificate, and what the gateway indexes it by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    pub subject: String,
    /// `DNS:<name>`, `URI:<uri>`, `IP:<address>`, `email:<address>`.
    pub sans: Vec<String>,
    pub issuer: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// SHA-256 of the DER, as openssl prints it (`AB:CD:…`).
    pub fingerprint_sha256: String,
    /// Validity as Unix seconds (for checks and metrics).
    #[serde(skip)]
    pub not_before_unix: i64,
    #[serde(skip)]
    pub not_after_unix: i64,
}

impl CertInfo {
    /// The DNS names among the SANs (lower-cased), which SNI selects by.
    pub fn dns_names(&self) -> impl Iterator<Item = &str> {
        self.sans.iter().filter_map(|s| s.strip_prefix("DNS:"))
    }

    /// The URI SANs (mesh identities are SPIFFE URIs).
    pub fn uris(&self) -> impl Iterator<Item = &str> {
        self.sans.iter().filter_map(|s| s.strip_prefix("URI:"))
    }
}

/// Parses one certificate's DER into its description.
pub fn describe(der: &[u8]) -> Result<CertInfo, String> {
    use x509_parser::extensions::GeneralName;
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push(format!("DNS:{}", d.to_ascii_lowercase())),
                GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                GeneralName::RFC822Name(m) => sans.push(format!("email:{m}")),
                GeneralName::IPAddress(ip) => {
                    let ip = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip).map(std::net::IpAddr::from).ok(),
                        16 => <[u8; 16]>::try_from(*ip).map(std::net::IpAddr::from).ok(),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.push(format!("IP:{ip}"));
                    }
                }
                _ => {}
            }
        }
    }
    let validity = cert.validity();
    let not_before_unix = validity.not_before.timestamp();
    let not_after_unix = validity.not_after.timestamp();
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        sans,
        issuer: cert.issuer().to_string(),
        not_before: rfc3339(not_before_unix),
        not_after: rfc3339(not_after_unix),
        fingerprint_sha256: fingerprint(der),
        not_before_unix,
        not_after_unix,
    })
}

/// SHA-256 of `der` as upper-case hex pairs joined by `:`.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let mut out = String::with_capacity(digest.len() * 3);
    for (i, b) in digest.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push_str(&format!("{b:02X}"));
    }
    out
}

/// Unix seconds as RFC 3339 (UTC).
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Unix milliseconds as RFC 3339 (UTC), with milliseconds.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let nanos = i128::from(unix_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            let f = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            t.format(&f).ok()
        })
        .unwrap_or_else(|| unix_ms.to_string())
}

/// Now, in Unix seconds.
pub fn now_unix() -> i64 {
    (crate::model::now_ms() / 1000) as i64
}

/// A certificate object checked whole: the chain parses, the leaf is not
/// expired, the key parses and belongs to the leaf. Each problem is named
/// by its field (`certificate`, `private_key`).
pub fn check_pair(certificate: &str, private_key: &str) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let chain = match parse_chain(certificate) {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(("certificate", e));
            None
        }
    };
    if let Some(chain) = &chain {
        for (i, der) in chain.iter().enumerate() {
            match describe(der) {
                Ok(info) if i == 0 && info.not_after_unix <= now_unix() => problems.push((
                    "certificate",
                    format!("the certificate expired at {}", info.not_after),
                )),
                Ok(_) => {}
                Err(e) => problems.push((
                    "certificate",
                    format!("certificate {} of the chain: {e}", i + 1),
                )),
            }
        }
    }
    if private_key.is_empty() {
        problems.push(("private_key", "required".into()));
        return problems;
    }
    let key = match parse_key(private_key) {
        Ok(k) => k,
        Err(e) => {
            problems.push(("private_key", e));
            return problems;
        }
    };
    if let Some(chain) = chain {
        if let Err(e) = certified_key(chain, &key) {
            problems.push(("private_key", e));
        }
    }
    problems
}

/// The public view of a stored `certs/` spec: the private key removed, and
/// the leaf described (`None` when the certificate does not parse).
pub fn redact_cert(spec: &mut serde_json::Value) -> Option<CertInfo> {
    let obj = spec.as_object_mut()?;
    obj.remove("private_key");
    let pem = obj.get("certificate")?.as_str()?;
    let chain = parse_chain(pem).ok()?;
    describe(&chain[0]).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed certificate for `names`, valid from `from` to `to`
    /// (Unix seconds), and its key, as PEM.
    pub(crate) fn self_signed(names: &[&str], from: i64, to: i64) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(to).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn valid() -> (String, String) {
        let now = now_unix();
        self_signed(&["example.com", "*.example.com"], now - 60, now + 86_400)
    }

    #[test]
    fn a_matching_pair_is_accepted_and_described() {
        let (cert, key) = valid();
        assert!(check_pair(&cert, &key).is_empty());
        let mut spec = serde_json::json!({"certificate": cert, "private_key": key});
        let info = redact_cert(&mut spec).unwrap();
        assert!(spec.get("private_key").is_none(), "the key is removed");
        assert_eq!(
            info.dns_names().collect::<Vec<_>>(),
            ["example.com", "*.example.com"]
        );
        assert!(info.subject.contains("rcgen"), "{}", info.subject);
        assert_eq!(info.fingerprint_sha256.len(), 32 * 3 - 1);
        assert!(info.not_after.ends_with('Z'), "{}", info.not_after);
    }

    #[test]
    fn every_problem_is_named_by_its_field() {
        let (cert, key) = valid();
        let (_, other_key) = valid();
        let fields = |c: &str, k: &str| {
            check_pair(c, k)
                .into_iter()
                .map(|(f, m)| format!("{f}: {m}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            fields(&cert, &other_key),
            ["private_key: does not match the certificate's public key"]
        );
        assert_eq!(fields(&cert, ""), ["private_key: required"]);
        let garbage = fields(
            &cert,
            "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
        );
        assert_eq!(garbage.len(), 1, "{garbage:?}");
        assert!(garbage[0].starts_with("private_key: "), "{garbage:?}");
        assert!(!garbage[0].contains("base64!"), "errors never quote a key");
        assert_eq!(
            fields("hello", &key),
            ["certificate: no PEM `CERTIFICATE` section found"]
        );
        let now = now_unix();
        let (old, old_key) = self_signed(&["example.com"], now - 7200, now - 3600);
        let expired = fields(&old, &old_key);
        assert_eq!(expired.len(), 1, "{expired:?}");
        assert!(
            expired[0].starts_with("certificate: the certificate expired at "),
            "{expired:?}"
        );
        let broken = cert.replace("MII", "MIJ");
        assert!(
            fields(&broken, &key)
                .iter()
                .any(|e| e.starts_with("certificate: ")),
            "a corrupted DER is refused"
        );
    }
}
