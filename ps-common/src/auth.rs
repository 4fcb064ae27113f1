//! Who is calling, and what they may do: principals, roles, bearer tokens.
//!
//! A [`Principal`] is one of the agreed identity strings: `admin`, `reader`,
//! `worker:<N>` (N is the worker id the requests carry) or `shard` (a
//! server's own certificate). It reaches a shard in one of two ways:
//!
//! - a **bearer token** in the `authorization` metadata (`Bearer <JWT>`): an
//!   EdDSA (Ed25519) JSON Web Token whose `sub` claim is the principal and
//!   whose `exp` claim is checked. Tokens are made by [`TokenIssuer`], which
//!   holds the private key (the launcher, `ps-cluster token`); shards hold
//!   only the public key ([`TokenVerifier`]), so a shard cannot mint one;
//! - else the **TLS client certificate** the connection presented (mutual
//!   TLS), whose Subject Common Name is the principal.
//!
//! [`Authenticator::principal_of`] reads either from a request; [`authorize`]
//! decides whether a principal may do what an RPC needs ([`Access`]). Shards
//! call both at the top of every handler (`ps_server::service`); clients
//! attach their [`Credential`] to every call (`transport::client`).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};

use crate::{Error, Result};

/// What a principal is allowed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Registers, checkpoints, reads stats; may do everything.
    Admin,
    /// Trains as one worker id: join, pull, push, heartbeat, leave.
    Worker,
    /// Reads without changing anything: read-only pulls, scans, serving.
    Reader,
}

/// One identity (the `sub` claim of a token, the Common Name of a certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Principal {
    Admin,
    Reader,
    Worker(u64),
    /// A shard's own certificate: a server identity, with no role on RPCs.
    Shard,
}

impl Principal {
    /// The principal's role; `None` for a shard, which calls no RPC.
    pub fn role(self) -> Option<Role> {
        match self {
            Principal::Admin => Some(Role::Admin),
            Principal::Reader => Some(Role::Reader),
            Principal::Worker(_) => Some(Role::Worker),
            Principal::Shard => None,
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Admin => f.write_str("admin"),
            Principal::Reader => f.write_str("reader"),
            Principal::Worker(n) => write!(f, "worker:{n}"),
            Principal::Shard => f.write_str("shard"),
        }
    }
}

impl FromStr for Principal {
    type Err = Error;

    fn from_str(s: &str) -> Result<Principal> {
        let bad =
            || Error::Credential(format!("unknown principal {s:?}: admin, reader, worker:<N> or shard"));
        match s {
            "admin" => Ok(Principal::Admin),
            "reader" => Ok(Principal::Reader),
            "shard" => Ok(Principal::Shard),
            _ => {
                let n = s.strip_prefix("worker:").ok_or_else(bad)?;
                // Digits only: no sign, no spaces, no second spelling of one id.
                if n.is_empty()
                    || !n.bytes().all(|b| b.is_ascii_digit())
                    || (n.len() > 1 && n.starts_with('0'))
                {
                    return Err(bad());
                }
                n.parse().map(Principal::Worker).map_err(|_| bad())
            }
        }
    }
}

/// Worker ids at or above this label reads by processes that never join the
/// clock set: `u64::MAX` is the evaluator (`ps_worker::session::EVALUATOR`),
/// `u64::MAX - 1` ps-serve's online reader. A read under such an id is an
/// outside read: it waits for no one and is kept for no one.
pub const OUTSIDE_READERS: u64 = u64::MAX - 1;

/// Whether `worker` is an outside reader's label (see [`OUTSIDE_READERS`]).
pub fn is_outside_reader(worker: u64) -> bool {
    worker >= OUTSIDE_READERS
}

/// What an RPC needs of its caller (the table is `ps_server::service::access`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Admin only: checkpoints (Hold, Cut, Release).
    Admin,
    /// Admin or reader: the monitoring view (Stats).
    Monitor,
    /// Any role: reads that change nothing (ListTables, ScanSparse, outside
    /// reads that create no row).
    Read,
    /// Admin or any worker: table registration (workers register their
    /// job's tables; an identical spec is a no-op and a different one for an
    /// existing name is refused anyway), and a pull that may create rows
    /// without naming a worker.
    AnyWorker,
    /// Admin, or the worker whose id the request names: everything that
    /// changes a worker's state (join, push, seq, clock, lease, leave,
    /// data ranges) or may create rows.
    Member(u64),
}

