//! The worker-side `Store` operations on PostgreSQL, each in one transaction. Claims use
//! `FOR UPDATE SKIP LOCKED`; every state change names the state (and lease token) it
//! expects; a parent's row lock serializes the completions of its last children.

use std::time::Duration;

use fascicle_api::{
    Applied, CancelReport, ChildCounters, ClaimRequest, ClaimedOperation, Completion, Error, Lease,
    LeaseStatus, LeaseToken, OperationId, Outcome, PruneReport, ReconcileReport, RescueReport,
    Result, Status, ZERO_CHILDREN_REASON, most_common_error, parent_outcome, parent_summary,
};
use fascicle_api::{messages, table};
use serde_json::Value;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::error;
use crate::schema::{COLUMNS, Sql};
use crate::store::operation_from_row;

trait Db<T> {
    fn db(self) -> Result<T>;
}

impl<T> Db<T> for sqlx::Result<T> {
    fn db(self) -> Result<T> {
        self.map_err(error::map)
    }
}

pub(crate) async fn claim(
    conn: &mut PgConnection,
    sql: &Sql,
    request: &ClaimRequest,
) -> Result<Vec<ClaimedOperation>> {
    let columns: Vec<String> = COLUMNS
        .split(',')
        .map(|c| format!("o.{}", c.trim()))
        .collect();
    let columns = columns.join(", ");
    let statement = sql.text(&format!(
        // One-per-key comes before the limit: the first ready operation of each key not
        // held by a processing one competes with the keyless ones for the `$1` places, so
        // a long run of one key never hides the work behind it.
        "WITH keyless AS (
             SELECT id, priority, run_at, seq FROM {{s}}.operations
             WHERE status = 'pending' AND payload IS NOT NULL AND run_at <= now()
               AND ($2::text[] IS NULL OR kind = ANY($2)) AND serialization_key IS NULL
             ORDER BY priority DESC, run_at, seq
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         ), first_of_each_key AS (
             SELECT DISTINCT ON (serialization_key) id, priority, run_at, seq
             FROM {{s}}.operations AS o
             WHERE status = 'pending' AND payload IS NOT NULL AND run_at <= now()
               AND ($2::text[] IS NULL OR kind = ANY($2)) AND serialization_key IS NOT NULL
               AND NOT EXISTS (
                    SELECT 1 FROM {{s}}.operations AS h
                    WHERE h.serialization_key = o.serialization_key AND h.status = 'processing')
             ORDER BY serialization_key, priority DESC, run_at, seq
         ), keyed AS (
             SELECT o.id, o.priority, o.run_at, o.seq FROM {{s}}.operations AS o
             WHERE o.id IN (SELECT id FROM first_of_each_key
                            ORDER BY priority DESC, run_at, seq LIMIT $1)
               AND o.status = 'pending'
             FOR UPDATE SKIP LOCKED
         ), picked AS (
             SELECT id FROM (SELECT * FROM keyless UNION ALL SELECT * FROM keyed) AS c
             ORDER BY priority DESC, run_at, seq
             LIMIT $1
         )
         UPDATE {{s}}.operations AS o
         SET status = 'processing', attempts = attempts + 1, worker_id = $3,
             lease_token = gen_random_uuid(),
             lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
         FROM picked WHERE o.id = picked.id
         RETURNING {columns}, o.lease_token, o.seq"
    ));
    let rows = sqlx::query(statement)
        .bind(request.limit as i64)
        .bind(request.kinds.as_deref())
        .bind(&request.worker_id)
        .bind(request.lease.as_secs_f64())
        .fetch_all(&mut *conn)
        .await
        .db()?;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in &rows {
        let operation = operation_from_row(row).db()?;
        let token: Uuid = row.try_get(22).db()?;
        let seq: i64 = row.try_get(23).db()?;
        claimed.push((
            seq,
            ClaimedOperation {
                operation,
                lease_token: LeaseToken::from_uuid(token),
            },
        ));
    }
    claimed.sort_by(|(sa, a), (sb, b)| {
        b.operation
            .priority
            .cmp(&a.operation.priority)
            .then(a.operation.run_at.cmp(&b.operation.run_at))
            .then(sa.cmp(sb))
    });
    Ok(claimed.into_iter().map(|(_, c)| c).collect())
}

