//! Where batch jobs live: an SQLite database in the state directory (`batch.sqlite`, WAL,
//! 0600), with each job, each line's state (pending, running, done, failed, cancelled), its
//! attempts, and its result or error — written before the line counts as done, so a crash
//! loses nothing finished and a restart runs again only what was running. Deleted data is
//! overwritten (`secure_delete`): a job's inputs and outputs go with it. Uploaded files for
//! OpenAI's Batch API are kept here too.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

/// A store error, with what a user needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the disk holding lmsd's batch store is full ({0}); the job waits until there is room"
    )]
    Full(String),
    #[error("lmsd's batch store failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot create lmsd's batch store at {path}: {error}")]
    Create { path: String, error: std::io::Error },
}

impl StoreError {
    fn of(error: rusqlite::Error) -> StoreError {
        match error.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full(error.to_string()),
            _ => StoreError::Sqlite(error),
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT,
    state TEXT NOT NULL,
    created INTEGER NOT NULL,
    finished INTEGER,
    loads INTEGER NOT NULL DEFAULT 0,
    -- OpenAI's Batch API: what the batch was made from and says of itself.
    openai TEXT
);
CREATE TABLE IF NOT EXISTS lines (
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    model TEXT NOT NULL,
    task TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, seq),
    UNIQUE (job, custom_id)
);
-- The next pending lines of a model, and the next in file order: each read off an index, not
-- sorted (a sort over the pending lines at every claim made a job's cost grow with its square).
CREATE INDEX IF NOT EXISTS lines_by_model ON lines (job, state, model, seq);
CREATE INDEX IF NOT EXISTS lines_in_order ON lines (job, state, seq);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created INTEGER NOT NULL,
    content BLOB NOT NULL
);
";

/// A line to store.
pub struct NewLine<'a> {
    pub seq: u64,
    pub id: &'a str,
    pub model: &'a str,
    /// The task as JSON; `None` with `error` for a line refused at submission.
    pub task: Option<String>,
    pub error: Option<String>,
}

/// A job as stored.
#[derive(Debug, Clone, Default)]
pub struct JobRow {
    pub id: String,
    pub name: Option<String>,
    pub state: String,
    pub created: u64,
    pub finished: Option<u64>,
    pub loads: u64,
    pub openai: Option<String>,
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    pub running: u64,
}

/// A line claimed to run.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub seq: u64,
    pub model: String,
    pub task: String,
}