/// Whether `who` may do what `need` says; PERMISSION_DENIED otherwise.
pub fn authorize(who: Principal, need: Access) -> Result<()> {
    let role = who.role();
    let ok = match need {
        _ if role == Some(Role::Admin) => true,
        Access::Admin => false,
        Access::Monitor => role == Some(Role::Reader),
        Access::Read => role.is_some(),
        Access::AnyWorker => role == Some(Role::Worker),
        Access::Member(id) => who == Principal::Worker(id),
    };
    if ok {
        return Ok(());
    }
    Err(Error::PermissionDenied(match need {
        Access::Member(id) if role == Some(Role::Worker) => format!("{who} may not act as worker {id}"),
        Access::Member(id) => format!("{who} may not act as worker {id} (a worker's own credential may)"),
        Access::Admin => format!("{who} may not do this: admin only"),
        Access::Monitor => format!("{who} may not read stats: admin or reader only"),
        Access::AnyWorker => format!("{who} may not do this: admin or worker only"),
        Access::Read => format!("{who} has no role on this shard"),
    }))
}

// ---------------------------------------------------------------- tokens

/// The claims of a token: who (`sub`), issued at, expires at (seconds since
/// the Unix epoch).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Makes tokens: holds the Ed25519 private key (PKCS#8 PEM).
pub struct TokenIssuer {
    key: EncodingKey,
}

impl TokenIssuer {
    pub fn from_pem(pem: &[u8]) -> Result<TokenIssuer> {
        let key = EncodingKey::from_ed_pem(pem)
            .map_err(|e| Error::Credential(format!("not an Ed25519 private key (PKCS#8 PEM): {e}")))?;
        Ok(TokenIssuer { key })
    }

    pub fn from_file(path: &Path) -> Result<TokenIssuer> {
        TokenIssuer::from_pem(&read_key(path)?)
            .map_err(|e| Error::Credential(format!("{}: {e}", path.display())))
    }

    /// A token for `who`, valid for `ttl` from now.
    pub fn issue(&self, who: Principal, ttl: Duration) -> Result<String> {
        let now = SystemTime::now();
        self.issue_expiring(who, now.checked_add(ttl).unwrap_or(now))
    }

    /// A token for `who` that expires at `exp` (in the past: an expired
    /// token, for tests).
    pub fn issue_expiring(&self, who: Principal, exp: SystemTime) -> Result<String> {
        let claims =
            Claims { sub: who.to_string(), iat: unix(SystemTime::now()).min(unix(exp)), exp: unix(exp) };
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.key)
            .map_err(|e| Error::Credential(format!("signing a token: {e}")))
    }
}

/// Checks tokens: holds the Ed25519 public key (SubjectPublicKeyInfo PEM).
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
    /// Tokens whose signature this key has checked: their principal and
    /// expiry (`exp`), which each use still checks.
    verified: Checked<(Principal, u64)>,
}

/// Clock skew allowed between the issuer and a shard, in seconds.
const LEEWAY_S: u64 = 5;

impl TokenVerifier {
    pub fn from_pem(pem: &[u8]) -> Result<TokenVerifier> {
        let key = DecodingKey::from_ed_pem(pem)
            .map_err(|e| Error::Credential(format!("not an Ed25519 public key (PEM): {e}")))?;
        // EdDSA only: a token cannot pick a weaker algorithm.
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = LEEWAY_S;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(TokenVerifier { key, validation, verified: Checked::default() })
    }

    pub fn from_file(path: &Path) -> Result<TokenVerifier> {
        TokenVerifier::from_pem(&read_key(path)?)
            .map_err(|e| Error::Credential(format!("{}: {e}", path.display())))
    }

    /// The principal a token names, if its signature is this key's and it
    /// has not expired; UNAUTHENTICATED otherwise.
    ///
    /// The signature is checked on a token's first use; later uses of the
    /// same token check only its expiry (see [`Checked`]).
    pub fn verify(&self, token: &str) -> Result<Principal> {
        self.verify_at(token, unix(SystemTime::now()))
    }

