//! `PostgresTransaction` and the insert statements shared with caller transactions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};
use fascicle_api::{ChildRecord, Dependency, Error, InsertHealth, ParentRecord, Result};
use sqlx::postgres::types::PgInterval;
use sqlx::{PgConnection, Postgres, Row};
use uuid::Uuid;

use crate::error;
use crate::schema::{CLOCK_TOLERANCE_MICROS, Sql, sql};

/// Children per `INSERT … SELECT FROM unnest(…)` statement.
const CHUNK: usize = 50_000;

/// A reading of the server's clock (the `statement_timestamp()` of an insert) and when this
/// process received it: later instants of the server's clock are estimated from it without
/// another round trip, by adding the time elapsed since on this process's monotonic clock
/// (which a wrong wall clock does not affect). Only the binary `COPY` needs it; the other
/// statements read the server's clock themselves.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ServerClock {
    read: DateTime<Utc>,
    received: Instant,
}

impl ServerClock {
    fn new(read: DateTime<Utc>) -> Self {
        Self {
            read,
            received: Instant::now(),
        }
    }

    /// The server's clock now, at most a round trip behind it.
    fn now(&self) -> DateTime<Utc> {
        self.read + TimeDelta::from_std(self.received.elapsed()).unwrap_or(TimeDelta::zero())
    }
}

/// How many microseconds a record's `run_at` is after its `created_at`: the delay its
/// client asked for, on the client's clock (negative for a `run_at` in the past).
fn delay_micros(child: &ChildRecord) -> Result<i64> {
    child
        .run_at
        .timestamp_micros()
        .checked_sub(child.created_at.timestamp_micros())
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "operation {}: run_at {} is too far from its created_at {} to be stored",
                child.id, child.run_at, child.created_at
            ))
        })
}

/// A record's `created_at` and `run_at` as stored when the server's clock reads
/// `server_now`, all in microseconds since the Unix epoch: the rule `Sql::insert_children`
/// applies in SQL (see [`CLOCK_TOLERANCE_MICROS`]), for the `COPY` path, which cannot call
/// the server's clock itself.
fn on_server_clock(child: &ChildRecord, server_now: i64) -> Result<(i64, i64)> {
    let delay = delay_micros(child)?;
    let created = child.created_at.timestamp_micros();
    let at = if (server_now - CLOCK_TOLERANCE_MICROS..=server_now).contains(&created) {
        created
    } else {
        server_now
    };
    let run_at = at.checked_add(delay).ok_or_else(|| {
        Error::InvalidInput(format!(
            "operation {}: run_at {} is out of range",
            child.id, child.run_at
        ))
    })?;
    Ok((at, run_at))
}

/// Inserts a parent, placing its timestamps on the server's clock, and returns that clock's
/// reading. With `skip_existing`, an id already stored is not an error and the result is
/// `None` when the row was not inserted (for caller transactions, which a unique violation
/// would abort).
pub(crate) async fn insert_parent(
    conn: &mut PgConnection,
    statements: &Sql,
    parent: &ParentRecord,
    skip_existing: bool,
) -> Result<Option<ServerClock>> {
    let statement = if skip_existing {
        &statements.insert_parent_if_absent
    } else {
        &statements.insert_parent
    };
    let read: Option<DateTime<Utc>> = sqlx::query_scalar(sql(statement))
        .persistent(statements.persistent())
        .bind(parent.id.as_uuid())
        .bind(&parent.kind)
        .bind(fascicle_api::to_stored_text(&parent.metadata))
        .bind(parent.created_at)
        .bind(parent.children_total as i64)
        .bind(parent.plan.policy_stored())
        .bind(parent.plan.callbacks_json())
        .bind(parent.parent_id.map(|p| *p.as_uuid()))
        .bind(fascicle_api::Dependency::list_json(&parent.dependents))
        .fetch_optional(conn)
        .await
        .map_err(error::map)?;
    Ok(read.map(ServerClock::new))
}