/// Moves an operation to a terminal state (from `pending` or `processing`; under `token`
/// when one is given), then updates its parent's counters — the parent's row lock
/// serializes racing last children — and finalizes the parent when this was its last
/// open child. Returns whether the operation changed.
async fn finish(
    conn: &mut PgConnection,
    sql: &Sql,
    id: Uuid,
    token: Option<Uuid>,
    status: Status,
    error: Option<&str>,
    result: Option<&Value>,
) -> Result<bool> {
    let parent: Option<Option<Uuid>> = sqlx::query_scalar(sql.text(
        "UPDATE {s}.operations SET status = $3, error = $4, result = $5,
             worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
             cancel_requested = false, updated_at = now(), completed_at = now()
         WHERE id = $1 AND status IN ('pending', 'processing')
           AND ($2::uuid IS NULL OR (status = 'processing' AND lease_token = $2))
         RETURNING parent_id",
    ))
    .bind(id)
    .bind(token)
    .bind(status.as_str())
    .bind(error)
    .bind(result)
    .fetch_optional(&mut *conn)
    .await
    .db()?;
    let Some(parent) = parent else {
        return Ok(false);
    };
    if let Some(parent) = parent {
        let (completed, failed, cancelled) = match status {
            Status::Completed => (1i64, 0i64, 0i64),
            Status::Failed => (0, 1, 0),
            _ => (0, 0, 1),
        };
        let row = sqlx::query(sql.text(
            "UPDATE {s}.operations SET children_completed = children_completed + $2,
                 children_failed = children_failed + $3,
                 children_cancelled = children_cancelled + $4, updated_at = now()
             WHERE id = $1
             RETURNING children_total, children_completed, children_failed,
                       children_cancelled, status",
        ))
        .bind(parent)
        .bind(completed)
        .bind(failed)
        .bind(cancelled)
        .fetch_optional(&mut *conn)
        .await
        .db()?;
        if let Some(row) = row {
            let counters = counters_from(&row, 0)?;
            let status: String = row.try_get(4).db()?;
            if status == "pending" {
                finalize_parent(conn, sql, parent, &counters).await?;
            }
        }
    }
    Ok(true)
}

fn counters_from(row: &sqlx::postgres::PgRow, first: usize) -> Result<ChildCounters> {
    let get = |i: usize| -> Result<u64> { Ok(row.try_get::<i64, _>(first + i).db()? as u64) };
    Ok(ChildCounters {
        total: get(0)?,
        completed: get(1)?,
        failed: get(2)?,
        cancelled: get(3)?,
    })
}

/// Finalizes a pending parent whose counters say every child is terminal.
async fn finalize_parent(
    conn: &mut PgConnection,
    sql: &Sql,
    parent: Uuid,
    counters: &ChildCounters,
) -> Result<bool> {
    let Some(outcome) = parent_outcome(counters) else {
        return Ok(false);
    };
    let error = if outcome == Status::Failed {
        let errors: Vec<String> = sqlx::query_scalar(sql.text(
            "SELECT error FROM {s}.operations
             WHERE parent_id = $1 AND status = 'failed' AND error IS NOT NULL",
        ))
        .bind(parent)
        .fetch_all(&mut *conn)
        .await
        .db()?;
        most_common_error(errors.iter().map(String::as_str))
    } else {
        None
    };
    let done = sqlx::query(sql.text(
        "UPDATE {s}.operations SET status = $2, error = $3, result = $4,
             updated_at = now(), completed_at = now()
         WHERE id = $1 AND status = 'pending'",
    ))
    .bind(parent)
    .bind(outcome.as_str())
    .bind(error)
    .bind(parent_summary(counters))
    .execute(&mut *conn)
    .await
    .db()?;
    Ok(done.rows_affected() == 1)
}