    /// The principal of a token whose signature was checked before, if it
    /// has not expired since; `Ok(None)` for a token not seen (or not
    /// passed) before. No signature check.
    fn known(&self, token: &str) -> Result<Option<Principal>> {
        self.known_at(token, unix(SystemTime::now()))
    }

    fn known_at(&self, token: &str, now: u64) -> Result<Option<Principal>> {
        let Some((who, exp)) = self.verified.get(token.as_bytes()) else { return Ok(None) };
        // jsonwebtoken's own test: expired when `exp < now - leeway`.
        if exp < now.saturating_sub(LEEWAY_S) {
            self.verified.remove(token.as_bytes());
            return Err(Error::Unauthenticated(format!("bad token: expired at {exp} (now {now})")));
        }
        Ok(Some(who))
    }

    /// [`TokenVerifier::verify`] at `now` (seconds since the Unix epoch) for
    /// a token already verified; a new one is checked against the clock.
    fn verify_at(&self, token: &str, now: u64) -> Result<Principal> {
        if let Some(who) = self.known_at(token, now)? {
            return Ok(who);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| Error::Unauthenticated(format!("bad token: {e}")))?;
        let who =
            data.claims.sub.parse().map_err(|e: Error| Error::Unauthenticated(format!("bad token: {e}")))?;
        self.verified.insert(token.as_bytes(), (who, data.claims.exp));
        Ok(who)
    }
}

/// Credentials already checked, by their bytes: a connection sends the
/// same token or certificate with every request, and checking it again
/// each time (an Ed25519 verification, about 50 µs; a certificate parse)
/// was 10 to 14% of all cycles of the reference run. Only credentials that
/// passed are kept, and there are few (one per worker, admin and reader
/// identity), so when it holds [`Checked::CAPACITY`] it simply starts over.
struct Checked<V> {
    seen: Mutex<HashMap<Box<[u8]>, V>>,
}

impl<V> Default for Checked<V> {
    fn default() -> Self {
        Checked { seen: Mutex::new(HashMap::new()) }
    }
}

impl<V: Copy> Checked<V> {
    const CAPACITY: usize = 256;

    fn get(&self, key: &[u8]) -> Option<V> {
        self.lock().get(key).copied()
    }

    fn insert(&self, key: &[u8], value: V) {
        let mut seen = self.lock();
        if seen.len() >= Self::CAPACITY {
            seen.clear();
        }
        seen.insert(key.into(), value);
    }

    fn remove(&self, key: &[u8]) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<[u8]>, V>> {
        // The map holds no invariant a panicking holder could break.
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A key file is a few hundred bytes; anything much larger is not one.
const MAX_KEY_FILE: u64 = 16 << 10;

/// Reads a key or token file, refusing one over [`MAX_KEY_FILE`] without
/// reading more than one byte past the limit (it was read whole first, so
/// a path naming a large file or a device allocated its size).
fn read_key(path: &Path) -> Result<Vec<u8>> {
    crate::files::read_capped(path, MAX_KEY_FILE).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => {
            Error::Credential(format!("{}: {e}: is not a key file", path.display()))
        }
        _ => Error::Credential(format!("reading {}: {e}", path.display())),
    })
}

/// A fresh Ed25519 key pair for tokens, as PEM text: the private key
/// (PKCS#8, for issuers only) and the public key (for shards).
pub struct KeyPair {
    pub private_pem: String,
    pub public_pem: String,
}

/// Makes a key pair from the operating system's random source.
pub fn generate_key_pair() -> Result<KeyPair> {
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding};
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| Error::Credential(format!("no randomness for a key: {e}")))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    let private_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| Error::Credential(format!("encoding the private key: {e}")))?
        .to_string();
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| Error::Credential(format!("encoding the public key: {e}")))?;
    Ok(KeyPair { private_pem, public_pem })
}

// ---------------------------------------------------------------- server side

/// How a shard learns who calls: a bearer token (if it has a verifier),
/// else the TLS client certificate of the connection.
pub struct Authenticator {
    tokens: Option<TokenVerifier>,
    /// Client certificates (DER) already read, and the principal each names.
    certificates: Checked<Principal>,
}

impl Authenticator {
    /// With `tokens`, bearer tokens are accepted; without, only client
    /// certificates (mutual TLS) identify callers.
    pub fn new(tokens: Option<TokenVerifier>) -> Authenticator {
        Authenticator { tokens, certificates: Checked::default() }
    }

