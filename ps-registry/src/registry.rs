//! [`Registry`]: model versions, labels and their audit history in SQL, one
//! code path for SQLite and PostgreSQL (sqlx's `Any` driver, queries checked
//! at run time).
//!
//! Two things differ between the backends, both in [`Backend`]: how a write
//! transaction begins and how it locks the row it reads before writing.
//! SQLite has one writer at a time; `BEGIN IMMEDIATE` takes the write lock at
//! the start (waiting up to the busy timeout for the current writer), so a
//! transaction never fails upgrading a read lock. PostgreSQL runs writers
//! concurrently; a transaction locks the one row it is about to change (`FOR
//! NO KEY UPDATE`), so moves of one label, or registrations of one model,
//! queue behind each other and each reads what the previous one committed.

use ps_common::seal::KeyPaths;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{Any, AnyPool, Executor as _, Row as _, Transaction};

use crate::error::{Error, Result};
use crate::store::{Artifact, ArtifactStore};

/// The database behind a registry URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://PATH`: an embedded file, no server.
    Sqlite,
    /// `postgres://...` or `postgresql://...`: a server shared by many hosts.
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Result<Backend> {
        match url.split_once(':').map(|(scheme, _)| scheme) {
            Some("sqlite") => Ok(Backend::Sqlite),
            Some("postgres" | "postgresql") => Ok(Backend::Postgres),
            _ => Err(Error::Url(url.into())),
        }
    }

    /// The clause that locks a row read before it is written. SQLite's
    /// write transactions are already serial (and it has no such clause);
    /// `NO KEY` because keys never change, so foreign-key checks of other
    /// transactions (which take `KEY SHARE`) need not wait.
    fn lock(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR NO KEY UPDATE",
        }
    }
}

/// How long a SQLite writer waits for another before it reports the
/// database busy.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 60_000;

/// The registry's schema, compiled into the binary (`migrations/`): version,
/// name, SQL.
const MIGRATIONS: [(i64, &str, &str); 2] = [
    (1, "registry", include_str!("../migrations/0001_registry.sql")),
    (2, "method", include_str!("../migrations/0002_method.sql")),
];

/// [`MIGRATIONS`] as sqlx's migrator takes them.
#[derive(Debug)]
struct Migrations;

impl<'s> MigrationSource<'s> for Migrations {
    fn resolve(self) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 's>> {
        Box::pin(async move {
            Ok(MIGRATIONS
                .into_iter()
                .map(|(v, name, sql)| {
                    Migration::new(v, name.into(), MigrationType::Simple, sql.into(), false)
                })
                .collect())
        })
    }
}

/// What a run leaves besides its model: where it came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lineage {
    /// The run file (TOML) that trained the model.
    pub run_config: Option<String>,
    /// Data file -> sha256 of its contents.
    pub data_checksums: BTreeMap<String, String>,
    /// The run folder the model came from.
    pub source_run: Option<String>,
    /// The checkpoint the model came from (path or id).
    pub checkpoint: Option<String>,
    /// The version this one was fine-tuned or compressed from (same model).
    pub parent_version: Option<i64>,
    /// How it was made from its parent (e.g. `int8`: post-training
    /// quantization).
    pub method: Option<String>,
}

/// A version to register.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub model: String,
    /// The model file's bytes (`ps_model::SavedModel`); checked before storing.
    pub artifact: Vec<u8>,
    /// Name -> value; values that are not finite (JSON has no NaN) are dropped.
    pub metrics: BTreeMap<String, f64>,
    pub lineage: Lineage,
    pub created_by: String,
}

/// A registered version.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelVersion {
    pub model: String,
    pub version: i64,
    pub artifact: Artifact,
    pub metrics: BTreeMap<String, f64>,
    pub lineage: Lineage,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub created_by: String,
}

/// Where a label points now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub model: String,
    pub label: String,
    pub version: i64,
    /// How many moves its history holds.
    pub moves: i64,
}