pub(crate) async fn complete(
    conn: &mut PgConnection,
    sql: &Sql,
    completions: &[Completion],
) -> Result<Vec<Applied>> {
    // Lock every parent involved up front, in id order: two workers completing children
    // of the same batches then never wait on each other in opposite orders.
    let ids: Vec<Uuid> = completions.iter().map(|c| *c.id.as_uuid()).collect();
    sqlx::query(sql.text(
        "SELECT 1 FROM {s}.operations
         WHERE id IN (SELECT parent_id FROM {s}.operations
                      WHERE id = ANY($1) AND parent_id IS NOT NULL)
         ORDER BY id FOR UPDATE",
    ))
    .bind(&ids)
    .execute(&mut *conn)
    .await
    .db()?;
    // Every completion in one statement: the fenced updates, then each touched parent's
    // counters moved by its children's outcomes in aggregate (O(1) per child).
    let n = completions.len();
    let mut tokens = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut results: Vec<Option<Value>> = Vec::with_capacity(n);
    let mut errors: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut run_ats: Vec<Option<chrono::DateTime<chrono::Utc>>> = Vec::with_capacity(n);
    // The error a retry stores instead when a cancel was requested (`retry_after_cancel`).
    let mut cancel_errors: Vec<Option<String>> = Vec::with_capacity(n);
    for c in completions {
        tokens.push(*c.lease_token.as_uuid());
        let (status, result, error, run_at) = match &c.outcome {
            Outcome::Completed(value) => (Status::Completed, Some(value.clone()), None, None),
            Outcome::Failed(error) => (Status::Failed, None, Some(error.as_str()), None),
            Outcome::Cancelled(reason) => (Status::Cancelled, None, Some(reason.as_str()), None),
            Outcome::Retry { error, run_at } => {
                (Status::Pending, None, Some(error.as_str()), Some(*run_at))
            }
        };
        statuses.push(status.as_str());
        cancel_errors.push(
            matches!(c.outcome, Outcome::Retry { .. })
                .then(|| messages::cancelled_instead_of_retry(error.unwrap_or_default())),
        );
        results.push(result);
        errors.push(error);
        run_ats.push(run_at);
    }
    let rows = sqlx::query(sql.text(
        "WITH input AS (
             SELECT *, (status = 'pending') AS retry
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::text[],
                         $6::timestamptz[], $7::text[])
                 AS t(id, token, status, result, error, run_at, cancel_error)),
         updated AS (
             -- A retry of an operation whose cancel was requested is `retry_after_cancel`:
             -- cancelled, not re-queued.
             UPDATE {s}.operations AS o
             SET status = CASE WHEN i.retry AND o.cancel_requested THEN 'cancelled'
                               ELSE i.status END,
                 result = i.result,
                 error = CASE WHEN i.retry AND o.cancel_requested THEN i.cancel_error
                              ELSE i.error END,
                 run_at = CASE WHEN i.retry AND NOT o.cancel_requested THEN i.run_at
                               ELSE o.run_at END,
                 worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
                 updated_at = now(),
                 completed_at = CASE WHEN i.retry AND NOT o.cancel_requested THEN NULL
                                     ELSE now() END
             FROM input AS i
             WHERE o.id = i.id AND o.status = 'processing' AND o.lease_token = i.token
             RETURNING o.id, o.parent_id, o.status),
         moved AS (
             SELECT parent_id,
                    count(*) FILTER (WHERE status = 'completed') AS completed,
                    count(*) FILTER (WHERE status = 'failed') AS failed,
                    count(*) FILTER (WHERE status = 'cancelled') AS cancelled
             FROM updated WHERE parent_id IS NOT NULL AND status <> 'pending'
             GROUP BY parent_id),
         parents AS (
             UPDATE {s}.operations AS p
             SET children_completed = p.children_completed + m.completed,
                 children_failed = p.children_failed + m.failed,
                 children_cancelled = p.children_cancelled + m.cancelled, updated_at = now()
             FROM moved AS m WHERE p.id = m.parent_id
             RETURNING p.id, p.children_total, p.children_completed, p.children_failed,
                       p.children_cancelled, p.status)
         SELECT false AS is_parent, id, 0::bigint, 0::bigint, 0::bigint, 0::bigint, status
             FROM updated
         UNION ALL
         SELECT true, id, children_total, children_completed, children_failed,
                children_cancelled, status
             FROM parents",
    ))
    .bind(&ids)
    .bind(&tokens)
    .bind(&statuses)
    .bind(&results)
    .bind(&errors)
    .bind(&run_ats)
    .bind(&cancel_errors)
    .fetch_all(&mut *conn)
    .await
    .db()?;
    let mut applied_ids = std::collections::HashSet::new();
    for row in &rows {
        let is_parent: bool = row.try_get(0).db()?;
        let id: Uuid = row.try_get(1).db()?;
        if !is_parent {
            applied_ids.insert(id);
            continue;
        }
        let counters = counters_from(row, 2)?;
        let status: String = row.try_get(6).db()?;
        if status == "pending" {
            finalize_parent(conn, sql, id, &counters).await?;
        }
    }
    Ok(ids
        .iter()
        .map(|id| {
            if applied_ids.contains(id) {
                Applied::Applied
            } else {
                Applied::LeaseLost
            }
        })
        .collect())
}

