//! The app's own source of truth: a `jobs` table in one SQLite file that every replica opens, and the
//! `sessions` table its login cookie names (so a session made on one replica is known on all).
//!
//! Each replica holds one connection (WAL mode, so readers and the one writer at a time do not block
//! each other for long; a busy writer is waited for up to five seconds). Calls run on tokio's blocking
//! pool, so a slow disk never stalls the replica's async tasks.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

/// A job as the page, the API and the publications show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub user: String,
    /// `pending` until the external system's webhook lands, then `done`.
    pub status: String,
    pub result: Option<String>,
    /// The replica that took `POST /api/jobs`.
    pub started_by: String,
    /// The replica the webhook landed on.
    pub finished_by: Option<String>,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    user        TEXT NOT NULL,
    status      TEXT NOT NULL,
    result      TEXT,
    started_by  TEXT NOT NULL,
    finished_by TEXT,
    created_ms  INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs (user, created_ms);
CREATE TABLE IF NOT EXISTS sessions (
    id         TEXT PRIMARY KEY,
    user       TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
";

const COLUMNS: &str = "id, user, status, result, started_by, finished_by, created_ms, finished_ms";

fn job_from(row: &Row<'_>) -> rusqlite::Result<Job> {
    Ok(Job {
        id: row.get(0)?,
        user: row.get(1)?,
        status: row.get(2)?,
        result: row.get(3)?,
        started_by: row.get(4)?,
        finished_by: row.get(5)?,
        created_ms: row.get(6)?,
        finished_ms: row.get(7)?,
    })
}

fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Opens (and creates, the first time) the database at `path`: one connection.
pub fn open(path: &Path) -> anyhow::Result<Connection> {
    let connection = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    connection.busy_timeout(Duration::from_secs(5))?;
    let mode: String = connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        anyhow::bail!("{}: journal mode {mode}, expected wal", path.display());
    }
    connection.execute_batch(SCHEMA)?;
    Ok(connection)
}

/// Every job of `user`, oldest first.
pub fn jobs_of(connection: &Connection, user: &str) -> rusqlite::Result<Vec<Job>> {
    let mut statement =
        connection.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE user = ?1 ORDER BY created_ms, id"))?;
    statement.query_map(params![user], job_from)?.collect()
}

/// Every job, oldest first (what the tests compare against).
pub fn all_jobs(connection: &Connection) -> rusqlite::Result<Vec<Job>> {
    let mut statement = connection.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs ORDER BY created_ms, id"))?;
    statement.query_map([], job_from)?.collect()
}

/// One replica's handle on the database (cheap to clone).
#[derive(Clone)]
pub struct Db {
    connection: Arc<Mutex<Connection>>,
}

impl Db {
    pub fn open(path: &Path) -> anyhow::Result<Db> {
        Ok(Db { connection: Arc::new(Mutex::new(open(path)?)) })
    }

    /// Runs `work` with the connection on the blocking pool.
    async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let guard = connection.lock().map_err(|_| anyhow!("the database connection's lock is poisoned"))?;
            Ok(work(&guard)?)
        })
        .await?
    }

    /// Records a new pending job.
    pub async fn insert(&self, id: String, user: String, replica: String) -> anyhow::Result<Job> {
        let job = Job {
            id,
            user,
            status: "pending".into(),
            result: None,
            started_by: replica,
            finished_by: None,
            created_ms: now_ms(),
            finished_ms: None,
        };
        let row = job.clone();
        self.call(move |c| {
            c.execute(
                &format!("INSERT INTO jobs ({COLUMNS}) VALUES (?1, ?2, ?3, NULL, ?4, NULL, ?5, NULL)"),
                params![row.id, row.user, row.status, row.started_by, row.created_ms],
            )
        })
        .await?;
        Ok(job)
    }

    /// Forgets a job (the external system refused it).
    pub async fn delete(&self, id: String) -> anyhow::Result<()> {
        self.call(move |c| c.execute("DELETE FROM jobs WHERE id = ?1", params![id])).await?;
        Ok(())
    }

    /// Marks a job done with `result`, once: a repeated webhook changes nothing and gets the stored row.
    /// `None` when there is no such job.
    pub async fn finish(&self, id: String, result: String, replica: String) -> anyhow::Result<Option<Job>> {
        self.call(move |c| {
            c.execute(
                "UPDATE jobs SET status = 'done', result = ?2, finished_by = ?3, finished_ms = ?4
                 WHERE id = ?1 AND status = 'pending'",
                params![id, result, replica, now_ms()],
            )?;
            c.query_row(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"), params![id], job_from).optional()
        })
        .await
    }

    pub async fn jobs_of(&self, user: String) -> anyhow::Result<Vec<Job>> {
        self.call(move |c| jobs_of(c, &user)).await
    }

    /// Records a login: session `id` is `user` until `expires_at` (Unix seconds).
    pub async fn create_session(&self, id: String, user: String, expires_at: u64) -> anyhow::Result<()> {
        let expires_at = i64::try_from(expires_at)?;
        self.call(move |c| {
            c.execute("INSERT INTO sessions (id, user, expires_at) VALUES (?1, ?2, ?3)", params![id, user, expires_at])
        })
        .await?;
        Ok(())
    }

    /// The user of session `id` and when it ends, if it exists and has not ended.
    pub async fn session(&self, id: String) -> anyhow::Result<Option<(String, u64)>> {
        let now = now_ms() / 1000;
        let found = self
            .call(move |c| {
                c.query_row(
                    "SELECT user, expires_at FROM sessions WHERE id = ?1 AND expires_at > ?2",
                    params![id, now],
                    |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)),
                )
                .optional()
            })
            .await?;
        Ok(found.map(|(user, expires_at)| (user, u64::try_from(expires_at).unwrap_or(0))))
    }
}