/// One entry of a label's audit history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMove {
    pub model: String,
    pub label: String,
    /// 1, 2, ... per label, in the order the moves committed.
    pub seq: i64,
    /// `promote` or `rollback`.
    pub action: String,
    /// `None` on the label's first move.
    pub from_version: Option<i64>,
    pub to_version: i64,
    pub moved_at: String,
    pub moved_by: String,
}

/// A version whose artifact is stored and whose row is written but not yet
/// committed: invisible to everyone else until [`Pending::commit`]. Dropping
/// it (or the process dying) rolls the row back; the artifact stays, harmless
/// and reused by the next registration of the same bytes.
pub struct Pending {
    tx: Transaction<'static, Any>,
    version: ModelVersion,
}

impl Pending {
    pub fn version(&self) -> &ModelVersion {
        &self.version
    }

    pub async fn commit(self) -> Result<ModelVersion> {
        self.tx.commit().await?;
        Ok(self.version)
    }
}

/// A model registry: a database and an artifact folder.
pub struct Registry {
    pool: AnyPool,
    backend: Backend,
    store: ArtifactStore,
}

const VERSION_COLUMNS: &str = "model, version, sha256, size_bytes, metrics, run_config, data_checksums, \
     source_run, checkpoint, parent_version, created_at, created_by, method";
const MOVE_COLUMNS: &str = "model, label, seq, action, from_version, to_version, moved_at, moved_by";

impl Registry {
    /// Connects to the database at `url` (a SQLite file is created if
    /// missing), brings its schema up to date, and keeps artifacts under
    /// `root/artifacts/`.
    pub async fn open(url: &str, root: &Path) -> Result<Registry> {
        Registry::open_with(url, root, None).await
    }

    /// [`Registry::open`] with the keys that seal and check its artifacts:
    /// `None` for the default, the registry's own `root/keys/` (made, with
    /// a signing and a verify key, when a new registry is opened; a registry
    /// that already holds artifacts but no keys stays unsigned); `Some` for
    /// those key files (`Some(KeyPaths::default())`: unsigned).
    pub async fn open_with(url: &str, root: &Path, keys: Option<KeyPaths>) -> Result<Registry> {
        let paths = match keys {
            Some(k) => k,
            None => default_keys(root)?,
        };
        let keys =
            paths.load().map_err(|e| Error::Keys { path: root.join("keys"), reason: e.to_string() })?;
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url)?;
        let url = match backend {
            Backend::Sqlite => sqlite_url(url)?,
            Backend::Postgres => postgres_url(url),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(60))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        let pragmas = format!(
                            "PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}; PRAGMA foreign_keys = ON"
                        );
                        conn.execute(pragmas.as_str()).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        // SQLite answers BUSY at once, without waiting out the busy timeout,
        // where waiting could deadlock: a connection that read the file and
        // now wants to write while another writes (switching to WAL, a
        // migration's first statement). Opening retries those until
        // `SQLITE_BUSY_TIMEOUT_MS` has passed.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS.into());
        if backend == Backend::Sqlite {
            // Readers then never wait for the writer (persistent in the file).
            while let Err(e) = pool.execute("PRAGMA journal_mode = WAL").await {
                if !is_busy(&e) || tokio::time::Instant::now() >= deadline {
                    return Err(e.into());
                }
                busy_pause().await;
            }
        }
        let migrator = Migrator::new(Migrations).await?;
        // PostgreSQL's migrator takes an advisory lock; SQLite's takes none,
        // but applies each migration and its bookkeeping in one transaction.
        // So of processes migrating a file at once, one fails (the table or
        // column exists) whenever another has committed a migration first.
        // Each such failure means another migration committed, so after one
        // try per migration the schema is applied; BUSY answers do not count.
        let mut tries = 0;
        while let Err(e) = migrator.run(&pool).await {
            let busy = match &e {
                MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => is_busy(e),
                _ => false,
            };
            if busy && tokio::time::Instant::now() < deadline {
                busy_pause().await;
                continue;
            }
            tries += 1;
            if backend == Backend::Postgres || tries > MIGRATIONS.len() {
                return Err(e.into());
            }
        }
        Ok(Registry { pool, backend, store: ArtifactStore::new(root).with_keys(keys) })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn store(&self) -> &ArtifactStore {
        &self.store
    }

