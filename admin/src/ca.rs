//! The mesh CA on files, for `meshctl ca`: a root and an issuer signed by
//! it (`init`), and workload certificates signed by the issuer (`issue`),
//! each naming one SPIFFE identity. The root's key is needed only by
//! `init` (keep it offline afterwards); the issuer's key signs.
//!
//! Layout of the CA directory: `root.crt`, `root.key`, `issuer.crt`,
//! `issuer.key`, `bundle.pem` (the trust bundle: the root), and
//! `trust-domain`. Keys are written mode 0600, and nothing is overwritten.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Writes `text` to a new file (refusing to replace one), readable by its
/// owner only when `private`.
fn write_new(path: &Path, text: &str, private: bool) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::try_from(lifetime).unwrap_or(time::Duration::DAY);
}

/// A trust domain is a DNS-like name (`example.org`, `prod.mesh`).
fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        })
}

/// Creates the CA in `dir` (made if missing; files already there are
/// never replaced): a root valid `root_for`, an issuer valid `issuer_for`.
pub fn init(
    dir: &Path,
    trust_domain: &str,
    root_for: Duration,
    issuer_for: Duration,
) -> Result<(), String> {
    if !valid_trust_domain(trust_domain) {
        return Err(format!(
            "--trust-domain {trust_domain:?}: lower-case letters, digits, '-' and dots"
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca_params = |name: String, lifetime: Duration, path_len: Option<u8>| {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = match path_len {
            Some(n) => IsCa::Ca(BasicConstraints::Constrained(n)),
            None => IsCa::Ca(BasicConstraints::Unconstrained),
        };
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut p, lifetime);
        Ok::<_, String>(p)
    };
    let root_key = KeyPair::generate().map_err(err)?;
    let root_params = ca_params(format!("Meshgate root {trust_domain}"), root_for, Some(1))?;
    let root = root_params.self_signed(&root_key).map_err(err)?;
    let root_issuer = Issuer::new(root_params, root_key);
    let issuer_key = KeyPair::generate().map_err(err)?;
    let issuer = ca_params(
        format!("Meshgate issuer {trust_domain}"),
        issuer_for,
        Some(0),
    )?
    .signed_by(&issuer_key, &root_issuer)
    .map_err(err)?;
    write_new(
        &dir.join("trust-domain"),
        &format!("{trust_domain}\n"),
        false,
    )?;
    write_new(&dir.join("root.crt"), &root.pem(), false)?;
    write_new(
        &dir.join("root.key"),
        &root_issuer.key().serialize_pem(),
        true,
    )?;
    write_new(&dir.join("issuer.crt"), &issuer.pem(), false)?;
    write_new(&dir.join("issuer.key"), &issuer_key.serialize_pem(), true)?;
    write_new(&dir.join("bundle.pem"), &root.pem(), false)?;
    Ok(())
}

/// Signs a certificate for the identity at `path` (`gateway/<id>` or
/// `group/<g>/service/<svc>`) with the issuer of `dir`, valid `lifetime`,
/// and writes `<out>.crt` (leaf, then issuer) and `<out>.key`. Returns
/// the SPIFFE ID.
pub fn issue(dir: &Path, path: &str, lifetime: Duration, out: &Path) -> Result<String, String> {
    let trust_domain = read(&dir.join("trust-domain"))?.trim().to_string();
    let issuer_pem = read(&dir.join("issuer.crt"))?;
    let issuer_key = KeyPair::from_pem(&read(&dir.join("issuer.key"))?).map_err(err)?;
    let issuer = Issuer::from_ca_cert_pem(&issuer_pem, issuer_key).map_err(err)?;
    let spiffe = format!("spiffe://{trust_domain}/{path}");
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    p.distinguished_name
        .push(DnType::CommonName, path.rsplit('/').next().unwrap_or(path));
    p.subject_alt_names = vec![SanType::URI(
        rcgen::string::Ia5String::try_from(spiffe.as_str()).map_err(err)?,
    )];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Each process is a client on one hop and a server on the next.
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut p, lifetime);
    let key = KeyPair::generate().map_err(err)?;
    let leaf = p.signed_by(&key, &issuer).map_err(err)?;
    let with_ext = |ext: &str| -> PathBuf {
        let mut s = out.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    write_new(
        &with_ext(".crt"),
        &format!("{}{issuer_pem}", leaf.pem()),
        false,
    )?;
    write_new(&with_ext(".key"), &key.serialize_pem(), true)?;
    Ok(spiffe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_identities_the_mesh_accepts_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init(
            &ca,
            "mesh.test",
            Duration::from_secs(86_400 * 365),
            Duration::from_secs(86_400 * 30),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        for key in ["root.key", "issuer.key"] {
            let mode = std::fs::metadata(ca.join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let out = dir.path().join("orders");
        let id = issue(
            &ca,
            "group/shop/service/orders",
            Duration::from_secs(3600),
            &out,
        )
        .unwrap();
        assert_eq!(id, "spiffe://mesh.test/group/shop/service/orders");
        let chain = meshgate_config::tls::parse_chain(
            &std::fs::read_to_string(dir.path().join("orders.crt")).unwrap(),
        )
        .unwrap();
        assert_eq!(chain.len(), 2, "leaf and issuer");
        let info = meshgate_config::tls::describe(&chain[0]).unwrap();
        assert_eq!(info.uris().collect::<Vec<_>>(), [id.as_str()]);
        let key = meshgate_config::tls::parse_key(
            &std::fs::read_to_string(dir.path().join("orders.key")).unwrap(),
        )
        .unwrap();
        meshgate_config::tls::certified_key(chain, &key).unwrap();
        // Nothing is replaced.
        assert!(init(
            &ca,
            "mesh.test",
            Duration::from_secs(60),
            Duration::from_secs(60)
        )
        .is_err());
        assert!(issue(
            &ca,
            "group/shop/service/orders",
            Duration::from_secs(60),
            &out
        )
        .is_err());
        assert!(init(
            &dir.path().join("x"),
            "Bad Domain",
            Duration::from_secs(60),
            Duration::from_secs(60)
        )
        .is_err());
    }
}