pub(crate) async fn heartbeat(
    conn: &mut PgConnection,
    sql: &Sql,
    leases: &[Lease],
    lease: Duration,
) -> Result<Vec<LeaseStatus>> {
    let ids: Vec<Uuid> = leases.iter().map(|l| *l.id.as_uuid()).collect();
    let tokens: Vec<Uuid> = leases.iter().map(|l| *l.token.as_uuid()).collect();
    let rows = sqlx::query(sql.text(
        "UPDATE {s}.operations AS o
         SET lease_expires_at = now() + make_interval(secs => $3), updated_at = now()
         FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
         WHERE o.id = l.id AND o.status = 'processing' AND o.lease_token = l.token
         RETURNING o.id, o.cancel_requested",
    ))
    .bind(&ids)
    .bind(&tokens)
    .bind(lease.as_secs_f64())
    .fetch_all(&mut *conn)
    .await
    .db()?;
    let mut held = std::collections::HashMap::new();
    for row in rows {
        let id: Uuid = row.try_get(0).db()?;
        let cancel: bool = row.try_get(1).db()?;
        held.insert(id, cancel);
    }
    Ok(ids
        .iter()
        .map(|id| LeaseStatus {
            held: held.contains_key(id),
            cancel_requested: held.get(id).copied().unwrap_or(false),
        })
        .collect())
}

pub(crate) async fn release(conn: &mut PgConnection, sql: &Sql, leases: &[Lease]) -> Result<u64> {
    let ids: Vec<Uuid> = leases.iter().map(|l| *l.id.as_uuid()).collect();
    let tokens: Vec<Uuid> = leases.iter().map(|l| *l.token.as_uuid()).collect();
    let mut released = sqlx::query(sql.text(
        "UPDATE {s}.operations AS o
         SET status = 'pending', attempts = greatest(attempts - 1, 0), worker_id = NULL,
             lease_token = NULL, lease_expires_at = NULL, updated_at = now()
         FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
         WHERE o.id = l.id AND o.status = 'processing' AND o.lease_token = l.token
           AND NOT o.cancel_requested",
    ))
    .bind(&ids)
    .bind(&tokens)
    .execute(&mut *conn)
    .await
    .db()?
    .rows_affected();
    // `release_after_cancel`: the held operations whose cancel was requested end cancelled.
    let cancelled: Vec<(Uuid, Uuid)> = sqlx::query_as(sql.text(
        "SELECT o.id, o.lease_token FROM {s}.operations AS o
         JOIN unnest($1::uuid[], $2::uuid[]) AS l(id, token)
           ON o.id = l.id AND o.lease_token = l.token
         WHERE o.status = 'processing' AND o.cancel_requested",
    ))
    .bind(&ids)
    .bind(&tokens)
    .fetch_all(&mut *conn)
    .await
    .db()?;
    for (id, token) in cancelled {
        let error = Some(messages::CANCELLED_AT_RELEASE);
        if finish(conn, sql, id, Some(token), Status::Cancelled, error, None).await? {
            released += 1;
        }
    }
    Ok(released)
}