    /// Closes the database connections.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Registers a version: [`Registry::prepare`], then commit.
    pub async fn register(&self, new: NewVersion) -> Result<ModelVersion> {
        self.prepare(new).await?.commit().await
    }

    /// Checks the model file, stores it durably, then writes the version row
    /// in a transaction left open: the artifact is on disk before the row can
    /// commit, and the version number is the model's next one.
    pub async fn prepare(&self, new: NewVersion) -> Result<Pending> {
        check_model_name(&new.model)?;
        check_text("created_by", &new.created_by)?;
        ps_model::SavedModel::from_bytes(&new.artifact)?;
        let mut new = new;
        new.metrics.retain(|_, v| v.is_finite());
        let artifact = self.store.put(&new.artifact)?;
        let now = now();

        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO models (name, next_version, created_at, created_by) VALUES ($1, 1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(new.model.as_str())
        .bind(now.as_str())
        .bind(new.created_by.as_str())
        .execute(&mut *tx)
        .await?;
        let sql = format!("SELECT next_version FROM models WHERE name = $1{}", self.backend.lock());
        let version: i64 = sqlx::query_scalar(&sql).bind(new.model.as_str()).fetch_one(&mut *tx).await?;
        if let Some(parent) = new.lineage.parent_version {
            require_version(&mut tx, &new.model, parent).await?;
        }
        sqlx::query("UPDATE models SET next_version = $2 WHERE name = $1")
            .bind(new.model.as_str())
            .bind(version + 1)
            .execute(&mut *tx)
            .await?;
        let l = &new.lineage;
        sqlx::query(&format!(
            "INSERT INTO versions ({VERSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ))
        .bind(new.model.as_str())
        .bind(version)
        .bind(artifact.sha256.as_str())
        .bind(i64::try_from(artifact.size).unwrap_or(i64::MAX))
        .bind(to_json(&new.metrics))
        .bind(l.run_config.clone())
        .bind(to_json(&l.data_checksums))
        .bind(l.source_run.clone())
        .bind(l.checkpoint.clone())
        .bind(l.parent_version)
        .bind(now.as_str())
        .bind(new.created_by.as_str())
        .bind(l.method.clone())
        .execute(&mut *tx)
        .await?;
        let version = ModelVersion {
            model: new.model,
            version,
            artifact,
            metrics: new.metrics,
            lineage: new.lineage,
            created_at: now,
            created_by: new.created_by,
        };
        Ok(Pending { tx, version })
    }

    /// Registered model names, sorted.
    pub async fn models(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT name FROM models ORDER BY name").fetch_all(&self.pool).await?)
    }

    /// Every version of `model` (or of every model), oldest first.
    pub async fn versions(&self, model: Option<&str>) -> Result<Vec<ModelVersion>> {
        let rows = match model {
            Some(m) => {
                let sql = format!("SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 ORDER BY version");
                sqlx::query(&sql).bind(m).fetch_all(&self.pool).await?
            }
            None => {
                let sql = format!("SELECT {VERSION_COLUMNS} FROM versions ORDER BY model, version");
                sqlx::query(&sql).fetch_all(&self.pool).await?
            }
        };
        rows.iter().map(version_from_row).collect()
    }

    /// One version.
    pub async fn version(&self, model: &str, version: i64) -> Result<ModelVersion> {
        let sql = format!("SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 AND version = $2");
        match sqlx::query(&sql).bind(model).bind(version).fetch_optional(&self.pool).await? {
            Some(row) => version_from_row(&row),
            None => Err(self.not_found(model, version).await),
        }
    }

    /// The newest version of `model`.
    pub async fn latest(&self, model: &str) -> Result<ModelVersion> {
        let sql =
            format!("SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 ORDER BY version DESC LIMIT 1");
        match sqlx::query(&sql).bind(model).fetch_optional(&self.pool).await? {
            Some(row) => version_from_row(&row),
            None => Err(Error::NoModel(model.into())),
        }
    }

    /// The labels of `model` (or of every model), by name.
    pub async fn labels(&self, model: Option<&str>) -> Result<Vec<Label>> {
        let rows = match model {
            Some(m) => {
                sqlx::query("SELECT model, label, version, moves FROM labels WHERE model = $1 ORDER BY label")
                    .bind(m)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT model, label, version, moves FROM labels ORDER BY model, label")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter()
            .map(|r| {
                Ok(Label {
                    model: r.try_get("model")?,
                    label: r.try_get("label")?,
                    version: r.try_get("version")?,
                    moves: r.try_get("moves")?,
                })
            })
            .collect()
    }

    /// The version `label` of `model` points to.
    pub async fn label(&self, model: &str, label: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT version FROM labels WHERE model = $1 AND label = $2")
            .bind(model)
            .bind(label)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NoLabel { model: model.into(), label: label.into() })
    }

    /// The audit history of `model`'s labels (or of one label), in order.
    pub async fn history(&self, model: &str, label: Option<&str>) -> Result<Vec<LabelMove>> {
        let rows = match label {
            Some(l) => {
                let sql = format!(
                    "SELECT {MOVE_COLUMNS} FROM label_moves WHERE model = $1 AND label = $2 ORDER BY seq"
                );
                sqlx::query(&sql).bind(model).bind(l).fetch_all(&self.pool).await?
            }
            None => {
                let sql =
                    format!("SELECT {MOVE_COLUMNS} FROM label_moves WHERE model = $1 ORDER BY label, seq");
                sqlx::query(&sql).bind(model).fetch_all(&self.pool).await?
            }
        };
        rows.iter().map(move_from_row).collect()
    }

    /// Points `label` of `model` at `version`, in one transaction that also
    /// appends the move to the label's history.
    pub async fn promote(&self, model: &str, version: i64, label: &str, by: &str) -> Result<LabelMove> {
        check_label(label)?;
        check_text("moved_by", by)?;
        let mut tx = self.begin_write().await?;
        require_version(&mut tx, model, version).await?;
        // Create the label row if this is its first move, then lock it.
        sqlx::query(
            "INSERT INTO labels (model, label, version, moves) VALUES ($1, $2, $3, 0) \
             ON CONFLICT (model, label) DO NOTHING",
        )
        .bind(model)
        .bind(label)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        let locked = self.lock_label(&mut tx, model, label).await?;
        // The row exists: inserted above, or before.
        let (current, moves) =
            locked.ok_or_else(|| Error::NoLabel { model: model.into(), label: label.into() })?;
        let from = (moves > 0).then_some(current);
        let m = record_move(&mut tx, model, label, moves + 1, "promote", from, version, by).await?;
        tx.commit().await?;
        Ok(m)
    }

    /// Moves `label` of `model` back to the version it pointed to before its
    /// last move, as a new entry of its history (so a second rollback undoes
    /// the first).
    pub async fn rollback(&self, model: &str, label: &str, by: &str) -> Result<LabelMove> {
        check_text("moved_by", by)?;
        let mut tx = self.begin_write().await?;
        let Some((current, moves)) = self.lock_label(&mut tx, model, label).await? else {
            return Err(Error::NoLabel { model: model.into(), label: label.into() });
        };
        let previous: Option<i64> = sqlx::query_scalar(
            "SELECT from_version FROM label_moves WHERE model = $1 AND label = $2 AND seq = $3",
        )
        .bind(model)
        .bind(label)
        .bind(moves)
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
        let Some(target) = previous else {
            return Err(Error::NoHistory { model: model.into(), label: label.into() });
        };
        let m = record_move(&mut tx, model, label, moves + 1, "rollback", Some(current), target, by).await?;
        tx.commit().await?;
        Ok(m)
    }

    /// The artifact of `v`, its length and hash checked; a missing or altered
    /// file is an [`Error::Artifact`].
    pub fn artifact(&self, v: &ModelVersion) -> Result<Vec<u8>> {
        self.store.get(&v.artifact).map_err(|fault| Error::Artifact {
            model: v.model.clone(),
            version: v.version,
            path: self.artifact_path(v),
            fault,
        })
    }

    /// The model of `v`, from its checked artifact.
    pub fn load(&self, v: &ModelVersion) -> Result<ps_model::SavedModel> {
        Ok(ps_model::SavedModel::from_bytes(&self.artifact(v)?)?)
    }

    pub fn artifact_path(&self, v: &ModelVersion) -> PathBuf {
        self.store.path(&v.artifact.sha256)
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// Reads (and on PostgreSQL locks) a label row: (version, moves).
    async fn lock_label(
        &self,
        tx: &mut Transaction<'static, Any>,
        model: &str,
        label: &str,
    ) -> Result<Option<(i64, i64)>> {
        let sql = format!(
            "SELECT version, moves FROM labels WHERE model = $1 AND label = $2{}",
            self.backend.lock()
        );
        let row = sqlx::query(&sql).bind(model).bind(label).fetch_optional(&mut **tx).await?;
        row.map(|r| Ok((r.try_get("version")?, r.try_get("moves")?))).transpose()
    }

    /// NoVersion if the model exists, NoModel if not.
    async fn not_found(&self, model: &str, version: i64) -> Error {
        let known = sqlx::query_scalar::<_, String>("SELECT name FROM models WHERE name = $1")
            .bind(model)
            .fetch_optional(&self.pool)
            .await;
        match known {
            Ok(None) => Error::NoModel(model.into()),
            Ok(Some(_)) => Error::NoVersion { model: model.into(), version },
            Err(e) => e.into(),
        }
    }
}

async fn require_version(tx: &mut Transaction<'static, Any>, model: &str, version: i64) -> Result<()> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT version FROM versions WHERE model = $1 AND version = $2")
            .bind(model)
            .bind(version)
            .fetch_optional(&mut **tx)
            .await?;
    found.map(|_| ()).ok_or_else(|| Error::NoVersion { model: model.into(), version })
}

/// Points the (locked) label at `to` and appends move `seq` to its history.
#[allow(clippy::too_many_arguments)]
async fn record_move(
    tx: &mut Transaction<'static, Any>,
    model: &str,
    label: &str,
    seq: i64,
    action: &str,
    from: Option<i64>,
    to: i64,
    by: &str,
) -> Result<LabelMove> {
    let now = now();
    sqlx::query("UPDATE labels SET version = $3, moves = $4 WHERE model = $1 AND label = $2")
        .bind(model)
        .bind(label)
        .bind(to)
        .bind(seq)
        .execute(&mut **tx)
        .await?;
    sqlx::query(&format!("INSERT INTO label_moves ({MOVE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"))
        .bind(model)
        .bind(label)
        .bind(seq)
        .bind(action)
        .bind(from)
        .bind(to)
        .bind(now.as_str())
        .bind(by)
        .execute(&mut **tx)
        .await?;
    Ok(LabelMove {
        model: model.into(),
        label: label.into(),
        seq,
        action: action.into(),
        from_version: from,
        to_version: to,
        moved_at: now,
        moved_by: by.into(),
    })
}

fn version_from_row(r: &AnyRow) -> Result<ModelVersion> {
    let model: String = r.try_get("model")?;
    let version: i64 = r.try_get("version")?;
    let bad = |column, reason: String| Error::Row { model: model.clone(), version, column, reason };
    let size: i64 = r.try_get("size_bytes")?;
    let metrics: String = r.try_get("metrics")?;
    let checksums: String = r.try_get("data_checksums")?;
    Ok(ModelVersion {
        artifact: Artifact {
            sha256: r.try_get("sha256")?,
            size: u64::try_from(size).map_err(|_| bad("size_bytes", format!("{size}")))?,
        },
        metrics: serde_json::from_str(&metrics).map_err(|e| bad("metrics", e.to_string()))?,
        lineage: Lineage {
            run_config: r.try_get("run_config")?,
            data_checksums: serde_json::from_str(&checksums)
                .map_err(|e| bad("data_checksums", e.to_string()))?,
            source_run: r.try_get("source_run")?,
            checkpoint: r.try_get("checkpoint")?,
            parent_version: r.try_get("parent_version")?,
            method: r.try_get("method")?,
        },
        created_at: r.try_get("created_at")?,
        created_by: r.try_get("created_by")?,
        model,
        version,
    })
}

fn move_from_row(r: &AnyRow) -> Result<LabelMove> {
    Ok(LabelMove {
        model: r.try_get("model")?,
        label: r.try_get("label")?,
        seq: r.try_get("seq")?,
        action: r.try_get("action")?,
        from_version: r.try_get("from_version")?,
        to_version: r.try_get("to_version")?,
        moved_at: r.try_get("moved_at")?,
        moved_by: r.try_get("moved_by")?,
    })
}

fn to_json<V: serde::Serialize>(map: &BTreeMap<String, V>) -> String {
    serde_json::to_string(map).unwrap_or_else(|_| "{}".into())
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Whether `e` is SQLite's BUSY or LOCKED (primary result codes 5 and 6,
/// extended codes included): another connection holds the lock now.
fn is_busy(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else { return false };
    db.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|c| matches!(c & 0xff, 5 | 6))
}

/// A short pause before trying a busy SQLite file again, 5-20 ms so that
/// openers racing each other fall out of step.
async fn busy_pause() {
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() % 15);
    tokio::time::sleep(Duration::from_millis(5 + u64::from(jitter))).await;
}

/// A PostgreSQL URL that, unless it names an `sslmode`, connects over TLS
/// and checks the server's certificate and name (`sslmode=verify-full`;
/// PostgreSQL's own default, `prefer`, falls back to plaintext and checks
/// nothing). The server's CA comes from `sslrootcert=PATH`, else the Mozilla
/// roots; `sslcert=`/`sslkey=` add a client certificate. Plaintext only
/// when asked for: `sslmode=disable`.
fn postgres_url(url: &str) -> String {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    if query.split('&').any(|kv| kv.starts_with("sslmode=")) {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&sslmode=verify-full")
    } else {
        format!("{url}?sslmode=verify-full")
    }
}

/// A SQLite URL that creates its file (and folder) if missing.
fn sqlite_url(url: &str) -> Result<String> {
    let rest = url.strip_prefix("sqlite:").ok_or_else(|| Error::Url(url.into()))?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        return Err(Error::Url(url.into()));
    }
    if path == ":memory:" {
        return Ok(url.to_string());
    }
    {
        if let Some(dir) = Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                what: "creating",
                path: dir.to_path_buf(),
                source,
            })?;
        }
    }
    Ok(if query.split('&').any(|kv| kv.starts_with("mode=")) {
        url.to_string()
    } else if query.is_empty() {
        format!("sqlite://{path}?mode=rwc")
    } else {
        format!("sqlite://{path}?{query}&mode=rwc")
    })
}