    /// The caller of `req`: UNAUTHENTICATED when it carries no credential or
    /// a bad one. A token, when present, decides: a bad token is not
    /// overlooked in favour of a certificate.
    pub fn principal_of<T>(&self, req: &tonic::Request<T>) -> Result<Principal> {
        // With `check`, `identify` answers a principal or an error.
        self.identify(req, true)?.ok_or_else(|| Error::Unauthenticated("no credential".into()))
    }

    /// The caller of `req` if its credential was checked before (and, for a
    /// token, has not expired since): a lookup, no signature check or
    /// certificate parse. `Ok(None)` when the credential is new (or
    /// missing); a shard asks [`Authenticator::principal_of`] then, which
    /// costs about 50 µs for a new token.
    pub fn known_principal_of<T>(&self, req: &tonic::Request<T>) -> Result<Option<Principal>> {
        self.identify(req, false)
    }

    /// The caller of `req`; with `check` false, only from credentials
    /// checked before (`Ok(None)` for a new or missing one).
    fn identify<T>(&self, req: &tonic::Request<T>, check: bool) -> Result<Option<Principal>> {
        if let Some(token) = bearer(req.metadata())? {
            let tokens = self.tokens.as_ref().ok_or_else(|| {
                Error::Unauthenticated("this shard accepts no bearer tokens (no token key)".into())
            })?;
            return if check { tokens.verify(token).map(Some) } else { tokens.known(token) };
        }
        let none =
            || Error::Unauthenticated("no credential: send a bearer token or a client certificate".into());
        // On the data plane the shard's own connection task puts the peer in
        // the request's extensions ([`crate::dataplane::Peer`]); a client cannot.
        if let Some(peer) = req.extensions().get::<crate::dataplane::Peer>() {
            return self.certificate(peer.certificate.as_deref().ok_or_else(none)?, check);
        }
        let certs = req.peer_certs().ok_or_else(none)?;
        self.certificate(certs.first().ok_or_else(none)?, check)
    }

    /// The principal of a client certificate (DER) the TLS handshake
    /// verified against the shard's client CA before the request existed;
    /// with `check` false, only if it was read before.
    fn certificate(&self, der: &[u8], check: bool) -> Result<Option<Principal>> {
        if let Some(who) = self.certificates.get(der) {
            return Ok(Some(who));
        }
        if !check {
            return Ok(None);
        }
        let who = principal_from_cert(der)?;
        self.certificates.insert(der, who);
        Ok(Some(who))
    }
}

/// The token of an `authorization: Bearer <token>` entry, if any.
fn bearer(metadata: &MetadataMap) -> Result<Option<&str>> {
    let Some(value) = metadata.get("authorization") else { return Ok(None) };
    let text = value
        .to_str()
        .map_err(|_| Error::Unauthenticated("the authorization metadata is not ASCII".into()))?;
    let token = text
        .strip_prefix("Bearer ")
        .ok_or_else(|| Error::Unauthenticated("the authorization metadata is not `Bearer <token>`".into()))?;
    Ok(Some(token.trim()))
}

/// The principal a certificate (DER) names in its Subject Common Name.
pub fn principal_from_cert(der: &[u8]) -> Result<Principal> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Unauthenticated(format!("unreadable client certificate: {e}")))?;
    let mut names = cert.subject().iter_common_name();
    let cn = names
        .next()
        .ok_or_else(|| Error::Unauthenticated("the client certificate has no Common Name".into()))?;
    if names.next().is_some() {
        return Err(Error::Unauthenticated("the client certificate has more than one Common Name".into()));
    }
    let cn = cn.as_str().map_err(|e| {
        Error::Unauthenticated(format!("the client certificate's Common Name is not text: {e}"))
    })?;
    cn.parse().map_err(|e: Error| Error::Unauthenticated(format!("client certificate: {e}")))
}

// ---------------------------------------------------------------- client side

/// What a client attaches to every call: a bearer token, or nothing (no
/// auth, or a client certificate, which the TLS channel presents). Its
/// `Debug` never shows the token.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credential {
    header: Option<AsciiMetadataValue>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.header.is_some() { "Credential(bearer token)" } else { "Credential(none)" })
    }
}

