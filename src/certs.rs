//! `ps-cluster certs`: a development certificate authority and the
//! certificates of one cluster, made with rcgen (ECDSA P-256), as PEM files
//! in one folder:
//!
//! | file | Subject CN | for |
//! | --- | --- | --- |
//! | `ca.pem`, `ca.key` | `paramserver dev CA` | signs the others; every process trusts `ca.pem` |
//! | `shard.pem`, `.key` | `shard` | the shards' server certificate (SANs: localhost, 127.0.0.1, ::1, `--hosts`) |
//! | `serve.pem`, `.key` | `serve` | `ps-serve`'s listeners (same SANs) |
//! | `admin.pem`, `.key` | `admin` | the launcher and operators (register, checkpoint, stats) |
//! | `reader.pem`, `.key` | `reader` | read-only clients (`ps-serve --online`, evaluation) |
//! | `worker-N.pem`, `.key` | `worker:N` | worker N; also its `/metrics` over HTTPS (SAN: `worker-N` only) |
//!
//! The Subject CN is the principal the shards' role checks read. A worker's
//! certificate serves its metrics endpoint under the name `worker-N` alone,
//! never the shards' names, so that a worker's key cannot pose as a shard
//! (a scraper checks it with `server_name = worker-N`). Keys are
//! written with mode 0600. The CA key stays in the folder so that more
//! certificates can be made later by hand; a production deployment brings
//! its own CA instead (docs/SECURITY.md).

use std::io::Write;
use std::path::{Path, PathBuf};

use ps_common::transport::CA_FILE;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};

use crate::cluster::{Error, Result};

/// What to make.
#[derive(Debug, Clone)]
pub struct Options {
    /// Worker certificates `worker-0` .. `worker-(workers-1)`.
    pub workers: u32,
    /// Host names or IP addresses the server certificates also name.
    pub hosts: Vec<String>,
    /// Days the certificates are valid, from an hour ago.
    pub days: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options { workers: 2, hosts: Vec::new(), days: 365 }
    }
}

/// The principal (Subject CN) of worker `index`'s certificate.
pub fn worker_principal(index: u32) -> String {
    format!("worker:{index}")
}

/// The file stem of worker `index`'s certificate (`worker-N.pem`).
pub fn worker_file(index: u32) -> String {
    format!("worker-{index}")
}

fn cert_error(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::Certificate(format!("{what}: {e}"))
}

/// Makes a CA and every certificate in `dir` (created if missing). Refuses a
/// folder that already holds a CA, so that no running cluster's trust is
/// replaced by accident. Returns the files written.
pub fn create(dir: &Path, opts: &Options) -> Result<Vec<PathBuf>> {
    if dir.join(CA_FILE).exists() {
        return Err(Error::Certificate(format!(
            "{} already holds a CA ({CA_FILE}); remove the folder or choose another",
            dir.display()
        )));
    }
    if opts.days == 0 {
        return Err(Error::Certificate("--days must be positive".into()));
    }
    std::fs::create_dir_all(dir)
        .map_err(|source| Error::Io { what: format!("creating {}", dir.display()), source })?;
    let now = time::OffsetDateTime::now_utc();
    let validity = |p: &mut CertificateParams| {
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(i64::from(opts.days));
    };
    let mut written = Vec::new();

    let ca_key = KeyPair::generate().map_err(cert_error("generating the CA key"))?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("paramserver dev CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).map_err(cert_error("signing the CA"))?;
    written.push(write(dir, "ca.pem", &ca_cert.pem(), false)?);
    written.push(write(dir, "ca.key", &ca_key.serialize_pem(), true)?);
    let issuer = Issuer::new(ca, ca_key);

    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    sans.extend(opts.hosts.iter().filter(|h| !h.is_empty()).cloned());
    // (file, principal, server names, client usage)
    let mut leaves: Vec<(String, String, Vec<String>, bool)> = vec![
        ("shard".into(), "shard".into(), sans.clone(), false),
        ("serve".into(), "serve".into(), sans.clone(), false),
        ("admin".into(), "admin".into(), Vec::new(), true),
        ("reader".into(), "reader".into(), Vec::new(), true),
    ];
    leaves
        .extend((0..opts.workers).map(|i| (worker_file(i), worker_principal(i), vec![worker_file(i)], true)));
    for (file, principal, names, client) in leaves {
        let mut p =
            CertificateParams::new(names.clone()).map_err(cert_error("the server names (--hosts)"))?;
        p.distinguished_name = name(&principal);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = Vec::new();
        if !names.is_empty() {
            p.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if client {
            p.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        p.use_authority_key_identifier_extension = true;
        validity(&mut p);
        let key = KeyPair::generate().map_err(cert_error("generating a key"))?;
        let cert = p.signed_by(&key, &issuer).map_err(cert_error(&file))?;
        written.push(write(dir, &format!("{file}.pem"), &cert.pem(), false)?);
        written.push(write(dir, &format!("{file}.key"), &key.serialize_pem(), true)?);
    }
    Ok(written)
}

/// Makes the certificates of a local cluster in `dir` unless it already
/// holds them (a resumed run keeps its own).
pub fn ensure(dir: &Path, opts: &Options) -> Result<()> {
    let complete = dir.join(CA_FILE).exists()
        && ["shard", "admin", "reader"]
            .into_iter()
            .map(String::from)
            .chain((0..opts.workers).map(worker_file))
            .all(|f| dir.join(format!("{f}.pem")).exists() && dir.join(format!("{f}.key")).exists());
    if complete {
        return Ok(());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|source| Error::Io { what: format!("clearing {}", dir.display()), source })?;
    }
    create(dir, opts).map(drop)
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Writes `text` to `dir/file`; a private key is created with mode 0600, so
/// it is never readable by others, not even for a moment.
fn write(dir: &Path, file: &str, text: &str, secret: bool) -> Result<PathBuf> {
    let path = dir.join(file);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let io = |source| Error::Io { what: format!("writing {}", path.display()), source };
    let mut f = options.open(&path).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_every_file_once_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tls");
        let files = create(&out, &Options { workers: 2, hosts: vec!["hostA".into()], days: 1 }).unwrap();
        assert_eq!(files.len(), 2 * 7);
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{}", f.display());
            #[cfg(unix)]
            if f.extension().is_some_and(|e| e == "key") {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", f.display());
            }
        }
        assert!(out.join("worker-1.pem").exists() && !out.join("worker-2.pem").exists());
        let again = create(&out, &Options::default()).unwrap_err().to_string();
        assert!(again.contains("already holds a CA"), "{again}");
        ensure(&out, &Options { workers: 2, ..Options::default() }).unwrap();
        let ca_before = std::fs::read(out.join("ca.pem")).unwrap();
        ensure(&out, &Options { workers: 2, ..Options::default() }).unwrap();
        assert_eq!(std::fs::read(out.join("ca.pem")).unwrap(), ca_before, "complete folders are kept");
        ensure(&out, &Options { workers: 3, ..Options::default() }).unwrap();
        assert!(out.join("worker-2.pem").exists());
    }
}
