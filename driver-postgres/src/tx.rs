//! `PostgresTransaction` and the insert statements shared with caller transactions.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fascicle_api::{ChildRecord, Error, ParentRecord, Result, Transaction, messages};
use sqlx::{PgConnection, Postgres};
use uuid::Uuid;

use crate::error;
use crate::schema::{Sql, sql};

/// Children per `INSERT … SELECT FROM unnest(…)` statement.
const CHUNK: usize = 50_000;

/// Inserts a parent. With `skip_existing`, an id already stored is not an error and the
/// result says whether the row was inserted (for caller transactions, which a unique
/// violation would abort).
pub(crate) async fn insert_parent(
    conn: &mut PgConnection,
    statements: &Sql,
    parent: &ParentRecord,
    skip_existing: bool,
) -> Result<bool> {
    let statement = if skip_existing {
        &statements.insert_parent_if_absent
    } else {
        &statements.insert_parent
    };
    let done = sqlx::query(sql(statement))
        .bind(parent.id.as_uuid())
        .bind(&parent.kind)
        .bind(&parent.metadata)
        .bind(parent.created_at)
        .bind(parent.children_total as i64)
        .execute(conn)
        .await
        .map_err(error::map)?;
    Ok(done.rows_affected() == 1)
}

/// Batches at least this large go through binary `COPY`; smaller ones through one
/// `INSERT … SELECT FROM unnest(…)`, which costs less to start.
const COPY_THRESHOLD: usize = 64;

/// Inserts children in a constant number of round trips: binary `COPY` for large
/// batches, else one statement per [`CHUNK`]; either way one `NOTIFY` is queued, which
/// PostgreSQL delivers only on commit.
pub(crate) async fn insert_children(
    conn: &mut PgConnection,
    statements: &Sql,
    children: &[ChildRecord],
) -> Result<()> {
    if children.len() >= COPY_THRESHOLD {
        return copy_children(conn, statements, children).await;
    }
    insert_children_unnest(conn, statements, children).await
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Encodes children in PostgreSQL's binary `COPY` format, in the column order of
/// `Sql::copy_children`.
fn encode_copy(children: &[ChildRecord]) -> Vec<u8> {
    fn field(buf: &mut Vec<u8>, bytes: &[u8]) {
        buf.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        buf.extend_from_slice(bytes);
    }
    fn null(buf: &mut Vec<u8>) {
        buf.extend_from_slice(&(-1i32).to_be_bytes());
    }
    fn timestamp(buf: &mut Vec<u8>, at: DateTime<Utc>) {
        field(
            buf,
            &(at.timestamp_micros() - PG_EPOCH_OFFSET_MICROS).to_be_bytes(),
        );
    }
    let estimate: usize = children
        .iter()
        .map(|c| 160 + c.kind.len() + c.payload_json.len())
        .sum();
    let mut buf = Vec::with_capacity(21 + estimate);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes()); // flags
    buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    for c in children {
        buf.extend_from_slice(&10i16.to_be_bytes());
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
        timestamp(&mut buf, c.run_at);
        timestamp(&mut buf, c.created_at);
        timestamp(&mut buf, c.created_at);
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    buf
}

async fn copy_children(
    conn: &mut PgConnection,
    statements: &Sql,
    children: &[ChildRecord],
) -> Result<()> {
    let data = encode_copy(children);
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
        let mut run_ats: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut created: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        for child in chunk {
            ids.push(*child.id.as_uuid());
            kinds.push(child.kind.as_str());
            payloads.push(child.payload_json.as_str());
            parents.push(child.parent_id.map(Uuid::from));
            priorities.push(child.priority);
            keys.push(child.serialization_key.as_deref());
            attempts.push(child.max_attempts as i32);
            run_ats.push(child.run_at);
            created.push(child.created_at);
        }
        let inserted: i64 = sqlx::query_scalar(sql(&statements.insert_children))
            .bind(&ids)
            .bind(&kinds)
            .bind(&payloads)
            .bind(&parents)
            .bind(&priorities)
            .bind(&keys)
            .bind(&attempts)
            .bind(&run_ats)
            .bind(&created)
            .bind(&statements.channel)
            .fetch_one(&mut *conn)
            .await
            .map_err(error::map)?;
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
}

impl PostgresTransaction {
    pub(crate) fn new(tx: sqlx::Transaction<'static, Postgres>, sql: Arc<Sql>) -> Self {
        Self {
            tx,
            sql,
            children_per_parent: HashMap::new(),
        }
    }
}

#[async_trait]
impl Transaction for PostgresTransaction {
    async fn insert_parent(&mut self, parent: &ParentRecord) -> Result<()> {
        insert_parent(&mut self.tx, &self.sql, parent, false).await?;
        let claimed = parent.children_total as i64;
        self.children_per_parent
            .insert(*parent.id.as_uuid(), (claimed, 0));
        Ok(())
    }

    async fn insert_child(&mut self, child: &ChildRecord) -> Result<()> {
        self.insert_children(std::slice::from_ref(child)).await
    }

    async fn insert_children(&mut self, children: &[ChildRecord]) -> Result<()> {
        for child in children {
            if let Some(parent) = child.parent_id
                && !self.children_per_parent.contains_key(parent.as_uuid())
            {
                return Err(Error::InvalidInput(
                    messages::parent_not_in_this_transaction(child.id, parent),
                ));
            }
        }
        insert_children(&mut self.tx, &self.sql, children).await?;
        for parent in children.iter().filter_map(|c| c.parent_id) {
            if let Some((_, counted)) = self.children_per_parent.get_mut(parent.as_uuid()) {
                *counted += 1;
            }
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
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
            .bind(&parents)
            .bind(&totals)
            .execute(&mut *self.tx)
            .await
            .map_err(error::map)?;
        }
        self.tx.commit().await.map_err(error::map)
    }

    async fn rollback(self: Box<Self>) -> Result<()> {
        self.tx.rollback().await.map_err(error::map)
    }
}