/// The environment variable that names a process's token file.
pub const TOKEN_FILE_ENV: &str = "PS_TOKEN_FILE";

impl Credential {
    /// No credential.
    pub fn none() -> Credential {
        Credential::default()
    }

    /// A bearer token (as `ps-cluster token` prints it).
    pub fn bearer(token: &str) -> Result<Credential> {
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::Credential("empty token".into()));
        }
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Credential("a token must be printable ASCII".into()))?;
        Ok(Credential { header: Some(header) })
    }

    /// The token in the file at `path`.
    pub fn from_token_file(path: &Path) -> Result<Credential> {
        let text = read_key(path)?;
        let text = std::str::from_utf8(&text)
            .map_err(|_| Error::Credential(format!("{}: not text", path.display())))?;
        Credential::bearer(text).map_err(|e| Error::Credential(format!("{}: {e}", path.display())))
    }

    /// The token file `path`, if given, else none.
    pub fn from_optional_file(path: Option<&Path>) -> Result<Credential> {
        path.map_or(Ok(Credential::none()), Credential::from_token_file)
    }

    pub fn is_none(&self) -> bool {
        self.header.is_none()
    }

    /// The bearer token's text, if any (a data-plane hello carries it).
    pub fn token(&self) -> Option<&str> {
        let header = self.header.as_ref()?.to_str().ok()?;
        header.strip_prefix("Bearer ")
    }

    /// Puts this credential in `metadata`, as every gRPC call carries it.
    pub fn attach(&self, metadata: &mut tonic::metadata::MetadataMap) {
        if let Some(h) = &self.header {
            metadata.insert("authorization", h.clone());
        }
    }
}

impl tonic::service::Interceptor for Credential {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        self.attach(req.metadata_mut());
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn keys() -> (TokenIssuer, TokenVerifier) {
        let pair = generate_key_pair().unwrap();
        (
            TokenIssuer::from_pem(pair.private_pem.as_bytes()).unwrap(),
            TokenVerifier::from_pem(pair.public_pem.as_bytes()).unwrap(),
        )
    }

    fn request_with(cred: &Credential) -> tonic::Request<()> {
        use tonic::service::Interceptor;
        cred.clone().call(tonic::Request::new(())).unwrap()
    }

