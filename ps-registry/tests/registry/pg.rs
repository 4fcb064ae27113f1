//! A throwaway PostgreSQL server for the tests: `initdb` into a temporary
//! folder, `pg_ctl start` on a free loopback port, `pg_ctl stop -m immediate`
//! and the folder removed on drop (also when a test panics). TCP clients
//! must use TLS (`hostssl` only), with a certificate from a CA made here.
//!
//! The binaries come from `$PG_BINDIR`, else `pg_config --bindir`. PostgreSQL
//! refuses to run as root, so as root every command runs as the `postgres`
//! system user (`runuser -u postgres --`), in a folder that user owns.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

pub struct Postgres {
    bindir: PathBuf,
    dir: PathBuf,
    /// The system user the server runs as, when we are root.
    run_as: Option<&'static str>,
    pub port: u16,
}

impl Postgres {
    pub fn start() -> anyhow::Result<Postgres> {
        let bindir = bindir()?;
        let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let dir = std::env::temp_dir().join(format!("ps-registry-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let run_as = if root {
            let (uid, gid) = user_ids("postgres").context(
                "running as root, the tests start PostgreSQL as the `postgres` system user, which is missing \
                 (install postgresql-15)",
            )?;
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to postgres", dir.display()))?;
            Some("postgres")
        } else {
            None
        };
        let mut pg = Postgres { bindir, dir, run_as, port: free_port()? };
        let data = pg.data()?;
        pg.run("initdb", &["-D", &data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])?;
        // TCP clients must use TLS: plaintext ones are rejected.
        std::fs::write(
            Path::new(&data).join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )?;
        let (cert, key) = pg.server_certificate()?;
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60 -c ssl=on \
             -c ssl_cert_file={} -c ssl_key_file={}",
            pg.port,
            pg.dir.display(),
            cert.display(),
            key.display()
        );
        let log = pg.dir.join("server.log");
        let log_arg = log.to_string_lossy();
        let started =
            pg.run("pg_ctl", &["-D", &data, "-l", &log_arg, "-o", &options, "-w", "-t", "60", "start"]);
        if let Err(e) = started {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            pg.port = 0; // nothing to stop
            bail!("{e:#}\nserver log:\n{log}");
        }
        Ok(pg)
    }

    /// A URL for database `db` as the superuser, trusting the server's CA;
    /// the registry adds `sslmode=verify-full` itself.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}?sslrootcert={}", self.port, self.ca().display())
    }

    /// The CA (PEM) that signed the server's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Makes a CA ([`Postgres::ca`]) and a server certificate for 127.0.0.1
    /// signed by it; returns the certificate's and key's paths. The key is
    /// the server user's, readable by it alone, as PostgreSQL demands.
    fn server_certificate(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let (ca, issuer) = test_ca("registry test CA")?;
        std::fs::write(self.ca(), ca)?;
        let key = rcgen::KeyPair::generate()?;
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "postgres");
        let cert = params.signed_by(&key, &issuer)?;
        let (cert_path, key_path) = (self.dir.join("server.crt"), self.dir.join("server.key"));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
        if self.run_as.is_some() {
            let (uid, gid) = user_ids("postgres")?;
            for path in [&cert_path, &key_path] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
            }
        }
        Ok((cert_path, key_path))
    }

    fn data(&self) -> anyhow::Result<String> {
        let data = self.dir.join("data");
        Ok(data.to_str().with_context(|| format!("{} is not UTF-8", data.display()))?.to_string())
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = self.bindir.join(program);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out =
            cmd.args(args).current_dir(&self.dir).output().with_context(|| format!("running {cmd:?}"))?;
        if !out.status.success() {
            bail!(
                "{cmd:?} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.port != 0 {
            let stopped = self
                .data()
                .and_then(|data| self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]));
            if let Err(e) = stopped {
                eprintln!("stopping the test PostgreSQL server: {e:#}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed CA named `cn`: its certificate (PEM) and what signs with it.
pub fn test_ca(cn: &str) -> anyhow::Result<(String, rcgen::Issuer<'static, rcgen::KeyPair>)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), rcgen::Issuer::new(params, key)))
}

/// Where `initdb`, `pg_ctl` and `postgres` are.
fn bindir() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("PG_BINDIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let out = Command::new("pg_config").arg("--bindir").output().context(
                "PostgreSQL not found: `pg_config` is not on PATH (install postgresql-15, as .ci/run does, \
                 or set PG_BINDIR)",
            )?;
            if !out.status.success() {
                bail!("`pg_config --bindir` failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    for tool in ["initdb", "pg_ctl", "postgres"] {
        if !Path::new(&dir).join(tool).exists() {
            bail!(
                "PostgreSQL server binaries not found: no {tool} in {} (install postgresql-15)",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// (uid, gid) of a system user, from `id`.
fn user_ids(user: &str) -> anyhow::Result<(u32, u32)> {
    let id = |flag| -> anyhow::Result<u32> {
        let out = Command::new("id").args([flag, user]).output()?;
        if !out.status.success() {
            bail!("no user {user}");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// A loopback port nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