/// Batches at least this large go through binary `COPY`; smaller ones through one
/// `INSERT … SELECT FROM unnest(…)`, which costs less to start.
const COPY_THRESHOLD: usize = 64;

/// Inserts children in a constant number of round trips: binary `COPY` for large
/// batches, else one statement per [`CHUNK`]; either way one `NOTIFY` is queued, which
/// PostgreSQL delivers only on commit. Timestamps are placed on the server's clock;
/// `clock` is its latest reading in this transaction (the `COPY` needs one: without it,
/// one `SELECT statement_timestamp()` is made first), and is updated.
pub(crate) async fn insert_children(
    conn: &mut PgConnection,
    statements: &Sql,
    children: &[ChildRecord],
    clock: &mut Option<ServerClock>,
) -> Result<()> {
    if children.len() >= COPY_THRESHOLD {
        let clock = match clock {
            Some(clock) => *clock,
            None => {
                let read = sqlx::query_scalar("SELECT statement_timestamp()")
                    .persistent(statements.persistent())
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(error::map)?;
                *clock.insert(ServerClock::new(read))
            }
        };
        return copy_children(conn, statements, children, clock).await;
    }
    insert_children_unnest(conn, statements, children, clock).await
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Encodes children in PostgreSQL's binary `COPY` format, in the column order of
/// `Sql::copy_children`, with their timestamps placed on the server's clock as it reads
/// `server_now`.
fn encode_copy(children: &[ChildRecord], server_now: DateTime<Utc>) -> Result<Vec<u8>> {
    fn field(buf: &mut Vec<u8>, bytes: &[u8]) {
        buf.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        buf.extend_from_slice(bytes);
    }
    fn null(buf: &mut Vec<u8>) {
        buf.extend_from_slice(&(-1i32).to_be_bytes());
    }
    fn timestamp(buf: &mut Vec<u8>, unix_micros: i64) {
        field(buf, &(unix_micros - PG_EPOCH_OFFSET_MICROS).to_be_bytes());
    }
    let server_now = server_now.timestamp_micros();
    let estimate: usize = children
        .iter()
        .map(|c| 160 + c.kind.len() + c.payload_json.len())
        .sum();
    let mut buf = Vec::with_capacity(21 + estimate);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes()); // flags
    buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    for c in children {
        let (created_at, run_at) = on_server_clock(c, server_now)?;
        buf.extend_from_slice(&14i16.to_be_bytes());
        field(&mut buf, c.id.as_bytes());
        field(&mut buf, c.kind.as_bytes());
        // jsonb's binary form: a version byte, then the JSON text.
        buf.extend_from_slice(&((c.payload_json.len() + 1) as i32).to_be_bytes());
        buf.push(1);
        buf.extend_from_slice(c.payload_json.as_bytes());
        match &c.parent_id {
            Some(parent) => field(&mut buf, parent.as_bytes()),
            None => null(&mut buf),
        }
        field(&mut buf, &c.priority.to_be_bytes());
        match &c.serialization_key {
            Some(key) => field(&mut buf, key.as_bytes()),
            None => null(&mut buf),
        }
        field(&mut buf, &(c.max_attempts as i32).to_be_bytes());
        timestamp(&mut buf, run_at);
        timestamp(&mut buf, created_at);
        timestamp(&mut buf, created_at);
        match c.timeout {
            Some(timeout) => field(&mut buf, &(timeout.as_millis() as i64).to_be_bytes()),
            None => null(&mut buf),
        }
        field(&mut buf, &(c.after.len() as i32).to_be_bytes());
        for list in [&c.after, &c.dependents] {
            match Dependency::list_json(list) {
                Some(json) => {
                    buf.extend_from_slice(&((json.len() + 1) as i32).to_be_bytes());
                    buf.push(1);
                    buf.extend_from_slice(json.as_bytes());
                }
                None => null(&mut buf),
            }
        }
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    Ok(buf)
}

async fn copy_children(
    conn: &mut PgConnection,
    statements: &Sql,
    children: &[ChildRecord],
    clock: ServerClock,
) -> Result<()> {
    let data = encode_copy(children, clock.now())?;
    let mut copy = conn
        .copy_in_raw(&statements.copy_children)
        .await
        .map_err(error::map)?;
    if let Err(e) = copy.send(data).await {
        let _ = copy.abort("fascicle: sending COPY data failed").await;
        return Err(error::map(e));
    }
    let inserted = copy.finish().await.map_err(error::map)?;
    if inserted as usize != children.len() {
        return Err(Error::backend(
            error::DRIVER,
            fascicle_api::BackendErrorKind::Other,
            format!("copied {inserted} of {} children", children.len()),
        ));
    }
    sqlx::query("SELECT pg_notify($1, $2)")
        .persistent(statements.persistent())
        .bind(&statements.channel)
        .bind(inserted.to_string())
        .execute(&mut *conn)
        .await
        .map_err(error::map)?;
    Ok(())
}

async fn insert_children_unnest(
    conn: &mut PgConnection,
    statements: &Sql,
    children: &[ChildRecord],
    clock: &mut Option<ServerClock>,
) -> Result<()> {
    for chunk in children.chunks(CHUNK) {
        let n = chunk.len();
        let mut ids = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut parents = Vec::with_capacity(n);
        let mut priorities = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut attempts = Vec::with_capacity(n);
        let mut created: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut delays: Vec<PgInterval> = Vec::with_capacity(n);
        let mut timeouts: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut waiting: Vec<i32> = Vec::with_capacity(n);
        let mut depends_on: Vec<Option<String>> = Vec::with_capacity(n);
        let mut dependents: Vec<Option<String>> = Vec::with_capacity(n);
        for child in chunk {
            waiting.push(child.after.len() as i32);
            depends_on.push(Dependency::list_json(&child.after));
            dependents.push(Dependency::list_json(&child.dependents));
            timeouts.push(child.timeout.map(|t| t.as_millis() as i64));
            ids.push(*child.id.as_uuid());
            kinds.push(child.kind.as_str());
            payloads.push(child.payload_json.as_str());
            parents.push(child.parent_id.map(Uuid::from));
            priorities.push(child.priority);
            keys.push(child.serialization_key.as_deref());
            attempts.push(child.max_attempts as i32);
            created.push(child.created_at);
            // Microseconds only, no days: see `Sql::insert_children`.
            delays.push(PgInterval {
                months: 0,
                days: 0,
                microseconds: delay_micros(child)?,
            });
        }
        let row = sqlx::query(sql(&statements.insert_children))
            .persistent(statements.persistent())
            .bind(&ids)
            .bind(&kinds)
            .bind(&payloads)
            .bind(&parents)
            .bind(&priorities)
            .bind(&keys)
            .bind(&attempts)
            .bind(&created)
            .bind(&delays)
            .bind(&statements.channel)
            .bind(&timeouts)
            .bind(&waiting)
            .bind(&depends_on)
            .bind(&dependents)
            .fetch_one(&mut *conn)
            .await
            .map_err(error::map)?;
        let inserted: i64 = row.try_get(0).map_err(error::map)?;
        *clock = Some(ServerClock::new(row.try_get(1).map_err(error::map)?));
        if inserted as usize != n {
            return Err(Error::backend(
                error::DRIVER,
                fascicle_api::BackendErrorKind::Other,
                format!("inserted {inserted} of {n} children"),
            ));
        }
    }
    Ok(())
}

/// A transaction on its own pooled connection; sqlx rolls it back if it is dropped.
pub(crate) struct PostgresTransaction {
    tx: sqlx::Transaction<'static, Postgres>,
    sql: Arc<Sql>,
    /// Per parent of this transaction: the `children_total` its record claimed (and was
    /// inserted with) and the children actually inserted. Where they differ, the count is
    /// written just before the commit.
    children_per_parent: HashMap<Uuid, (i64, i64)>,
    /// The latest reading of the server's clock in this transaction, for a `COPY`.
    clock: Option<ServerClock>,
    health: InsertHealth,
}

impl PostgresTransaction {
    pub(crate) fn new(tx: sqlx::Transaction<'static, Postgres>, sql: Arc<Sql>) -> Self {
        Self {
            tx,
            sql,
            children_per_parent: HashMap::new(),
            clock: None,
            health: InsertHealth::default(),
        }
    }
}

impl PostgresTransaction {
    async fn insert_parent_unchecked(&mut self, parent: &ParentRecord) -> Result<()> {
        fascicle_api::check_parent_membership(parent, |p| {
            self.children_per_parent.contains_key(p.as_uuid())
        })?;
        self.clock = insert_parent(&mut self.tx, &self.sql, parent, false).await?;
        if let Some(outer) = parent.parent_id
            && let Some((_, counted)) = self.children_per_parent.get_mut(outer.as_uuid())
        {
            *counted += 1;
        }
        let claimed = parent.children_total as i64;
        self.children_per_parent
            .insert(*parent.id.as_uuid(), (claimed, 0));
        Ok(())
    }

    async fn insert_child_unchecked(&mut self, child: &ChildRecord) -> Result<()> {
        self.insert_children_unchecked(std::slice::from_ref(child))
            .await
    }

    async fn insert_children_unchecked(&mut self, children: &[ChildRecord]) -> Result<()> {
        fascicle_api::check_batch_membership(children, |p| {
            self.children_per_parent.contains_key(p.as_uuid())
        })?;
        insert_children(&mut self.tx, &self.sql, children, &mut self.clock).await?;
        for parent in children.iter().filter_map(|c| c.parent_id) {
            if let Some((_, counted)) = self.children_per_parent.get_mut(parent.as_uuid()) {
                *counted += 1;
            }
        }
        Ok(())
    }

    async fn insert_unique_unchecked(
        &mut self,
        child: &ChildRecord,
        unique: &fascicle_api::Unique,
    ) -> Result<Option<fascicle_api::OperationId>> {
        fascicle_api::check_standalone(child)?;
        // The key's row is the unique index: a racing submitter of the same key waits here
        // for this transaction to end, then finds the key taken.
        let taken = sqlx::query(self.sql.text(
            "INSERT INTO {s}.unique_keys (key, operation) VALUES ($1, $2)
             ON CONFLICT (key) DO NOTHING",
        ))
        .persistent(self.sql.persistent())
        .bind(&unique.key)
        .bind(child.id.as_uuid())
        .execute(&mut *self.tx)
        .await
        .map_err(error::map)?
        .rows_affected()
            == 1;
        if !taken {
            // Held by an earlier operation: lock the key, then read its holder in a
            // statement after the lock (which sees what the submitter before committed).
            let holder: Uuid = sqlx::query_scalar(
                self.sql
                    .text("SELECT operation FROM {s}.unique_keys WHERE key = $1 FOR UPDATE"),
            )
            .persistent(self.sql.persistent())
            .bind(&unique.key)
            .fetch_one(&mut *self.tx)
            .await
            .map_err(error::map)?;
            let state = sqlx::query(self.sql.text(
                "SELECT status, completed_at, clock_timestamp() FROM {s}.operations WHERE id = $1",
            ))
            .persistent(self.sql.persistent())
            .bind(holder)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(error::map)?;
            if let Some(row) = state {
                let status: String = row.try_get(0).map_err(error::map)?;
                let completed_at: Option<DateTime<Utc>> = row.try_get(1).map_err(error::map)?;
                let now: DateTime<Utc> = row.try_get(2).map_err(error::map)?;
                if unique.scope.blocks(status.parse()?, completed_at, now) {
                    return Ok(Some(fascicle_api::OperationId::from_uuid(holder)));
                }
            }
            sqlx::query(
                self.sql
                    .text("UPDATE {s}.unique_keys SET operation = $2 WHERE key = $1"),
            )
            .persistent(self.sql.persistent())
            .bind(&unique.key)
            .bind(child.id.as_uuid())
            .execute(&mut *self.tx)
            .await
            .map_err(error::map)?;
        }
        self.insert_children_unchecked(std::slice::from_ref(child))
            .await?;
        Ok(None)
    }

    async fn commit_unchecked(mut self: Box<Self>) -> Result<()> {
        // A parent's `children_total` is the number of rows inserted for it here, never a
        // number the caller claims.
        let (parents, totals): (Vec<Uuid>, Vec<i64>) = self
            .children_per_parent
            .drain()
            .filter(|(_, (claimed, counted))| claimed != counted)
            .map(|(parent, (_, counted))| (parent, counted))
            .unzip();
        if !parents.is_empty() {
            sqlx::query(self.sql.text(
                "UPDATE {s}.operations AS p SET children_total = t.total
                 FROM unnest($1::uuid[], $2::bigint[]) AS t(id, total)
                 WHERE p.id = t.id",
            ))
            .persistent(self.sql.persistent())
            .bind(&parents)
            .bind(&totals)
            .execute(&mut *self.tx)
            .await
            .map_err(error::map)?;
        }
        self.tx.commit().await.map_err(error::map)
    }

    async fn rollback_unchecked(self: Box<Self>) -> Result<()> {
        self.tx.rollback().await.map_err(error::map)
    }
}

fascicle_api::checked_transaction!(PostgresTransaction);

#[cfg(test)]
mod tests {
    use super::{CLOCK_TOLERANCE_MICROS, on_server_clock};
    use chrono::{DateTime, TimeDelta, Utc};
    use fascicle_api::{ChildRecord, Error, OperationId};

    fn record(created_at: DateTime<Utc>, run_at: DateTime<Utc>) -> ChildRecord {
        ChildRecord {
            id: OperationId::new(),
            parent_id: None,
            kind: "k".into(),
            payload: serde_json::Value::Null,
            payload_json: "null".into(),
            priority: 0,
            run_at,
            serialization_key: None,
            max_attempts: 1,
            created_at,
            timeout: None,
            after: Vec::new(),
            dependents: Vec::new(),
        }
    }

    /// The `COPY` path's copy of the SQL rule, at its edges (the Postgres-specific tests
    /// check both paths end to end).
    #[test]
    fn a_record_is_kept_within_the_tolerance_and_rebased_outside_it() {
        let server = Utc::now();
        let us = |t: DateTime<Utc>| t.timestamp_micros();
        let delay = TimeDelta::seconds(30);
        let tolerance = TimeDelta::microseconds(CLOCK_TOLERANCE_MICROS);
        let one = TimeDelta::microseconds(1);
        // A right clock: prepared just before the server read its clock, or exactly as
        // far before as the tolerance allows. Kept as prepared, a past run_at too.
        for behind in [TimeDelta::zero(), TimeDelta::milliseconds(3), tolerance] {
            let created = server - behind;
            for run_at in [created, created + delay, created - delay] {
                assert_eq!(
                    on_server_clock(&record(created, run_at), us(server)).unwrap(),
                    (us(created), us(run_at)),
                    "{behind} behind"
                );
            }
        }
        // A wrong clock: ahead of the server at all, or behind by more than the
        // tolerance. Re-based on the server's clock with the same delay.
        for skew in [
            one,
            TimeDelta::seconds(60),
            -(tolerance + one),
            -TimeDelta::seconds(60),
        ] {
            let created = server + skew;
            for delay in [TimeDelta::zero(), delay, -delay] {
                assert_eq!(
                    on_server_clock(&record(created, created + delay), us(server)).unwrap(),
                    (us(server), us(server + delay)),
                    "{skew} skew, {delay} delay"
                );
            }
        }
    }

    #[test]
    fn a_delay_too_large_to_count_is_invalid_input() {
        let record = record(DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC);
        let refused = on_server_clock(&record, Utc::now().timestamp_micros());
        assert!(
            matches!(refused, Err(Error::InvalidInput(_))),
            "{refused:?}"
        );
    }
}