    #[test]
    fn principals_round_trip_and_odd_spellings_are_refused() {
        for p in [
            Principal::Admin,
            Principal::Reader,
            Principal::Shard,
            Principal::Worker(0),
            Principal::Worker(u64::MAX),
        ] {
            assert_eq!(p.to_string().parse::<Principal>().unwrap(), p);
        }
        for bad in [
            "",
            "Admin",
            "worker",
            "worker:",
            "worker:-1",
            "worker:+1",
            "worker:01",
            "worker: 1",
            "worker:18446744073709551616",
            "root",
        ] {
            assert!(bad.parse::<Principal>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn roles_allow_what_the_table_says() {
        use Access::*;
        let w3 = Principal::Worker(3);
        let cases = [
            (Principal::Admin, [Admin, Monitor, Read, AnyWorker, Member(7)], [true, true, true, true, true]),
            (
                Principal::Reader,
                [Admin, Monitor, Read, AnyWorker, Member(7)],
                [false, true, true, false, false],
            ),
            (w3, [Admin, Monitor, Read, AnyWorker, Member(7)], [false, false, true, true, false]),
            (Principal::Shard, [Admin, Monitor, Read, AnyWorker, Member(7)], [false; 5]),
        ];
        for (who, needs, allowed) in cases {
            for (need, ok) in needs.into_iter().zip(allowed) {
                assert_eq!(authorize(who, need).is_ok(), ok, "{who} {need:?}");
            }
        }
        assert!(authorize(w3, Member(3)).is_ok());
        assert!(
            matches!(authorize(w3, Member(4)), Err(Error::PermissionDenied(m)) if m.contains("worker 4"))
        );
    }

    #[test]
    fn tokens_verify_only_with_their_key_and_before_they_expire() {
        let (issuer, verifier) = keys();
        let token = issuer.issue(Principal::Worker(3), Duration::from_secs(60)).unwrap();
        assert_eq!(verifier.verify(&token).unwrap(), Principal::Worker(3));

        let expired =
            issuer.issue_expiring(Principal::Admin, SystemTime::now() - Duration::from_secs(60)).unwrap();
        assert!(matches!(verifier.verify(&expired), Err(Error::Unauthenticated(m)) if m.contains("xpired")));

        let (_, other) = keys();
        assert!(matches!(other.verify(&token), Err(Error::Unauthenticated(_))));

        // A token whose payload was changed (worker 3 -> admin) fails its signature.
        let parts: Vec<&str> = token.split('.').collect();
        let forged_claims = Claims { sub: "admin".into(), iat: 0, exp: u64::MAX / 2 };
        let payload = {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::to_vec(&forged_claims).unwrap())
        };
        let forged = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert!(verifier.verify(&forged).is_err());
        for junk in ["", "a.b.c", "not a token"] {
            assert!(matches!(verifier.verify(junk), Err(Error::Unauthenticated(_))), "{junk:?}");
        }
    }

    #[test]
    fn a_verified_token_is_kept_but_still_expires() {
        let (issuer, verifier) = keys();
        let exp = SystemTime::now() + Duration::from_secs(60);
        let token = issuer.issue_expiring(Principal::Worker(2), exp).unwrap();
        let now = unix(SystemTime::now());
        assert_eq!(verifier.verify_at(&token, now).unwrap(), Principal::Worker(2));
        assert_eq!(verifier.verified.len(), 1);
        // A later use is answered from what was kept, until `exp` + leeway.
        let exp = unix(exp);
        assert_eq!(verifier.verify_at(&token, exp + LEEWAY_S).unwrap(), Principal::Worker(2));
        let late = verifier.verify_at(&token, exp + LEEWAY_S + 1);
        assert!(matches!(&late, Err(Error::Unauthenticated(m)) if m.contains("xpired")), "{late:?}");
        assert_eq!(verifier.verified.len(), 0);
        // Refused tokens are not kept, and neither is another key's token.
        let (other_issuer, _) = keys();
        let foreign = other_issuer.issue(Principal::Admin, Duration::from_secs(60)).unwrap();
        assert!(verifier.verify(&foreign).is_err());
        assert!(verifier.verify("a.b.c").is_err());
        assert_eq!(verifier.verified.len(), 0);
    }

    #[test]
    fn what_is_kept_stays_bounded() {
        let (issuer, verifier) = keys();
        let n = Checked::<(Principal, u64)>::CAPACITY + 10;
        for i in 0..n {
            let token = issuer.issue(Principal::Worker(i as u64), Duration::from_secs(60)).unwrap();
            assert_eq!(verifier.verify(&token).unwrap(), Principal::Worker(i as u64));
            assert!(verifier.verified.len() <= Checked::<(Principal, u64)>::CAPACITY);
        }
    }

    #[test]
    fn a_token_naming_an_unknown_principal_is_refused() {
        let (issuer, verifier) = keys();
        let claims = Claims { sub: "root".into(), iat: 0, exp: unix(SystemTime::now()) + 60 };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &issuer.key).unwrap();
        assert!(matches!(verifier.verify(&token), Err(Error::Unauthenticated(m)) if m.contains("root")));
    }

    #[test]
    fn the_authenticator_reads_the_bearer_token_and_refuses_its_absence() {
        let (issuer, verifier) = keys();
        let auth = Authenticator::new(Some(verifier));
        let cred =
            Credential::bearer(&issuer.issue(Principal::Reader, Duration::from_secs(60)).unwrap()).unwrap();
        assert_eq!(auth.principal_of(&request_with(&cred)).unwrap(), Principal::Reader);
        assert!(matches!(
            auth.principal_of(&request_with(&Credential::none())),
            Err(Error::Unauthenticated(_))
        ));
        let mut req = tonic::Request::new(());
        req.metadata_mut().insert("authorization", "Basic abc".parse().unwrap());
        assert!(matches!(auth.principal_of(&req), Err(Error::Unauthenticated(_))));
        // A shard without a token key refuses tokens rather than ignoring them.
        assert!(matches!(
            Authenticator::new(None).principal_of(&request_with(&cred)),
            Err(Error::Unauthenticated(_))
        ));
        assert_eq!(format!("{cred:?}"), "Credential(bearer token)");
    }

    #[test]
    fn a_certificate_names_its_principal_in_the_common_name() {
        let cert = |cn: Option<&str>| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            if let Some(cn) = cn {
                params.distinguished_name.push(rcgen::DnType::CommonName, cn);
            }
            params.distinguished_name.push(rcgen::DnType::OrganizationName, "ps");
            params.self_signed(&key).unwrap().der().to_vec()
        };
        assert_eq!(principal_from_cert(&cert(Some("worker:3"))).unwrap(), Principal::Worker(3));
        assert_eq!(principal_from_cert(&cert(Some("admin"))).unwrap(), Principal::Admin);
        assert_eq!(principal_from_cert(&cert(Some("shard"))).unwrap(), Principal::Shard);
        assert!(matches!(principal_from_cert(&cert(Some("worker:x"))), Err(Error::Unauthenticated(_))));
        assert!(matches!(principal_from_cert(&cert(None)), Err(Error::Unauthenticated(_))));
        assert!(matches!(principal_from_cert(b"not a certificate"), Err(Error::Unauthenticated(_))));

        // Through the authenticator, as the data plane hands it over: read
        // once, then answered from what was kept; unreadable ones are not kept.
        let auth = Authenticator::new(None);
        let peer = |der: Option<Vec<u8>>| {
            let mut req = tonic::Request::new(());
            let addr = "127.0.0.1:1".parse().unwrap();
            req.extensions_mut().insert(crate::dataplane::Peer { addr, certificate: der.map(Arc::new) });
            req
        };
        let w5 = cert(Some("worker:5"));
        for _ in 0..2 {
            assert_eq!(auth.principal_of(&peer(Some(w5.clone()))).unwrap(), Principal::Worker(5));
        }
        assert_eq!(auth.certificates.len(), 1);
        assert!(matches!(auth.principal_of(&peer(Some(cert(None)))), Err(Error::Unauthenticated(_))));
        assert!(
            matches!(auth.principal_of(&peer(None)), Err(Error::Unauthenticated(m)) if m.contains("no credential"))
        );
        assert_eq!(auth.certificates.len(), 1);
    }