/// Model names: 1 to 128 ASCII letters, digits, `.`, `_`, `-`, starting with
/// a letter or digit (so `name:3` and `name@label` parse).
/// The registry's database URL and artifact folder: the explicit ones, else
/// `$PS_REGISTRY` / `$PS_REGISTRY_ROOT`, else `sqlite://registry/registry.db`
/// and `registry`.
/// The default keys of the registry at `root`: `root/keys/`, made for a new
/// registry (no artifact folder yet). Made in a temporary folder renamed
/// into place, so of processes opening a new registry at once, one set wins
/// and every process uses it.
fn default_keys(root: &Path) -> Result<KeyPaths> {
    let dir = root.join("keys");
    if !dir.exists() {
        if root.join("artifacts").exists() {
            return Ok(KeyPaths::default());
        }
        let tmp = root.join(format!(".keys-{}", std::process::id()));
        let bad = |reason: String| Error::Keys { path: dir.clone(), reason };
        let _ = std::fs::remove_dir_all(&tmp);
        ps_common::seal::generate(&tmp, false).map_err(|e| bad(e.to_string()))?;
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another process made them first.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    let keys = KeyPaths::in_dir(&dir);
    if keys.is_empty() {
        return Err(Error::Keys { path: dir, reason: "holds no key files".into() });
    }
    Ok(keys)
}

/// The keys a front end asked for: `--registry-keys DIR`, `--no-seal`, or
/// neither (`None`: the registry's default, see [`Registry::open_with`]).
pub fn keys_choice(dir: Option<&Path>, no_seal: bool) -> Option<KeyPaths> {
    match (dir, no_seal) {
        (_, true) => Some(KeyPaths::default()),
        (Some(d), false) => Some(KeyPaths::in_dir(d)),
        (None, false) => None,
    }
}

pub fn location(url: Option<String>, root: Option<PathBuf>) -> (String, PathBuf) {
    let root = root
        .or_else(|| std::env::var_os("PS_REGISTRY_ROOT").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("registry"));
    let url = url
        .or_else(|| std::env::var("PS_REGISTRY").ok())
        .unwrap_or_else(|| format!("sqlite://{}", root.join("registry.db").display()));
    (url, root)
}

pub fn check_model_name(name: &str) -> Result<()> {
    let bad = |reason| Err(Error::Name { what: "model name", value: name.into(), reason });
    if name.is_empty() || name.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return bad("use letters, digits, `.`, `_` and `-`, starting with a letter or digit");
    }
    Ok(())
}