pub(crate) async fn rescue(conn: &mut PgConnection, sql: &Sql) -> Result<RescueReport> {
    let requeued = sqlx::query(sql.text(
        "UPDATE {s}.operations SET status = 'pending', error = $1, worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
             run_at = now(), updated_at = now()
         WHERE status = 'processing' AND lease_expires_at < now() AND attempts < max_attempts
           AND NOT cancel_requested",
    ))
    .bind(messages::LEASE_EXPIRED)
    .execute(&mut *conn)
    .await
    .db()?
    .rows_affected();
    // What is still expired is `rescue_exhausted` or `rescue_after_cancel`.
    let ending: Vec<(Uuid, i32, i32, bool)> = sqlx::query_as(sql.text(
        "SELECT id, attempts, max_attempts, cancel_requested FROM {s}.operations
         WHERE status = 'processing' AND lease_expires_at < now()
         FOR UPDATE SKIP LOCKED",
    ))
    .fetch_all(&mut *conn)
    .await
    .db()?;
    let mut report = RescueReport {
        requeued,
        ..RescueReport::default()
    };
    for (id, attempts, max_attempts, cancel) in ending {
        let rescue = table::rescue_of(cancel, attempts as u32, max_attempts as u32);
        let (status, error) = if rescue == table::RESCUE_AFTER_CANCEL {
            (Status::Cancelled, messages::CANCELLED_AT_RESCUE.to_owned())
        } else {
            (
                Status::Failed,
                messages::lease_expired_on_last_attempt(attempts as u32),
            )
        };
        if finish(conn, sql, id, None, status, Some(&error), None).await? {
            if status == Status::Cancelled {
                report.cancelled += 1;
            } else {
                report.failed += 1;
            }
        }
    }
    Ok(report)
}

pub(crate) async fn reconcile(conn: &mut PgConnection, sql: &Sql) -> Result<ReconcileReport> {
    let stranded: Vec<Uuid> = sqlx::query_scalar(sql.text(
        "SELECT id FROM {s}.operations AS p
         WHERE payload IS NULL AND status = 'pending'
           AND NOT EXISTS (SELECT 1 FROM {s}.operations AS c
                           WHERE c.parent_id = p.id AND c.status IN ('pending', 'processing'))
         FOR UPDATE SKIP LOCKED",
    ))
    .fetch_all(&mut *conn)
    .await
    .db()?;
    let mut report = ReconcileReport::default();
    for parent in stranded {
        let row = sqlx::query(sql.text(
            "SELECT count(*), count(*) FILTER (WHERE status = 'completed'),
                    count(*) FILTER (WHERE status = 'failed'),
                    count(*) FILTER (WHERE status = 'cancelled')
             FROM {s}.operations WHERE parent_id = $1",
        ))
        .bind(parent)
        .fetch_one(&mut *conn)
        .await
        .db()?;
        let counters = counters_from(&row, 0)?;
        if counters.total == 0 {
            report.empty_parents_failed += sqlx::query(sql.text(
                "UPDATE {s}.operations SET status = 'failed', error = $2, children_total = 0,
                     updated_at = now(), completed_at = now()
                 WHERE id = $1 AND status = 'pending'",
            ))
            .bind(parent)
            .bind(ZERO_CHILDREN_REASON)
            .execute(&mut *conn)
            .await
            .db()?
            .rows_affected();
            continue;
        }
        sqlx::query(sql.text(
            "UPDATE {s}.operations SET children_total = $2, children_completed = $3,
                 children_failed = $4, children_cancelled = $5
             WHERE id = $1",
        ))
        .bind(parent)
        .bind(counters.total as i64)
        .bind(counters.completed as i64)
        .bind(counters.failed as i64)
        .bind(counters.cancelled as i64)
        .execute(&mut *conn)
        .await
        .db()?;
        if finalize_parent(conn, sql, parent, &counters).await? {
            report.parents_finalized += 1;
        }
    }
    Ok(report)
}

async fn cancel_one(
    conn: &mut PgConnection,
    sql: &Sql,
    id: Uuid,
    status: &str,
    report: &mut CancelReport,
) -> Result<()> {
    match status {
        "pending" => {
            if finish(
                conn,
                sql,
                id,
                None,
                Status::Cancelled,
                Some(messages::CANCELLED_BEFORE_RUN),
                None,
            )
            .await?
            {
                report.cancelled += 1;
            }
        }
        "processing" => {
            sqlx::query(sql.text(
                "UPDATE {s}.operations SET cancel_requested = true, updated_at = now()
                 WHERE id = $1 AND status = 'processing'",
            ))
            .bind(id)
            .execute(&mut *conn)
            .await
            .db()?;
            report.signalled += 1;
        }
        _ => report.already_terminal += 1,
    }
    Ok(())
}