    #[test]
    fn key_files_and_token_files_are_read_with_clear_errors() {
        let dir = std::env::temp_dir().join(format!("ps-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pair = generate_key_pair().unwrap();
        let (private, public) = (dir.join("k"), dir.join("k.pub"));
        std::fs::write(&private, &pair.private_pem).unwrap();
        std::fs::write(&public, &pair.public_pem).unwrap();
        let issuer = TokenIssuer::from_file(&private).unwrap();
        let verifier = TokenVerifier::from_file(&public).unwrap();
        // The halves are not interchangeable.
        assert!(TokenIssuer::from_file(&public).is_err());
        assert!(TokenVerifier::from_file(&private).is_err());
        assert!(TokenVerifier::from_file(&dir.join("missing")).is_err());
        let token_file = dir.join("t");
        std::fs::write(
            &token_file,
            issuer.issue(Principal::Worker(1), Duration::from_secs(60)).unwrap() + "\n",
        )
        .unwrap();
        let cred = Credential::from_token_file(&token_file).unwrap();
        let auth = Authenticator::new(Some(verifier));
        assert_eq!(auth.principal_of(&request_with(&cred)).unwrap(), Principal::Worker(1));
        std::fs::write(&token_file, "").unwrap();
        assert!(Credential::from_token_file(&token_file).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A key or token file far over the limit (an 8 GiB sparse file, and a
    /// device that never ends) is refused without being read whole: it
    /// was read into memory before its size was checked.
    #[test]
    fn huge_key_and_token_files_are_refused_without_reading_them() {
        let dir = std::env::temp_dir().join(format!("ps-auth-huge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let huge = dir.join("huge");
        std::fs::File::create(&huge).unwrap().set_len(8 << 30).unwrap();
        let mut paths = vec![huge];
        if Path::new("/dev/zero").exists() {
            paths.push("/dev/zero".into());
        }
        for path in &paths {
            for err in [
                Credential::from_token_file(path).err(),
                TokenVerifier::from_file(path).err(),
                TokenIssuer::from_file(path).err(),
            ] {
                let err = err.expect("a huge file is refused").to_string();
                assert!(err.contains("is not a key file"), "{}: {err}", path.display());
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