/// Labels: 1 to 64 lowercase letters, digits, `_`, `-`, starting with a
/// letter (so a label is never mistaken for a version number).
pub fn check_label(label: &str) -> Result<()> {
    let bad = |reason| Err(Error::Name { what: "label", value: label.into(), reason });
    if label.is_empty() || label.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if !label.starts_with(|c: char| c.is_ascii_lowercase())
        || !label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
    {
        return bad("use lowercase letters, digits, `_` and `-`, starting with a letter");
    }
    Ok(())
}

fn check_text(what: &'static str, value: &str) -> Result<()> {
    if value.is_empty() || value.len() > 256 || value.chars().any(char::is_control) {
        return Err(Error::Name {
            what,
            value: value.into(),
            reason: "must be 1 to 256 printable characters",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_names() {
        assert_eq!(Backend::of_url("sqlite://r/registry.db").unwrap(), Backend::Sqlite);
        assert_eq!(Backend::of_url("postgres://u@127.0.0.1:5432/db").unwrap(), Backend::Postgres);
        assert_eq!(Backend::of_url("postgresql://u@h/db").unwrap(), Backend::Postgres);
        assert!(Backend::of_url("mysql://h/db").is_err());
        assert!(Backend::of_url("registry.db").is_err());
        assert_eq!(sqlite_url("sqlite::memory:").unwrap(), "sqlite::memory:");
        assert_eq!(sqlite_url("sqlite://x.db?mode=ro").unwrap(), "sqlite://x.db?mode=ro");
        assert_eq!(sqlite_url("sqlite://x.db?cache=shared").unwrap(), "sqlite://x.db?cache=shared&mode=rwc");
        assert_eq!(postgres_url("postgres://u@h/db"), "postgres://u@h/db?sslmode=verify-full");
        assert_eq!(
            postgres_url("postgres://u@h/db?sslrootcert=/ca.pem"),
            "postgres://u@h/db?sslrootcert=/ca.pem&sslmode=verify-full"
        );
        assert_eq!(postgres_url("postgres://u@h/db?sslmode=disable"), "postgres://u@h/db?sslmode=disable");

        assert!(check_model_name("mnist_mlp").is_ok() && check_model_name("a9a-v2.1").is_ok());
        for bad in ["", "-x", "a:b", "a@b", "a b", &"m".repeat(129)] {
            assert!(check_model_name(bad).is_err(), "{bad}");
        }
        assert!(check_label("production").is_ok() && check_label("canary-2").is_ok());
        for bad in ["", "3", "Prod", "a b", "_x"] {
            assert!(check_label(bad).is_err(), "{bad}");
        }
    }
}