pub(crate) async fn cancel(
    conn: &mut PgConnection,
    sql: &Sql,
    id: OperationId,
) -> Result<CancelReport> {
    let found: Option<(String, bool)> = sqlx::query_as(
        sql.text("SELECT status, payload IS NULL FROM {s}.operations WHERE id = $1 FOR UPDATE"),
    )
    .bind(id.as_uuid())
    .fetch_optional(&mut *conn)
    .await
    .db()?;
    let Some((status, is_parent)) = found else {
        return Err(Error::NotFound(format!("operation {id} does not exist")));
    };
    let mut report = CancelReport::default();
    if is_parent {
        let children: Vec<(Uuid, String)> = sqlx::query_as(sql.text(
            "SELECT id, status FROM {s}.operations WHERE parent_id = $1 ORDER BY seq FOR UPDATE",
        ))
        .bind(id.as_uuid())
        .fetch_all(&mut *conn)
        .await
        .db()?;
        for (child, status) in children {
            cancel_one(conn, sql, child, &status, &mut report).await?;
        }
    } else {
        cancel_one(conn, sql, *id.as_uuid(), &status, &mut report).await?;
    }
    Ok(report)
}

pub(crate) async fn retry_batch(
    conn: &mut PgConnection,
    sql: &Sql,
    parent: OperationId,
) -> Result<u64> {
    let is_parent: Option<bool> = sqlx::query_scalar(
        sql.text("SELECT payload IS NULL FROM {s}.operations WHERE id = $1 FOR UPDATE"),
    )
    .bind(parent.as_uuid())
    .fetch_optional(&mut *conn)
    .await
    .db()?;
    match is_parent {
        None => return Err(Error::NotFound(format!("batch {parent} does not exist"))),
        Some(false) => {
            return Err(Error::InvalidInput(format!(
                "{parent} is an operation, not a batch"
            )));
        }
        Some(true) => {}
    }
    let (failed, cancelled): (i64, i64) = sqlx::query_as(sql.text(
        "WITH retried AS (
             UPDATE {s}.operations AS o SET status = 'pending', attempts = 0, error = NULL,
                 result = NULL, cancel_requested = false, run_at = now(), updated_at = now(),
                 completed_at = NULL
             FROM (SELECT id, status FROM {s}.operations
                   WHERE parent_id = $1 AND status IN ('failed', 'cancelled') FOR UPDATE) AS old
             WHERE o.id = old.id
             RETURNING old.status AS was)
         SELECT count(*) FILTER (WHERE was = 'failed'), count(*) FILTER (WHERE was = 'cancelled')
         FROM retried",
    ))
    .bind(parent.as_uuid())
    .fetch_one(&mut *conn)
    .await
    .db()?;
    if failed + cancelled == 0 {
        return Err(Error::Conflict(format!(
            "batch {parent} has no failed or cancelled children to retry"
        )));
    }
    sqlx::query(sql.text(
        "UPDATE {s}.operations SET status = 'pending', error = NULL, result = NULL,
             children_failed = children_failed - $2, children_cancelled = children_cancelled - $3,
             updated_at = now(), completed_at = NULL
         WHERE id = $1",
    ))
    .bind(parent.as_uuid())
    .bind(failed)
    .bind(cancelled)
    .execute(&mut *conn)
    .await
    .db()?;
    Ok((failed + cancelled) as u64)
}

pub(crate) async fn prune(
    conn: &mut PgConnection,
    sql: &Sql,
    before: chrono::DateTime<chrono::Utc>,
) -> Result<PruneReport> {
    let row = sqlx::query(sql.text(
        "WITH parents AS (
             DELETE FROM {s}.operations WHERE payload IS NULL AND completed_at < $1
               AND status IN ('completed', 'failed', 'cancelled')
             RETURNING id),
         children AS (
             DELETE FROM {s}.operations WHERE parent_id IN (SELECT id FROM parents)
             RETURNING 1),
         standalone AS (
             DELETE FROM {s}.operations WHERE payload IS NOT NULL AND parent_id IS NULL
               AND completed_at < $1 AND status IN ('completed', 'failed', 'cancelled')
             RETURNING 1)
         SELECT (SELECT count(*) FROM parents), (SELECT count(*) FROM children),
                (SELECT count(*) FROM standalone)",
    ))
    .bind(before)
    .fetch_one(&mut *conn)
    .await
    .db()?;
    let batches: i64 = row.try_get(0).db()?;
    let children: i64 = row.try_get(1).db()?;
    let standalone: i64 = row.try_get(2).db()?;
    Ok(PruneReport {
        operations: (children + standalone) as u64,
        batches: batches as u64,
    })
}