/// A finished (or not yet finished) line, for results.
#[derive(Debug, Clone)]
pub struct LineRow {
    pub seq: u64,
    pub custom_id: String,
    pub state: String,
    pub result: Option<String>,
    pub error: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl LineRow {
    /// A stored result or error as JSON (`null` when there is none).
    pub fn json(text: &Option<String>) -> serde_json::Value {
        text.as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

/// A stored upload (OpenAI's Files API).
#[derive(Debug, Clone)]
pub struct FileRow {
    pub id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: u64,
    pub created: u64,
}

/// The one connection, behind a lock: calls are short but for whole-job reads (results, a
/// job's counts), which take milliseconds per ten thousand lines.
pub struct Store {
    db: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// A `files` row of `id, purpose, filename, bytes, created`.
fn file_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<FileRow> {
    Ok(FileRow {
        id: row.get(0)?,
        purpose: row.get(1)?,
        filename: row.get(2)?,
        bytes: row.get(3)?,
        created: row.get(4)?,
    })
}

/// Makes deleted data unreadable: `secure_delete` zeroed its pages in the database, and the
/// write-ahead log, which may still hold earlier copies of them, is emptied.
fn forget(db: &Connection) -> Result<()> {
    db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(StoreError::of)
}

impl Store {
    /// Opens (or creates, 0600) the store at `path`, and puts lines a crash left running back
    /// to pending.
    pub fn open(path: &Path) -> Result<Store> {
        use std::os::unix::fs::OpenOptionsExt;
        let create = |error| StoreError::Create {
            path: path.display().to_string(),
            error,
        };
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            // The state directory holds the user's prompts and results: theirs alone.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(create)?;
        }
        // Created by hand first, so that SQLite (which gives its WAL files the database's
        // mode) never makes it readable by others.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(create)?;
        let db = Connection::open(path).map_err(StoreError::of)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA secure_delete = ON;
             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;
             -- Lines are read once each, in order: a small page cache does (the default 2 MiB
             -- showed in an idle lmsd's memory).
             PRAGMA cache_size = -256;",
        )
        .map_err(StoreError::of)?;
        db.execute_batch(SCHEMA).map_err(StoreError::of)?;
        // Lines a crash left running run again — unless their job was cancelled meanwhile.
        db.execute(
            "UPDATE lines SET state = CASE WHEN (SELECT state FROM jobs WHERE id = lines.job) = 'running'
                 THEN 'pending' ELSE 'cancelled' END
             WHERE state = 'running'",
            [],
        )
        .map_err(StoreError::of)?;
        Ok(Store { db: Mutex::new(db) })
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a job and its lines in one transaction: all of it or nothing.
    pub fn insert_job(
        &self,
        id: &str,
        name: Option<&str>,
        created: u64,
        openai: Option<&str>,
        lines: &[NewLine<'_>],
    ) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction().map_err(StoreError::of)?;
        tx.execute(
            "INSERT INTO jobs (id, name, state, created, openai) VALUES (?1, ?2, 'running', ?3, ?4)",
            params![id, name, created, openai],
        )
        .map_err(StoreError::of)?;
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO lines (job, seq, custom_id, model, task, state, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(StoreError::of)?;
            for line in lines {
                let state = if line.task.is_some() {
                    "pending"
                } else {
                    "failed"
                };
                insert
                    .execute(params![
                        id, line.seq, line.id, line.model, line.task, state, line.error
                    ])
                    .map_err(StoreError::of)?;
            }
        }
        tx.commit().map_err(StoreError::of)
    }

    /// Jobs with lines left to run.
    pub fn running_jobs(&self) -> Result<Vec<String>> {
        let db = self.db();
        let mut query = db
            .prepare_cached("SELECT id FROM jobs WHERE state = 'running' ORDER BY created, id")
            .map_err(StoreError::of)?;
        let rows = query
            .query_map([], |row| row.get(0))
            .map_err(StoreError::of)?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(StoreError::of)
    }

    /// A job's pending lines by model: how many, and the first one's place.
    pub fn pending_by_model(&self, job: &str) -> Result<Vec<(String, u64, u64)>> {
        let db = self.db();
        let mut query = db
            .prepare_cached(
                "SELECT model, COUNT(*), MIN(seq) FROM lines WHERE job = ?1 AND state = 'pending'
                 GROUP BY model ORDER BY MIN(seq)",
            )
            .map_err(StoreError::of)?;
        let rows = query
            .query_map([job], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .map_err(StoreError::of)?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(StoreError::of)
    }

    /// Marks up to `n` pending lines running — of `model`, or of any model, in file order —
    /// and returns them.
    pub fn claim(&self, job: &str, model: Option<&str>, n: u64) -> Result<Vec<Claimed>> {
        let db = self.db();
        let which = match model {
            Some(_) => {
                "SELECT seq FROM lines INDEXED BY lines_by_model
                        WHERE job = ?1 AND state = 'pending' AND model = ?2 ORDER BY seq LIMIT ?3"
            }
            None => {
                "SELECT seq FROM lines INDEXED BY lines_in_order
                     WHERE job = ?1 AND state = 'pending' AND ?2 IS NULL ORDER BY seq LIMIT ?3"
            }
        };
        let mut query = db
            .prepare_cached(&format!(
                "UPDATE lines SET state = 'running', attempts = attempts + 1
                 WHERE job = ?1 AND seq IN ({which})
                 RETURNING seq, task, model"
            ))
            .map_err(StoreError::of)?;
        let rows = query
            .query_map(params![job, model, n], |row| {
                Ok(Claimed {
                    seq: row.get(0)?,
                    task: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    model: row.get(2)?,
                })
            })
            .map_err(StoreError::of)?;
        let mut claimed: Vec<Claimed> = rows
            .collect::<rusqlite::Result<_>>()
            .map_err(StoreError::of)?;
        claimed.sort_by_key(|c| c.seq);
        Ok(claimed)
    }

    /// A running line's end: `done` with its result, or `failed` with its error.
    pub fn finish(
        &self,
        job: &str,
        seq: u64,
        outcome: std::result::Result<&str, &str>,
        tokens: (u64, u64),
        loads: u64,
    ) -> Result<()> {
        let (state, result, error) = match outcome {
            Ok(result) => ("done", Some(result), None),
            Err(error) => ("failed", None, Some(error)),
        };
        let mut db = self.db();
        let tx = db.transaction().map_err(StoreError::of)?;
        tx.execute(
            "UPDATE lines SET state = ?3, result = ?4, error = ?5, input_tokens = ?6, output_tokens = ?7
             WHERE job = ?1 AND seq = ?2 AND state = 'running'",
            params![job, seq, state, result, error, tokens.0, tokens.1],
        )
        .map_err(StoreError::of)?;
        tx.execute(
            "UPDATE jobs SET loads = ?2 WHERE id = ?1",
            params![job, loads],
        )
        .map_err(StoreError::of)?;
        tx.commit().map_err(StoreError::of)
    }

    /// A running line back to pending (lmsd is stopping, or the write of its end failed), or
    /// cancelled if its job was.
    pub fn requeue(&self, job: &str, seq: u64) -> Result<()> {
        self.db()
            .execute(
                "UPDATE lines SET state = CASE WHEN (SELECT state FROM jobs WHERE id = ?1) = 'running'
                     THEN 'pending' ELSE 'cancelled' END
                 WHERE job = ?1 AND seq = ?2 AND state = 'running'",
                params![job, seq],
            )
            .map(drop)
            .map_err(StoreError::of)
    }

    /// Every running line of a job back to pending (a paused job resuming).
    pub fn requeue_running(&self, job: &str) -> Result<()> {
        self.db()
            .execute(
                "UPDATE lines SET state = 'pending' WHERE job = ?1 AND state = 'running'",
                [job],
            )
            .map(drop)
            .map_err(StoreError::of)
    }

    /// Ends a job: `completed` or `cancelled` (whose pending lines are cancelled with it).
    pub fn end(&self, job: &str, state: &str, now: u64) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction().map_err(StoreError::of)?;
        tx.execute(
            "UPDATE lines SET state = 'cancelled' WHERE job = ?1 AND state = 'pending'",
            [job],
        )
        .map_err(StoreError::of)?;
        tx.execute(
            "UPDATE jobs SET state = ?2, finished = ?3 WHERE id = ?1 AND state = 'running'",
            params![job, state, now],
        )
        .map_err(StoreError::of)?;
        tx.commit().map_err(StoreError::of)
    }

    /// Deletes a job, its lines, and the upload it was made from (the job kept its own copy of
    /// the lines; the upload holds the same prompts); false if there was none.
    pub fn delete(&self, job: &str) -> Result<bool> {
        let db = self.db();
        db.execute(
            "DELETE FROM files WHERE id IN
                 (SELECT json_extract(openai, '$.input_file_id') FROM jobs WHERE id = ?1)",
            [job],
        )
        .map_err(StoreError::of)?;
        let deleted = db
            .execute("DELETE FROM jobs WHERE id = ?1", [job])
            .map_err(StoreError::of)?;
        forget(&db)?;
        Ok(deleted > 0)
    }

    /// Deletes jobs that ended before `before` (unix seconds); how many.
    pub fn expire(&self, before: u64) -> Result<usize> {
        let db = self.db();
        let ended = "state IN ('completed', 'cancelled') AND finished < ?1";
        db.execute(
            &format!("DELETE FROM files WHERE id IN (SELECT json_extract(openai, '$.input_file_id') FROM jobs WHERE {ended})"),
            [before],
        )
        .map_err(StoreError::of)?;
        let deleted = db
            .execute(&format!("DELETE FROM jobs WHERE {ended}"), [before])
            .map_err(StoreError::of)?;
        if deleted > 0 {
            forget(&db)?;
        }
        Ok(deleted)
    }

    fn job_rows(&self, filter: Option<&str>) -> Result<Vec<JobRow>> {
        let db = self.db();
        let mut query = db
            .prepare(
                "SELECT j.id, j.name, j.state, j.created, j.finished, j.loads, j.openai,
                    COUNT(l.seq),
                    COALESCE(SUM(l.state = 'done'), 0),
                    COALESCE(SUM(l.state IN ('failed', 'cancelled')), 0),
                    COALESCE(SUM(l.state = 'running'), 0)
                 FROM jobs j LEFT JOIN lines l ON l.job = j.id
                 WHERE ?1 IS NULL OR j.id = ?1
                 GROUP BY j.id ORDER BY j.created, j.id",
            )
            .map_err(StoreError::of)?;
        let rows = query
            .query_map([filter], |row| {
                Ok(JobRow {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    state: row.get(2)?,
                    created: row.get(3)?,
                    finished: row.get(4)?,
                    loads: row.get(5)?,
                    openai: row.get(6)?,
                    total: row.get(7)?,
                    done: row.get(8)?,
                    failed: row.get(9)?,
                    running: row.get(10)?,
                })
            })
            .map_err(StoreError::of)?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(StoreError::of)
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRow>> {
        Ok(self.job_rows(Some(id))?.into_iter().next())
    }

    pub fn jobs(&self) -> Result<Vec<JobRow>> {
        self.job_rows(None)
    }

    /// Each line of a job in file order.
    pub fn each_line(&self, job: &str, mut each: impl FnMut(LineRow)) -> Result<()> {
        let db = self.db();
        let mut query = db
            .prepare(
                "SELECT seq, custom_id, state, result, error, input_tokens, output_tokens
                 FROM lines WHERE job = ?1 ORDER BY seq",
            )
            .map_err(StoreError::of)?;
        let mut rows = query.query([job]).map_err(StoreError::of)?;
        while let Some(row) = rows.next().map_err(StoreError::of)? {
            each(LineRow {
                seq: row.get(0).map_err(StoreError::of)?,
                custom_id: row.get(1).map_err(StoreError::of)?,
                state: row.get(2).map_err(StoreError::of)?,
                result: row.get(3).map_err(StoreError::of)?,
                error: row.get(4).map_err(StoreError::of)?,
                input_tokens: row.get(5).map_err(StoreError::of)?,
                output_tokens: row.get(6).map_err(StoreError::of)?,
            });
        }
        Ok(())
    }

    pub fn put_file(&self, file: &FileRow, content: &[u8]) -> Result<()> {
        self.db()
            .execute(
                "INSERT INTO files (id, purpose, filename, bytes, created, content) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![file.id, file.purpose, file.filename, file.bytes, file.created, content],
            )
            .map(drop)
            .map_err(StoreError::of)
    }

    pub fn file(&self, id: &str) -> Result<Option<FileRow>> {
        self.db()
            .query_row(
                "SELECT id, purpose, filename, bytes, created FROM files WHERE id = ?1",
                [id],
                file_row,
            )
            .optional()
            .map_err(StoreError::of)
    }

    /// Every upload, newest first.
    pub fn files(&self) -> Result<Vec<FileRow>> {
        let db = self.db();
        let mut query = db
            .prepare(
                "SELECT id, purpose, filename, bytes, created FROM files ORDER BY created DESC, id",
            )
            .map_err(StoreError::of)?;
        let rows = query.query_map([], file_row).map_err(StoreError::of)?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(StoreError::of)
    }

    pub fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>> {
        self.db()
            .query_row("SELECT content FROM files WHERE id = ?1", [id], |row| {
                row.get(0)
            })
            .optional()
            .map_err(StoreError::of)
    }

    pub fn delete_file(&self, id: &str) -> Result<bool> {
        let db = self.db();
        let deleted = db
            .execute("DELETE FROM files WHERE id = ?1", [id])
            .map_err(StoreError::of)?;
        forget(&db)?;
        Ok(deleted > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(seq: u64, id: &'a str, model: &'a str) -> NewLine<'a> {
        NewLine {
            seq,
            id,
            model,
            task: Some("{}".into()),
            error: None,
        }
    }

    #[test]
    fn a_line_running_at_a_crash_runs_again_and_ends_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batch.sqlite");
        let store = Store::open(&path).unwrap();
        let lines = [line(1, "a", "m1"), line(2, "b", "m2"), line(3, "c", "m1")];
        store.insert_job("j1", None, 10, None, &lines).unwrap();
        assert_eq!(
            store.pending_by_model("j1").unwrap(),
            [("m1".to_owned(), 2, 1), ("m2".to_owned(), 1, 2)]
        );
        let claimed = store.claim("j1", Some("m1"), 5).unwrap();
        assert_eq!(claimed.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 3]);
        store.finish("j1", 1, Ok("{\"x\":1}"), (3, 4), 1).unwrap();
        drop(store);
        // Line 3 was running when lmsd died: it is pending again, line 1 stays done.
        let store = Store::open(&path).unwrap();
        let job = store.job("j1").unwrap().unwrap();
        assert_eq!((job.total, job.done, job.running, job.loads), (3, 1, 0, 1));
        let again = store.claim("j1", None, 5).unwrap();
        assert_eq!(again.iter().map(|c| c.seq).collect::<Vec<_>>(), [2, 3]);
        // A second end for a line already ended changes nothing.
        store.finish("j1", 3, Err("{}"), (0, 0), 1).unwrap();
        store.finish("j1", 3, Ok("{}"), (0, 0), 1).unwrap();
        let mut states = Vec::new();
        store.each_line("j1", |l| states.push(l.state)).unwrap();
        assert_eq!(states, ["done", "running", "failed"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn lines_of_a_cancelled_job_left_running_by_a_crash_end_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.sqlite");
        let store = Store::open(&path).unwrap();
        store
            .insert_job("j", None, 1, None, &[line(1, "a", "m"), line(2, "b", "m")])
            .unwrap();
        store.claim("j", Some("m"), 1).unwrap();
        store.end("j", "cancelled", 5).unwrap();
        store.requeue("j", 1).unwrap();
        let mut states = Vec::new();
        store.each_line("j", |l| states.push(l.state)).unwrap();
        assert_eq!(states, ["cancelled", "cancelled"], "not pending again");
        // The same when lmsd died with the line running.
        store
            .insert_job("k", None, 1, None, &[line(1, "a", "m")])
            .unwrap();
        store.claim("k", None, 1).unwrap();
        store.end("k", "cancelled", 5).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let mut states = Vec::new();
        store.each_line("k", |l| states.push(l.state)).unwrap();
        assert_eq!(states, ["cancelled"]);
    }

    #[test]
    fn a_cancelled_job_runs_nothing_more_and_a_deleted_one_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.sqlite")).unwrap();
        store
            .insert_job(
                "j",
                Some("n"),
                1,
                None,
                &[line(1, "a", "m"), line(2, "b", "m")],
            )
            .unwrap();
        store.end("j", "cancelled", 5).unwrap();
        assert!(store.claim("j", None, 5).unwrap().is_empty());
        let job = store.job("j").unwrap().unwrap();
        assert_eq!((job.state.as_str(), job.failed), ("cancelled", 2));
        assert_eq!(store.expire(4).unwrap(), 0);
        assert!(store.delete("j").unwrap());
        assert!(store.job("j").unwrap().is_none());
        let mut left = 0;
        store.each_line("j", |_| left += 1).unwrap();
        assert_eq!(left, 0);
    }
}
