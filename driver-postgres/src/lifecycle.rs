//! The worker-side `Store` operations on PostgreSQL, each in one transaction. Claims use
//! `FOR UPDATE SKIP LOCKED`; every state change names the state (and lease token) it
//! expects; a parent's row lock serializes the completions of its last children.

use std::time::Duration;

use fascicle_api::{
    Applied, CancelReport, ChildCounters, ClaimRequest, ClaimedOperation, Completion, Error, Lease,
    LeaseStatus, LeaseToken, OperationId, Outcome, PruneReport, ReconcileReport, RescueReport,
    Result, Status, ZERO_CHILDREN_REASON, parent_outcome, parent_summary, representative_error,
};
use fascicle_api::{BatchPlan, FailurePolicy, messages, table, workflow};
use std::collections::HashSet;

use serde_json::Value;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::error;
use crate::schema::{COLUMN_COUNT, COLUMNS, Sql};
use crate::store::operation_from_row;

trait Db<T> {
    fn db(self) -> Result<T>;
}

impl<T> Db<T> for sqlx::Result<T> {
    fn db(self) -> Result<T> {
        self.map_err(error::map)
    }
}

/// Claims for `request`. With `check_limits`, the kinds' limits are read first
/// (`fascicle_api::flow`); returns the claimed operations and whether any limit is stored
/// (the caller skips the read for a while when none is).
///
/// One statement claims from every kind at once, in claim order across them (priority,
/// then `run_at`, then submission) with one operation per serialization key: a named kind
/// is a lane of its own (`operations_ready_by_kind`, so a paused or limited kind's backlog
/// is never read past), capped by the room of a limited kind; a claim of any kind also
/// scans the shared index for the kinds without a limit.
pub(crate) async fn claim(
    conn: &mut PgConnection,
    sql: &Sql,
    request: &ClaimRequest,
    check_limits: bool,
) -> Result<(Vec<ClaimedOperation>, bool)> {
    let mut limits_stored = false;
    // Limited kinds this claim locked, with their room and what it needs to record starts.
    let mut locked: Vec<(StoredLimit, usize)> = Vec::new();
    // Limited kinds with no room (not claimed at all).
    let mut full: HashSet<String> = HashSet::new();
    if check_limits {
        // The recount after the lock needs a snapshot per statement: the claim's
        // transaction is READ COMMITTED (`STORE_BEGIN`).
        let limited = limited_rooms(conn, sql, request.kinds.as_deref()).await?;
        limits_stored = limited.stored;
        full = limited.full;
        if !limited.open.is_empty() {
            locked = lock_limited(conn, sql, &limited.open).await?;
        }
    }
    let mut lanes: Vec<Lane> = Vec::new();
    match &request.kinds {
        Some(kinds) => {
            let mut seen = HashSet::new();
            for kind in kinds {
                if !seen.insert(kind.as_str()) || full.contains(kind) {
                    continue;
                }
                match locked.iter().find(|(l, _)| l.kind == *kind) {
                    Some((_, room)) if *room == 0 => {}
                    Some((_, room)) => lanes.push(Lane::new(kind, *room, true)),
                    None => lanes.push(Lane::new(kind, usize::MAX, false)),
                }
            }
        }
        None => {
            for (limit, room) in &locked {
                if *room > 0 {
                    lanes.push(Lane::new(&limit.kind, *room, true));
                }
            }
        }
    }
    let any_kind = request.kinds.is_none();
    let mut claimed = Vec::with_capacity(request.limit);
    if any_kind || !lanes.is_empty() {
        claim_lanes(conn, sql, request, any_kind, &mut lanes, &mut claimed).await?;
    }
    for (limit, _) in &locked {
        let started = lanes
            .iter()
            .find(|lane| lane.kind == limit.kind)
            .map_or(0, |lane| lane.claimed);
        if started > 0 && limit.limit.rate.is_some() {
            let kept = limit
                .limit
                .record_starts(&limit.recent_starts, started, limit.now);
            sqlx::query(sql.text("UPDATE {s}.kind_limits SET recent_starts = $2 WHERE kind = $1"))
                .persistent(sql.persistent())
                .bind(&limit.kind)
                .bind(&kept)
                .execute(&mut *conn)
                .await
                .db()?;
        }
    }
    claimed.sort_by(|(sa, a), (sb, b)| {
        b.operation
            .priority
            .cmp(&a.operation.priority)
            .then(a.operation.run_at.cmp(&b.operation.run_at))
            .then(sa.cmp(sb))
    });
    Ok((claimed.into_iter().map(|(_, c)| c).collect(), limits_stored))
}

/// One kind a claim scans on its own: at most `cap` of it (a limited kind's room), and
/// whether this claim holds its limit's lock (a kind it does not hold is claimed only
/// while no limit is stored for it).
struct Lane {
    kind: String,
    cap: usize,
    locked: bool,
    claimed: usize,
}

impl Lane {
    fn new(kind: &str, cap: usize, locked: bool) -> Self {
        Self {
            kind: kind.to_owned(),
            cap,
            locked,
            claimed: 0,
        }
    }
}

/// The limited kinds as a claim first reads them, without a lock: a kind whose count shows
/// no room has none (its count can only fall before this claim could lock it), so a kind
/// at its limit costs a claim one read, not a wait on its lock.
struct LimitedRooms {
    /// Whether any limit is stored, of any kind.
    stored: bool,
    /// The requested kinds that may have room, in lock (name) order.
    open: Vec<String>,
    /// The requested kinds that have none.
    full: HashSet<String>,
}

/// One stored limit as read in a claim.
struct StoredLimit {
    kind: String,
    limit: fascicle_api::KindLimit,
    recent_starts: Vec<chrono::DateTime<chrono::Utc>>,
    running: i64,
    now: chrono::DateTime<chrono::Utc>,
}

impl StoredLimit {
    fn room(&self) -> usize {
        self.limit
            .room(self.running as u64, &self.recent_starts, self.now)
    }
}

const READ_LIMITS: &str = "SELECT l.kind, l.max_running, l.rate_starts, l.rate_period_us,
        l.recent_starts,
        -- A worker's id is set exactly while processing: the predicate of the index of
        -- each kind's running rows, which no other statement states.
        (SELECT count(*) FROM {s}.operations AS o
         WHERE o.kind = l.kind AND o.worker_id IS NOT NULL AND o.status = 'processing'),
        clock_timestamp()
    FROM {s}.kind_limits AS l";

fn stored_limit(row: &sqlx::postgres::PgRow) -> Result<StoredLimit> {
    let running: Option<i32> = row.try_get(1).db()?;
    let starts: Option<i32> = row.try_get(2).db()?;
    let period_us: Option<i64> = row.try_get(3).db()?;
    Ok(StoredLimit {
        kind: row.try_get(0).db()?,
        limit: limit_from_columns(running, starts, period_us),
        recent_starts: row.try_get(4).db()?,
        running: row.try_get(5).db()?,
        now: row.try_get(6).db()?,
    })
}

/// A stored limit from its columns (`max_running`, `rate_starts`, `rate_period_us`).
pub(crate) fn limit_from_columns(
    running: Option<i32>,
    starts: Option<i32>,
    period_us: Option<i64>,
) -> fascicle_api::KindLimit {
    fascicle_api::KindLimit::from_stored(running.map(i64::from), starts.map(i64::from), period_us)
}

async fn limited_rooms(
    conn: &mut PgConnection,
    sql: &Sql,
    kinds: Option<&[String]>,
) -> Result<LimitedRooms> {
    let rows = sqlx::query(sql.text(&format!("{READ_LIMITS} ORDER BY l.kind")))
        .persistent(sql.persistent())
        .fetch_all(&mut *conn)
        .await
        .db()?;
    let (mut open, mut full) = (Vec::new(), HashSet::new());
    for row in &rows {
        let stored = stored_limit(row)?;
        if !kinds.is_none_or(|kinds| kinds.contains(&stored.kind)) {
            continue;
        }
        if stored.room() > 0 {
            open.push(stored.kind);
        } else {
            full.insert(stored.kind);
        }
    }
    Ok(LimitedRooms {
        stored: !rows.is_empty(),
        open,
        full,
    })
}

/// Locks the limit rows of `open` (in name order) — every claim that may start a limited
/// kind waits for the one before it to commit — then counts each kind's `processing`
/// operations afresh (a statement after the lock sees what the claim before committed).
/// Returns each locked kind's limit with its room; a kind whose limit was removed
/// meanwhile is not among them (it is claimed as a kind without a limit).
async fn lock_limited(
    conn: &mut PgConnection,
    sql: &Sql,
    open: &[String],
) -> Result<Vec<(StoredLimit, usize)>> {
    let locked: Vec<String> = sqlx::query_scalar(
        sql.text("SELECT kind FROM {s}.kind_limits WHERE kind = ANY($1) ORDER BY kind FOR UPDATE"),
    )
    .persistent(sql.persistent())
    .bind(open)
    .fetch_all(&mut *conn)
    .await
    .db()?;
    let rows = sqlx::query(sql.text(&format!(
        "{READ_LIMITS} WHERE l.kind = ANY($1) ORDER BY l.kind"
    )))
    .persistent(sql.persistent())
    .bind(&locked)
    .fetch_all(&mut *conn)
    .await
    .db()?;
    rows.iter()
        .map(|row| {
            let stored = stored_limit(row)?;
            let room = stored.room();
            Ok((stored, room))
        })
        .collect()
}

/// The advisory lock every claim statement takes shared (`{s}` spliced as text): a
/// `set_limit` takes it exclusively after its commit, waiting out the claims in flight
/// that read the kinds' limits before the new one existed.
pub(crate) const LIMITS_GATE: &str = "hashtext('fascicle kind limits {s}')";

/// Claims at most `request.limit` ready operations into `claimed`, each with its `seq`:
/// from each of `lanes` (at most its cap) and, with `any_kind`, from every kind without
/// a limit.
async fn claim_lanes(
    conn: &mut PgConnection,
    sql: &Sql,
    request: &ClaimRequest,
    any_kind: bool,
    lanes: &mut [Lane],
    claimed: &mut Vec<(i64, ClaimedOperation)>,
) -> Result<()> {
    let columns: Vec<String> = COLUMNS
        .split(',')
        .map(|c| format!("o.{}", c.trim()))
        .collect();
    let columns = columns.join(", ");
    // The rules on each row read — a held key, and in the shared scan a paused or limited
    // kind — are scalar subqueries (a probe of a small index per row read), not `NOT
    // EXISTS`: PostgreSQL flattens that into an anti-join, and once the table was
    // analysed it planned the shared scan as a merge anti-join of every ready row (read
    // in kind order) with the paused kinds, then a sort of them all — 5,153 buffers to
    // claim 128 of 100,000 (tests/plans.rs); as probes, the only plan left is the ordered
    // index scan that stops at the limit.
    let ready = "status = 'pending' AND payload IS NOT NULL AND waiting_on = 0
               AND run_at <= now()
               AND (serialization_key IS NULL OR (
                    SELECT true FROM {s}.operations AS h
                    WHERE h.serialization_key = o.serialization_key AND h.status = 'processing'
                    LIMIT 1) IS NULL)";
    let order = "priority DESC, run_at, seq";
    // The shared scan and the lanes each lock what they read (FOR UPDATE SKIP LOCKED, so
    // concurrent claimers take disjoint rows); the rows read past the limit stay locked
    // until this transaction commits, a moment later.
    //
    // One ordered scan with the limit, like the raw bound, then one per key among the
    // candidates. When several candidates shared a key, the limit was reached with fewer
    // claimed: claim again in the same transaction for the room left — the keys just
    // claimed are held now (by this transaction's own rows), so their other operations
    // drop out and the work behind them is reached (one-per-key before the limit). A
    // form that applied the rule inside the scan drained 2.5x slower.
    let statement = format!(
        "WITH shared AS (
             SELECT id, serialization_key, priority, run_at, seq FROM {{s}}.operations AS o
             WHERE $5 AND {ready}
               -- Names the predicate of operations_claimable, the index only this scan uses.
               AND run_at > '-infinity'
               AND (SELECT true FROM {{s}}.paused_kinds AS pk WHERE pk.kind = o.kind) IS NULL
               AND (SELECT true FROM {{s}}.kind_limits AS kl WHERE kl.kind = o.kind) IS NULL
             ORDER BY {order}
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         ), lanes AS (
             SELECT c.* FROM unnest($2::text[], $6::int8[], $7::bool[]) AS k(kind, cap, locked)
             CROSS JOIN LATERAL (
                 SELECT id, serialization_key, priority, run_at, seq FROM {{s}}.operations AS o
                 WHERE o.kind = k.kind AND {ready}
                 -- Only `operations_ready_by_kind` serves it (the shared index's predicate
                 -- is not stated here): the scan starts at the kind's first ready row.
                 ORDER BY {order}
                 LIMIT least(k.cap, $1)
                 FOR UPDATE SKIP LOCKED) AS c
             WHERE NOT EXISTS (SELECT 1 FROM {{s}}.paused_kinds AS pk WHERE pk.kind = k.kind)
               AND (k.locked OR NOT EXISTS (
                    SELECT 1 FROM {{s}}.kind_limits AS kl WHERE kl.kind = k.kind))
         ), candidates AS (
             SELECT * FROM (SELECT * FROM shared UNION ALL SELECT * FROM lanes) AS u
             ORDER BY {order}
             LIMIT $1
         ), picked AS (
             SELECT id FROM (
                 SELECT id, serialization_key, row_number() OVER (
                     PARTITION BY serialization_key ORDER BY {order}) AS rank
                 FROM candidates) AS ranked
             WHERE serialization_key IS NULL OR rank = 1
         ), gate AS (
             SELECT pg_advisory_xact_lock_shared({LIMITS_GATE})
         )
         UPDATE {{s}}.operations AS o
         SET status = 'processing', attempts = attempts + 1, worker_id = $3,
             lease_token = gen_random_uuid(),
             lease_expires_at = clock_timestamp() + make_interval(secs => $4),
             updated_at = now()
         FROM picked, gate WHERE o.id = picked.id
         RETURNING {columns}, o.lease_token, o.seq, (SELECT count(*) FROM candidates)"
    );
    let goal = claimed.len() + request.limit;
    // Bounded: each extra round needs a key with several ready operations.
    for _ in 0..8 {
        let room = goal - claimed.len();
        let open: Vec<&Lane> = lanes.iter().filter(|l| l.claimed < l.cap).collect();
        if open.is_empty() && !any_kind {
            break;
        }
        let kinds: Vec<&str> = open.iter().map(|l| l.kind.as_str()).collect();
        let caps: Vec<i64> = open
            .iter()
            .map(|l| (l.cap - l.claimed).min(i64::MAX as usize) as i64)
            .collect();
        let held: Vec<bool> = open.iter().map(|l| l.locked).collect();
        let rows = sqlx::query(sql.text(&statement))
            .persistent(sql.persistent())
            .bind(room as i64)
            .bind(&kinds)
            .bind(&request.worker_id)
            .bind(request.lease.as_secs_f64())
            .bind(any_kind)
            .bind(&caps)
            .bind(&held)
            .fetch_all(&mut *conn)
            .await
            .db()?;
        let mut candidates = 0;
        for row in &rows {
            let operation = operation_from_row(row).db()?;
            // The columns of COLUMNS, then the token, seq and the number of candidates.
            let token: Uuid = row.try_get(COLUMN_COUNT).db()?;
            let seq: i64 = row.try_get(COLUMN_COUNT + 1).db()?;
            candidates = row.try_get::<i64, _>(COLUMN_COUNT + 2).db()? as usize;
            if let Some(lane) = lanes.iter_mut().find(|l| l.kind == operation.kind) {
                lane.claimed += 1;
            }
            claimed.push((
                seq,
                ClaimedOperation {
                    operation,
                    lease_token: LeaseToken::from_uuid(token),
                },
            ));
        }
        // Done when the room is filled, or the scan did not fill the limit (nothing more
        // is ready), or nothing was claimed.
        if rows.is_empty() || claimed.len() >= goal || candidates < room {
            break;
        }
    }
    Ok(())
}

/// Locks the rows `ids` and every batch above them: the trees' outermost batches first,
/// then the nested batches, then the rows, each group in id order (rows are locked in the
/// sort's order). Every transaction that changes operations takes this lock first —
/// parent before child, a tree's root before anything in it, the one lock order of every
/// driver (see `fascicle_api::table`) — so two of them never wait on each other in
/// opposite orders: two steps in one tree meet at its root first.
async fn lock_parents_of(conn: &mut PgConnection, sql: &Sql, ids: &[Uuid]) -> Result<()> {
    sqlx::query(sql.text(
        // One `IN` over the rows and their ancestors, not `IN (…) OR id = ANY($1)`: the OR
        // made PostgreSQL scan the whole table on every completion (drain 0.1x the raw
        // bound; EXPLAIN showed a sequential scan of 200,000 rows, 14 ms, against 0.4 ms
        // by primary key).
        //
        // Each step up is a scalar subquery (a primary-key look-up per row): written as a
        // join, PostgreSQL hashed the whole table on every completion (24 ms at 100,000
        // rows against 0.3 ms; completions 240 µs a child instead of 40).
        "WITH RECURSIVE up(id, parent_id) AS (
             SELECT id, parent_id FROM {s}.operations WHERE id = ANY($1)
             UNION
             SELECT up.parent_id,
                    (SELECT o.parent_id FROM {s}.operations AS o WHERE o.id = up.parent_id)
             FROM up WHERE up.parent_id IS NOT NULL)
         SELECT 1 FROM {s}.operations
         WHERE id = ANY(ARRAY(SELECT id FROM up))
         ORDER BY (payload IS NULL AND parent_id IS NULL) DESC, (payload IS NULL) DESC, id
         FOR UPDATE",
    ))
    .persistent(sql.persistent())
    .bind(ids)
    .execute(&mut *conn)
    .await
    .db()?;
    Ok(())
}

/// The tail of every statement that makes children terminal. Given `updated` (the changed
/// rows' `id, parent_id, status`), it moves each touched parent's counters by its
/// children's outcomes in aggregate (O(1) per child) and returns the changed rows, then
/// the moved parents with their counters — read by [`finalize_moved`].
const MOVE_PARENTS: &str = "
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
                   p.children_cancelled, p.status, m.failed AS newly_failed, p.failure_policy)
     SELECT false AS is_parent, id, 0::bigint, 0::bigint, 0::bigint, 0::bigint, status,
            0::bigint, NULL::text, has_dependents
         FROM updated
     UNION ALL
     SELECT true, id, children_total, children_completed, children_failed,
            children_cancelled, status, newly_failed, failure_policy, false
         FROM parents";

/// One parent a statement ending in [`MOVE_PARENTS`] moved.
struct Moved {
    id: Uuid,
    counters: ChildCounters,
    pending: bool,
    newly_failed: bool,
    policy: FailurePolicy,
}

/// Reads a statement's rows (see [`MOVE_PARENTS`]): the changed operations' ids into
/// `changed`, those that ended and have dependents into `ended`, the moved parents into
/// `moved`.
fn read_moved(
    rows: &[sqlx::postgres::PgRow],
    changed: &mut HashSet<Uuid>,
    ended: &mut Vec<Uuid>,
    moved: &mut Vec<Moved>,
) -> Result<()> {
    for row in rows {
        let is_parent: bool = row.try_get(0).db()?;
        let id: Uuid = row.try_get(1).db()?;
        let status: &str = row.try_get(6).db()?;
        if !is_parent {
            changed.insert(id);
            if row.try_get::<bool, _>(9).db()? && !matches!(status, "pending" | "processing") {
                ended.push(id);
            }
            continue;
        }
        moved.push(Moved {
            id,
            counters: counters_from(row, 2)?,
            pending: status == "pending",
            newly_failed: row.try_get::<i64, _>(7).db()? > 0,
            policy: FailurePolicy::from_stored(row.try_get::<Option<&str>, _>(8).db()?)?,
        });
    }
    Ok(())
}

/// Reads the rows of a statement ending in [`MOVE_PARENTS`] and takes the step to its
/// end: `ReleaseDependents` of the operations that ended — a cascade of cancelled
/// dependents is a worklist, one statement per link, never a recursion — then, for each
/// moved parent, the fail-fast step when a child of a `FailFast` parent failed for good
/// (`fail_fast_*`) and `finalize_parent` when no child is left open. Returns the ids of
/// the operations the first statement changed.
async fn finalize_moved(
    conn: &mut PgConnection,
    sql: &Sql,
    rows: &[sqlx::postgres::PgRow],
) -> Result<HashSet<Uuid>> {
    let mut changed = HashSet::with_capacity(rows.len());
    let mut ended = Vec::new();
    let mut moved = Vec::new();
    read_moved(rows, &mut changed, &mut ended, &mut moved)?;
    let mut cascaded = false;
    let mut cascade_changed = HashSet::new();
    while !ended.is_empty() {
        let cancelled = release_dependents(conn, sql, &ended).await?;
        ended.clear();
        if cancelled.is_empty() {
            break;
        }
        cascaded = true;
        let endings: Vec<Ending<'_>> = cancelled
            .iter()
            .map(|(id, reason)| Ending {
                id: *id,
                token: None,
                from: Status::Pending,
                to: Status::Cancelled,
                error: reason,
                cancel_requested: None,
            })
            .collect();
        let ids: Vec<Uuid> = cancelled.iter().map(|(id, _)| *id).collect();
        lock_parents_of(conn, sql, &ids).await?;
        let rows = end_statement(conn, sql, &endings).await?;
        read_moved(&rows, &mut cascade_changed, &mut ended, &mut moved)?;
    }
    // Each parent once, after the whole cascade: its counters as a cascade left them are
    // read again (without a cascade, the statement's own are current).
    let mut seen = HashSet::with_capacity(moved.len());
    for (i, parent) in moved.iter().enumerate() {
        if !seen.insert(parent.id) {
            continue;
        }
        let failed = moved[i..]
            .iter()
            .any(|m| m.id == parent.id && m.newly_failed);
        if !moved[i..].iter().any(|m| m.id == parent.id && m.pending) {
            continue;
        }
        if failed && parent.policy == FailurePolicy::FailFast {
            fail_fast(conn, sql, parent.id).await?;
            finalize_if_done(conn, sql, parent.id).await?;
        } else if cascaded {
            finalize_if_done(conn, sql, parent.id).await?;
        } else if parent.pending && parent_outcome(&parent.counters).is_some() {
            finalize_parent(conn, sql, parent.id, &parent.counters, parent.policy).await?;
        }
    }
    Ok(changed)
}

/// `ReleaseDependents` of the operations (or nested batches) `ended`, terminal in this
/// transaction, their tree locked: each pending dependent waits for one dependency
/// fewer (O(1) per edge). Returns the dependents to cancel (`dependency_failed`): those
/// that needed a dependency completed that ended otherwise, with their reason.
async fn release_dependents(
    conn: &mut PgConnection,
    sql: &Sql,
    ended: &[Uuid],
) -> Result<Vec<(Uuid, String)>> {
    let edges: Vec<(Uuid, String, Uuid, bool)> = sqlx::query_as(sql.text(
        "SELECT o.id, o.status, (e->>'id')::uuid, coalesce((e->>'any')::boolean, false)
         FROM {s}.operations AS o, jsonb_array_elements(o.dependents) AS e
         WHERE o.id = ANY($1)",
    ))
    .persistent(sql.persistent())
    .bind(ended)
    .fetch_all(&mut *conn)
    .await
    .db()?;
    let mut released: std::collections::HashMap<Uuid, i32> = Default::default();
    let mut cancelled: Vec<(Uuid, String)> = Vec::new();
    for (dependency, status, dependent, any) in edges {
        let status: Status = status.parse()?;
        let edge = fascicle_api::Dependency {
            id: dependent.into(),
            any,
        };
        if edge.released_by(status) {
            *released.entry(dependent).or_default() += 1;
        } else if !cancelled.iter().any(|(id, _)| *id == dependent) {
            cancelled.push((
                dependent,
                messages::cancelled_by_dependency(dependency, status),
            ));
        }
    }
    if !released.is_empty() {
        let (ids, counts): (Vec<Uuid>, Vec<i32>) = released.into_iter().unzip();
        sqlx::query(sql.text(
            "UPDATE {s}.operations AS o
             SET waiting_on = greatest(o.waiting_on - r.n, 0), updated_at = now()
             FROM unnest($1::uuid[], $2::int4[]) AS r(id, n)
             WHERE o.id = r.id AND o.status = 'pending'",
        ))
        .persistent(sql.persistent())
        .bind(&ids)
        .bind(&counts)
        .execute(&mut *conn)
        .await
        .db()?;
    }
    Ok(cancelled)
}

/// The first failed child of a batch (earliest `completed_at`, then submission order):
/// the one a `FailFast` batch names and takes its error from.
async fn first_failure(
    conn: &mut PgConnection,
    sql: &Sql,
    parent: Uuid,
) -> Result<Option<(Uuid, Option<String>)>> {
    sqlx::query_as(sql.text(
        "SELECT id, error FROM {s}.operations
         WHERE parent_id = $1 AND status = 'failed' ORDER BY completed_at, seq LIMIT 1",
    ))
    .persistent(sql.persistent())
    .bind(parent)
    .fetch_optional(&mut *conn)
    .await
    .db()
}

/// `fail_fast_cancel_pending` and `fail_fast_request_cancel`: a child of the `FailFast`
/// batch `parent` (its tree locked by the caller) failed for good. The pending operations
/// of its tree are cancelled naming it, in one step.
async fn fail_fast(conn: &mut PgConnection, sql: &Sql, parent: Uuid) -> Result<()> {
    let Some((failed, _)) = first_failure(conn, sql, parent).await? else {
        return Ok(());
    };
    let reason = messages::cancelled_by_fail_fast(failed);
    Box::pin(cancel_tree(conn, sql, parent, &reason)).await?;
    Ok(())
}

/// Finalizes `parent` when it is still pending and its counters, as stored now, say no
/// child is left open.
async fn finalize_if_done(conn: &mut PgConnection, sql: &Sql, parent: Uuid) -> Result<()> {
    let row = sqlx::query(sql.text(
        "SELECT children_total, children_completed, children_failed, children_cancelled,
                failure_policy
         FROM {s}.operations WHERE id = $1 AND status = 'pending'",
    ))
    .persistent(sql.persistent())
    .bind(parent)
    .fetch_optional(&mut *conn)
    .await
    .db()?;
    let Some(row) = row else {
        return Ok(());
    };
    let counters = counters_from(&row, 0)?;
    if parent_outcome(&counters).is_some() {
        let policy = FailurePolicy::from_stored(row.try_get::<Option<&str>, _>(4).db()?)?;
        finalize_parent(conn, sql, parent, &counters, policy).await?;
    }
    Ok(())
}

/// The batch `$1` and every batch nested in it, as the relation `tree(id)`; a statement
/// goes on with more common table expressions after it.
///
/// Each step down reads the nested batches of one batch by index (`operations_nested`),
/// and statements test membership with `= ANY(ARRAY(SELECT id FROM tree))`: written as
/// joins, PostgreSQL may hash the whole table.
const TREE: &str = "WITH RECURSIVE tree(id) AS (
         SELECT $1::uuid UNION ALL
         SELECT unnest(ARRAY(SELECT o.id FROM {s}.operations AS o
                             WHERE o.parent_id = t.id AND o.payload IS NULL))
         FROM tree AS t)";

/// One step over the tree of the batch `root` (locked by the caller): every pending
/// operation is cancelled with `reason` and counted into its batch, the dependents left
/// pending are released and the batches with no child left open finalized
/// ([`finalize_moved`]), then — in a statement of its own, so an operation claimed
/// meanwhile is seen as processing — the running ones are asked to stop. Returns
/// (cancelled, signalled).
async fn cancel_tree(
    conn: &mut PgConnection,
    sql: &Sql,
    root: Uuid,
    reason: &str,
) -> Result<(u64, u64)> {
    let statement = format!(
        "{TREE},
         updated AS (
             UPDATE {{s}}.operations AS o
             SET status = 'cancelled', error = $2, waiting_on = 0, updated_at = now(),
                 completed_at = now()
             WHERE parent_id = ANY(ARRAY(SELECT id FROM tree)) AND status = 'pending'
               AND payload IS NOT NULL
             RETURNING o.id, o.parent_id, o.status, o.dependents IS NOT NULL AS has_dependents),
         {MOVE_PARENTS}"
    );
    let rows = sqlx::query(sql.text(&statement))
        .persistent(sql.persistent())
        .bind(root)
        .bind(reason)
        .fetch_all(&mut *conn)
        .await
        .db()?;
    let cancelled = finalize_moved(conn, sql, &rows).await?.len() as u64;
    let signalled = sqlx::query(sql.text(&format!(
        "{TREE}
         UPDATE {{s}}.operations SET cancel_requested = true, updated_at = now()
         WHERE parent_id = ANY(ARRAY(SELECT id FROM tree)) AND status = 'processing'"
    )))
    .persistent(sql.persistent())
    .bind(root)
    .execute(&mut *conn)
    .await
    .db()?
    .rows_affected();
    Ok((cancelled, signalled))
}

/// After the batch `id` ended (`finalize_parent`, `reconcile_*`): what waits for it is
/// released (`ReleaseDependents`) and a nested batch's outcome is counted into the batch
/// holding it (`CountIntoOuterBatch`), which may finalize that one in turn.
async fn batch_ended(conn: &mut PgConnection, sql: &Sql, id: Uuid) -> Result<()> {
    let statement = format!(
        "WITH updated AS (
             SELECT id, parent_id, status, dependents IS NOT NULL AS has_dependents
             FROM {{s}}.operations WHERE id = $1),
         {MOVE_PARENTS}"
    );
    let rows = sqlx::query(sql.text(&statement))
        .persistent(sql.persistent())
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .db()?;
    Box::pin(finalize_moved(conn, sql, &rows)).await?;
    Ok(())
}

/// One terminal transition of one operation, for [`end_operations`].
struct Ending<'a> {
    id: Uuid,
    /// The lease token it must still hold; `None` for a pending operation, or for a
    /// processing one whose lease must have expired (a rescue).
    token: Option<Uuid>,
    from: Status,
    to: Status,
    error: &'a str,
    /// The `cancel_requested` value it must have, when the transition depends on it.
    cancel_requested: Option<bool>,
}

/// Makes operations terminal in one set-based statement — `cancel_pending`,
/// `release_after_cancel`, `rescue_exhausted`, `rescue_after_cancel` — each guarded by
/// the state, token, expiry and cancel flag its row of the table names, their counters
/// moved in the same statement, then takes the step to its end ([`finalize_moved`]).
/// Every caller has locked the rows with their trees first (`lock_parents_of`, the one
/// lock order) and read their state under that lock. Returns the ids that changed.
async fn end_operations(
    conn: &mut PgConnection,
    sql: &Sql,
    endings: &[Ending<'_>],
) -> Result<HashSet<Uuid>> {
    if endings.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = end_statement(conn, sql, endings).await?;
    finalize_moved(conn, sql, &rows).await
}

/// The statement of [`end_operations`], with [`MOVE_PARENTS`]'s rows. The caller has
/// locked the rows and their trees (`lock_parents_of`).
async fn end_statement(
    conn: &mut PgConnection,
    sql: &Sql,
    endings: &[Ending<'_>],
) -> Result<Vec<sqlx::postgres::PgRow>> {
    let ids: Vec<Uuid> = endings.iter().map(|e| e.id).collect();
    let tokens: Vec<Option<Uuid>> = endings.iter().map(|e| e.token).collect();
    let from: Vec<&str> = endings.iter().map(|e| e.from.as_str()).collect();
    let to: Vec<&str> = endings.iter().map(|e| e.to.as_str()).collect();
    let errors: Vec<&str> = endings.iter().map(|e| e.error).collect();
    let cancel: Vec<Option<bool>> = endings.iter().map(|e| e.cancel_requested).collect();
    let statement = format!(
        "WITH input AS (
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                                  $6::bool[])
                 AS t(id, token, from_status, status, error, cancel)),
         updated AS (
             UPDATE {{s}}.operations AS o
             SET status = i.status, error = i.error, result = NULL, worker_id = NULL,
                 lease_token = NULL, lease_expires_at = NULL, waiting_on = 0,
                 updated_at = now(), completed_at = now()
             FROM input AS i
             WHERE o.id = i.id AND o.status = i.from_status
               AND (i.token IS NULL OR o.lease_token = i.token)
               AND (i.from_status <> 'processing' OR i.token IS NOT NULL
                    OR o.lease_expires_at < now())
               AND (i.cancel IS NULL OR o.cancel_requested = i.cancel)
             RETURNING o.id, o.parent_id, o.status, o.dependents IS NOT NULL AS has_dependents),
         {MOVE_PARENTS}"
    );
    sqlx::query(sql.text(&statement))
        .persistent(sql.persistent())
        .bind(&ids)
        .bind(&tokens)
        .bind(&from)
        .bind(&to)
        .bind(&errors)
        .bind(&cancel)
        .fetch_all(&mut *conn)
        .await
        .db()
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

/// Finalizes a pending parent whose counters say every child is terminal
/// (`finalize_parent`), to the state its policy gives, and inserts the callbacks that
/// outcome selects. A failed batch's representative error is chosen in the database (one
/// row comes back, whatever the number of failed children).
async fn finalize_parent(
    conn: &mut PgConnection,
    sql: &Sql,
    parent: Uuid,
    counters: &ChildCounters,
    policy: FailurePolicy,
) -> Result<bool> {
    let Some(outcome) = policy.outcome(counters) else {
        return Ok(false);
    };
    let error = match outcome {
        Status::Failed if policy == FailurePolicy::FailFast => first_failure(conn, sql, parent)
            .await?
            .and_then(|(_, error)| error),
        Status::Failed => {
            let most: Option<(String, i64)> = sqlx::query_as(sql.text(
                "SELECT error, count(*) FROM {s}.operations
                 WHERE parent_id = $1 AND status = 'failed' AND error IS NOT NULL
                 GROUP BY error ORDER BY count(*) DESC, error COLLATE \"C\" LIMIT 1",
            ))
            .persistent(sql.persistent())
            .bind(parent)
            .fetch_optional(&mut *conn)
            .await
            .db()?;
            most.map(|(error, n)| representative_error(&error, n as u64))
        }
        _ => None,
    };
    let finalized: Option<(String, Option<Value>, bool)> = sqlx::query_as(sql.text(
        "UPDATE {s}.operations SET status = $2, error = $3, result = $4,
             updated_at = now(), completed_at = now()
         WHERE id = $1 AND status = 'pending'
         RETURNING kind, callbacks, parent_id IS NOT NULL OR dependents IS NOT NULL",
    ))
    .persistent(sql.persistent())
    .bind(parent)
    .bind(outcome.as_str())
    .bind(&error)
    .bind(parent_summary(counters))
    .fetch_optional(&mut *conn)
    .await
    .db()?;
    let Some((kind, callbacks, nested)) = finalized else {
        return Ok(false);
    };
    let batch = workflow::Finalized {
        id: OperationId::from_uuid(parent),
        kind: &kind,
        outcome,
        children: counters,
        error: error.as_deref(),
    };
    fire_callbacks(conn, sql, callbacks, batch).await?;
    if nested {
        batch_ended(conn, sql, parent).await?;
    }
    Ok(true)
}

/// Inserts the callbacks (a parent's stored `callbacks`) that `batch`'s outcome selects,
/// in the transaction that finalized it, and queues a NOTIFY (delivered on commit).
async fn fire_callbacks(
    conn: &mut PgConnection,
    sql: &Sql,
    callbacks: Option<Value>,
    batch: workflow::Finalized<'_>,
) -> Result<()> {
    let Some(callbacks) = callbacks else {
        return Ok(());
    };
    let plan = BatchPlan::from_stored(None, Some(&callbacks.to_string()))?;
    let fired = workflow::fire(&plan.callbacks, batch, chrono::Utc::now());
    if fired.is_empty() {
        return Ok(());
    }
    for (record, info) in &fired {
        // On the server's clock, like every instant this store compares.
        sqlx::query(sql.text(
            "INSERT INTO {s}.operations
                 (id, kind, status, payload, parent_id, priority, serialization_key, attempts,
                  max_attempts, run_at, created_at, updated_at, timeout_ms, callback_for)
             VALUES ($1, $2, 'pending', $3::jsonb, NULL, $4, $5, 0, $6, now(), now(), now(),
                     $7, $8::jsonb)",
        ))
        .persistent(sql.persistent())
        .bind(record.id.as_uuid())
        .bind(&record.kind)
        .bind(&record.payload_json)
        .bind(record.priority)
        .bind(&record.serialization_key)
        .bind(record.max_attempts as i32)
        .bind(record.timeout.map(|t| t.as_millis() as i64))
        .bind(info.to_json())
        .execute(&mut *conn)
        .await
        .db()?;
    }
    sqlx::query("SELECT pg_notify($1, $2)")
        .persistent(sql.persistent())
        .bind(&sql.channel)
        .bind(fired.len().to_string())
        .execute(&mut *conn)
        .await
        .db()?;
    Ok(())
}

pub(crate) async fn complete(
    conn: &mut PgConnection,
    sql: &Sql,
    completions: &[Completion],
) -> Result<Vec<Applied>> {
    let ids: Vec<Uuid> = completions.iter().map(|c| *c.id.as_uuid()).collect();
    lock_parents_of(conn, sql, &ids).await?;
    // Every completion in one statement: the fenced updates, then each touched parent's
    // counters moved by its children's outcomes in aggregate (O(1) per child).
    let n = completions.len();
    let mut tokens = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    // As text written by `to_stored_text`, cast to jsonb by the statement: sqlx's own
    // encoding would write a whole float as `1e17`, read back as an integer.
    let mut results: Vec<Option<String>> = Vec::with_capacity(n);
    let mut errors: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut run_ats: Vec<Option<chrono::DateTime<chrono::Utc>>> = Vec::with_capacity(n);
    // The error a retry stores instead when a cancel was requested (`retry_after_cancel`).
    let mut cancel_errors: Vec<Option<String>> = Vec::with_capacity(n);
    for c in completions {
        tokens.push(*c.lease_token.as_uuid());
        let (status, result, error, run_at) = match &c.outcome {
            Outcome::Completed(value) => (
                Status::Completed,
                Some(fascicle_api::to_stored_text(value)),
                None,
                None,
            ),
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
    let statement = format!(
        "WITH input AS (
             SELECT *, (status = 'pending') AS retry
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                         $6::timestamptz[], $7::text[])
                 AS t(id, token, status, result, error, run_at, cancel_error)),
         updated AS (
             -- A retry of an operation whose cancel was requested is `retry_after_cancel`:
             -- cancelled, not re-queued.
             UPDATE {{s}}.operations AS o
             SET status = CASE WHEN i.retry AND o.cancel_requested THEN 'cancelled'
                               ELSE i.status END,
                 result = i.result::jsonb,
                 error = CASE WHEN i.retry AND o.cancel_requested THEN i.cancel_error
                              ELSE i.error END,
                 -- One clock: the retry's delay (its run_at less the client's now, $8)
                 -- is added to the server's clock at this statement (a caller's
                 -- transaction may have started long before).
                 run_at = CASE WHEN i.retry AND NOT o.cancel_requested
                               THEN statement_timestamp() + (i.run_at - $8::timestamptz)
                               ELSE o.run_at END,
                 worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
                 updated_at = now(),
                 completed_at = CASE WHEN i.retry AND NOT o.cancel_requested THEN NULL
                                     ELSE now() END
             FROM input AS i
             WHERE o.id = i.id AND o.status = 'processing' AND o.lease_token = i.token
             RETURNING o.id, o.parent_id, o.status, o.dependents IS NOT NULL AS has_dependents),
         {MOVE_PARENTS}"
    );
    let rows = sqlx::query(sql.text(&statement))
        .persistent(sql.persistent())
        .bind(&ids)
        .bind(&tokens)
        .bind(&statuses)
        .bind(&results)
        .bind(&errors)
        .bind(&run_ats)
        .bind(&cancel_errors)
        .bind(chrono::Utc::now())
        .fetch_all(&mut *conn)
        .await
        .db()?;
    let applied_ids = finalize_moved(conn, sql, &rows).await?;
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
    // In the one lock order, so a heartbeat never deadlocks with a completion.
    lock_parents_of(conn, sql, &ids).await?;
    let rows = sqlx::query(sql.text(
        "UPDATE {s}.operations AS o
         SET lease_expires_at = now() + make_interval(secs => $3), updated_at = now()
         FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
         WHERE o.id = l.id AND o.status = 'processing' AND o.lease_token = l.token
         RETURNING o.id, o.cancel_requested",
    ))
    .persistent(sql.persistent())
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
    lock_parents_of(conn, sql, &ids).await?;
    // `release`: back to `pending`, the attempt not counted, unless a cancel was requested.
    let released = sqlx::query(sql.text(
        "UPDATE {s}.operations AS o
         SET status = 'pending', attempts = greatest(attempts - 1, 0), worker_id = NULL,
             lease_token = NULL, lease_expires_at = NULL, updated_at = now()
         FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
         WHERE o.id = l.id AND o.status = 'processing' AND o.lease_token = l.token
           AND NOT o.cancel_requested",
    ))
    .persistent(sql.persistent())
    .bind(&ids)
    .bind(&tokens)
    .execute(&mut *conn)
    .await
    .db()?
    .rows_affected();
    // `release_after_cancel`: what is still held ends cancelled (the guard re-checks).
    let endings: Vec<Ending<'_>> = leases
        .iter()
        .map(|l| Ending {
            id: *l.id.as_uuid(),
            token: Some(*l.token.as_uuid()),
            from: Status::Processing,
            to: Status::Cancelled,
            error: messages::CANCELLED_AT_RELEASE,
            cancel_requested: Some(true),
        })
        .collect();
    let cancelled = end_operations(conn, sql, &endings).await?;
    Ok(released + cancelled.len() as u64)
}

pub(crate) async fn rescue(conn: &mut PgConnection, sql: &Sql) -> Result<RescueReport> {
    // Read without locking, then lock the parents first (the one lock order); every write
    // below re-checks the row's state, expiry and cancel flag.
    let expired: Vec<(Uuid, i32, i32, bool)> = sqlx::query_as(sql.text(
        "SELECT id, attempts, max_attempts, cancel_requested FROM {s}.operations
         WHERE status = 'processing' AND lease_expires_at < now()",
    ))
    .persistent(sql.persistent())
    .fetch_all(&mut *conn)
    .await
    .db()?;
    if expired.is_empty() {
        return Ok(RescueReport::default());
    }
    let ids: Vec<Uuid> = expired.iter().map(|e| e.0).collect();
    lock_parents_of(conn, sql, &ids).await?;
    let mut requeue = Vec::new();
    let mut errors = Vec::new();
    for &(id, attempts, max_attempts, cancel) in &expired {
        let rescue = table::rescue_of(cancel, attempts as u32, max_attempts as u32);
        if rescue == table::RESCUE {
            requeue.push(id);
        } else if rescue == table::RESCUE_AFTER_CANCEL {
            errors.push((
                id,
                Status::Cancelled,
                messages::CANCELLED_AT_RESCUE.to_owned(),
                cancel,
            ));
        } else {
            let error = messages::lease_expired_on_last_attempt(attempts as u32);
            errors.push((id, Status::Failed, error, cancel));
        }
    }
    // `rescue`: back to `pending`, ready now.
    let requeued = sqlx::query(sql.text(
        "UPDATE {s}.operations SET status = 'pending', error = $2, worker_id = NULL,
             lease_token = NULL, lease_expires_at = NULL, run_at = now(), updated_at = now()
         WHERE id = ANY($1) AND status = 'processing' AND lease_expires_at < now()
           AND attempts < max_attempts AND NOT cancel_requested",
    ))
    .persistent(sql.persistent())
    .bind(&requeue)
    .bind(messages::LEASE_EXPIRED)
    .execute(&mut *conn)
    .await
    .db()?
    .rows_affected();
    // `rescue_exhausted` and `rescue_after_cancel`.
    let endings: Vec<Ending<'_>> = errors
        .iter()
        .map(|(id, to, error, cancel)| Ending {
            id: *id,
            token: None,
            from: Status::Processing,
            to: *to,
            error,
            cancel_requested: Some(*cancel),
        })
        .collect();
    let ended = end_operations(conn, sql, &endings).await?;
    let mut report = RescueReport {
        requeued,
        ..RescueReport::default()
    };
    for ending in endings.iter().filter(|e| ended.contains(&e.id)) {
        if ending.to == Status::Cancelled {
            report.cancelled += 1;
        } else {
            report.failed += 1;
        }
    }
    Ok(report)
}

pub(crate) async fn reconcile(conn: &mut PgConnection, sql: &Sql) -> Result<ReconcileReport> {
    // Read without locking; each one is then locked with its tree (root first, the one
    // lock order) and looked at again.
    const STRANDED: &str = "SELECT id, failure_policy FROM {s}.operations AS p
         WHERE payload IS NULL AND status = 'pending'
           AND NOT EXISTS (SELECT 1 FROM {s}.operations AS c
                           WHERE c.parent_id = p.id AND c.status IN ('pending', 'processing'))";
    let stranded: Vec<(Uuid, Option<String>)> = sqlx::query_as(sql.text(STRANDED))
        .persistent(sql.persistent())
        .fetch_all(&mut *conn)
        .await
        .db()?;
    let mut report = ReconcileReport::default();
    // Every tree at once, roots first in id order: locking one after another would
    // take roots out of order against a step that locks two of them.
    let ids: Vec<Uuid> = stranded.iter().map(|(id, _)| *id).collect();
    if !ids.is_empty() {
        lock_parents_of(conn, sql, &ids).await?;
    }
    for (parent, policy) in stranded {
        let still: Option<i32> = sqlx::query_scalar(
            sql.text(&format!("SELECT 1 FROM ({STRANDED}) AS s WHERE s.id = $1")),
        )
        .persistent(sql.persistent())
        .bind(parent)
        .fetch_optional(&mut *conn)
        .await
        .db()?;
        if still.is_none() {
            continue;
        }
        let policy = FailurePolicy::from_stored(policy.as_deref())?;
        let row = sqlx::query(sql.text(
            "SELECT count(*), count(*) FILTER (WHERE status = 'completed'),
                    count(*) FILTER (WHERE status = 'failed'),
                    count(*) FILTER (WHERE status = 'cancelled')
             FROM {s}.operations WHERE parent_id = $1",
        ))
        .persistent(sql.persistent())
        .bind(parent)
        .fetch_one(&mut *conn)
        .await
        .db()?;
        let counters = counters_from(&row, 0)?;
        if counters.total == 0 {
            let failed: Option<(String, Option<Value>, bool)> = sqlx::query_as(sql.text(
                "UPDATE {s}.operations SET status = 'failed', error = $2, children_total = 0,
                     updated_at = now(), completed_at = now()
                 WHERE id = $1 AND status = 'pending'
                 RETURNING kind, callbacks, parent_id IS NOT NULL OR dependents IS NOT NULL",
            ))
            .persistent(sql.persistent())
            .bind(parent)
            .bind(ZERO_CHILDREN_REASON)
            .fetch_optional(&mut *conn)
            .await
            .db()?;
            if let Some((kind, callbacks, nested)) = failed {
                let batch = workflow::Finalized {
                    id: OperationId::from_uuid(parent),
                    kind: &kind,
                    outcome: Status::Failed,
                    children: &counters,
                    error: Some(ZERO_CHILDREN_REASON),
                };
                fire_callbacks(conn, sql, callbacks, batch).await?;
                if nested {
                    batch_ended(conn, sql, parent).await?;
                }
                report.empty_parents_failed += 1;
            }
            continue;
        }
        sqlx::query(sql.text(
            "UPDATE {s}.operations SET children_total = $2, children_completed = $3,
                 children_failed = $4, children_cancelled = $5
             WHERE id = $1",
        ))
        .persistent(sql.persistent())
        .bind(parent)
        .bind(counters.total as i64)
        .bind(counters.completed as i64)
        .bind(counters.failed as i64)
        .bind(counters.cancelled as i64)
        .execute(&mut *conn)
        .await
        .db()?;
        if finalize_parent(conn, sql, parent, &counters, policy).await? {
            report.parents_finalized += 1;
        }
    }
    Ok(report)
}

pub(crate) async fn cancel(
    conn: &mut PgConnection,
    sql: &Sql,
    id: OperationId,
) -> Result<CancelReport> {
    let id = *id.as_uuid();
    // Parent first: for a batch its own row, for an operation its parent's.
    let found: Option<(String, bool)> = sqlx::query_as(
        sql.text("SELECT status, payload IS NULL FROM {s}.operations WHERE id = $1"),
    )
    .persistent(sql.persistent())
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .db()?;
    let Some((_, is_parent)) = found else {
        return Err(Error::NotFound(format!("operation {id} does not exist")));
    };
    if !is_parent {
        // Its parent's lock, then its own row's: read under the lock, its state cannot
        // change before the one transition chosen from it.
        lock_parents_of(conn, sql, &[id]).await?;
        let status: String = sqlx::query_scalar(
            sql.text("SELECT status FROM {s}.operations WHERE id = $1 FOR UPDATE"),
        )
        .persistent(sql.persistent())
        .bind(id)
        .fetch_one(&mut *conn)
        .await
        .db()?;
        let mut report = CancelReport::default();
        match status.parse::<Status>()? {
            Status::Pending => {
                let pending = Ending {
                    id,
                    token: None,
                    from: Status::Pending,
                    to: Status::Cancelled,
                    error: messages::CANCELLED_BEFORE_RUN,
                    cancel_requested: None,
                };
                report.cancelled = end_operations(conn, sql, &[pending]).await?.len() as u64;
            }
            Status::Processing => {
                report.signalled = request_cancel(conn, sql, "id = $1", id).await?
            }
            _ => report.already_terminal = 1,
        }
        return Ok(report);
    }
    lock_parents_of(conn, sql, &[id]).await?;
    // `cancel_pending` for every pending operation of the tree at once, then
    // `request_cancel` for the running ones.
    let operations: i64 = sqlx::query_scalar(sql.text(&format!(
        "{TREE}
         SELECT count(*) FROM {{s}}.operations
         WHERE parent_id = ANY(ARRAY(SELECT id FROM tree)) AND payload IS NOT NULL"
    )))
    .persistent(sql.persistent())
    .bind(id)
    .fetch_one(&mut *conn)
    .await
    .db()?;
    let (cancelled, signalled) = cancel_tree(conn, sql, id, messages::CANCELLED_BEFORE_RUN).await?;
    Ok(CancelReport {
        cancelled,
        signalled,
        already_terminal: (operations as u64).saturating_sub(cancelled + signalled),
    })
}

/// `request_cancel`: the processing operations selected by `filter` (on `$1`) are asked
/// to stop. Returns how many.
async fn request_cancel(conn: &mut PgConnection, sql: &Sql, filter: &str, id: Uuid) -> Result<u64> {
    Ok(sqlx::query(sql.text(&format!(
        "UPDATE {{s}}.operations SET cancel_requested = true, updated_at = now()
         WHERE {filter} AND status = 'processing'"
    )))
    .persistent(sql.persistent())
    .bind(id)
    .execute(&mut *conn)
    .await
    .db()?
    .rows_affected())
}

pub(crate) async fn retry_batch(
    conn: &mut PgConnection,
    sql: &Sql,
    parent: OperationId,
) -> Result<u64> {
    let is_parent: Option<bool> =
        sqlx::query_scalar(sql.text("SELECT payload IS NULL FROM {s}.operations WHERE id = $1"))
            .persistent(sql.persistent())
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
    let parent = *parent.as_uuid();
    // The batch and every batch holding it, root first (the one lock order).
    lock_parents_of(conn, sql, &[parent]).await?;
    // A re-queued operation must not need completed what ended otherwise outside the
    // tree (it would wait for ever).
    let stranded: Option<(Uuid, Uuid, String)> = sqlx::query_as(sql.text(&format!(
        "{TREE},
         requeued AS (
             SELECT id, depends_on FROM {{s}}.operations
             WHERE parent_id = ANY(ARRAY(SELECT id FROM tree)) AND payload IS NOT NULL
               AND status IN ('failed', 'cancelled'))
         SELECT r.id, d.id, d.status
         FROM requeued AS r, jsonb_array_elements(r.depends_on) AS e, {{s}}.operations AS d
         WHERE d.id = (e->>'id')::uuid AND NOT coalesce((e->>'any')::boolean, false)
           AND d.status IN ('failed', 'cancelled')
           -- Inside the tree it is re-queued or reopens with it.
           AND (d.parent_id IS NULL OR NOT d.parent_id = ANY(ARRAY(SELECT id FROM tree)))
         LIMIT 1"
    )))
    .persistent(sql.persistent())
    .bind(parent)
    .fetch_optional(&mut *conn)
    .await
    .db()?;
    if let Some((operation, dependency, ended)) = stranded {
        return Err(Error::Conflict(messages::retry_strands_a_dependent(
            parent,
            operation,
            dependency,
            ended.parse()?,
        )));
    }
    let (retried, batches, waiting): (i64, Vec<Uuid>, Vec<Uuid>) =
        sqlx::query_as(sql.text(&format!(
            "{TREE},
         retried AS (
             UPDATE {{s}}.operations AS o SET status = 'pending', attempts = 0, error = NULL,
                 result = NULL, cancel_requested = false, run_at = now(), updated_at = now(),
                 completed_at = NULL
             WHERE o.parent_id = ANY(ARRAY(SELECT id FROM tree)) AND o.payload IS NOT NULL
               AND o.status IN ('failed', 'cancelled')
             RETURNING o.id, o.parent_id, o.depends_on IS NOT NULL AS waits)
         SELECT count(*), coalesce(array_agg(DISTINCT parent_id), '{{}}'),
                coalesce(array_agg(id) FILTER (WHERE waits), '{{}}')
         FROM retried"
        )))
        .persistent(sql.persistent())
        .bind(parent)
        .fetch_one(&mut *conn)
        .await
        .db()?;
    if retried == 0 {
        return Err(Error::Conflict(format!(
            "batch {parent} has no failed or cancelled children to retry"
        )));
    }
    // The batches that reopen: each holding a re-queued operation, up to the tree's root
    // (the batch retried and the batches holding it); then each is recounted from its
    // children, the reopened ones among them pending now.
    let reopened: Vec<Uuid> = sqlx::query_scalar(sql.text(
        "WITH RECURSIVE up(id) AS (
             SELECT unnest($1::uuid[])
             UNION
             SELECT (SELECT o.parent_id FROM {s}.operations AS o WHERE o.id = up.id)
             FROM up WHERE up.id IS NOT NULL)
         UPDATE {s}.operations SET status = 'pending', error = NULL, result = NULL,
             updated_at = now(), completed_at = NULL
         WHERE id IN (SELECT id FROM up)
         RETURNING id",
    ))
    .persistent(sql.persistent())
    .bind(&batches)
    .fetch_all(&mut *conn)
    .await
    .db()?;
    sqlx::query(sql.text(
        "UPDATE {s}.operations AS p
         SET children_total = c.total, children_completed = c.completed,
             children_failed = c.failed, children_cancelled = c.cancelled
         FROM (SELECT parent_id, count(*) AS total,
                      count(*) FILTER (WHERE status = 'completed') AS completed,
                      count(*) FILTER (WHERE status = 'failed') AS failed,
                      count(*) FILTER (WHERE status = 'cancelled') AS cancelled
               FROM {s}.operations WHERE parent_id = ANY($1) GROUP BY parent_id) AS c
         WHERE p.id = c.parent_id",
    ))
    .persistent(sql.persistent())
    .bind(&reopened)
    .execute(&mut *conn)
    .await
    .db()?;
    if !waiting.is_empty() {
        // A re-queued operation waits again for what has not released it: a dependency
        // it needs completed that is not, or one it waits to end that is open again.
        sqlx::query(sql.text(
            "UPDATE {s}.operations AS o SET waiting_on = (
                 SELECT count(*) FROM jsonb_array_elements(o.depends_on) AS e
                 JOIN {s}.operations AS d ON d.id = (e->>'id')::uuid
                 WHERE NOT (d.status = 'completed'
                            OR (coalesce((e->>'any')::boolean, false)
                                AND d.status IN ('failed', 'cancelled'))))
             WHERE o.id = ANY($1)",
        ))
        .persistent(sql.persistent())
        .bind(&waiting)
        .execute(&mut *conn)
        .await
        .db()?;
    }
    Ok(retried as u64)
}

/// One chunk of a prune: whole terminal batches, oldest first, until about `budget` rows
/// (at least one batch), locked parent first (`SKIP LOCKED`: a batch being finalized or
/// retried is left for the next prune), then stand-alone operations for the rest of the
/// budget.
pub(crate) async fn prune(
    conn: &mut PgConnection,
    sql: &Sql,
    before: chrono::DateTime<chrono::Utc>,
    budget: u64,
) -> Result<PruneReport> {
    let row = sqlx::query(sql.text(
        "WITH RECURSIVE candidates AS (
             SELECT id, completed_at, coalesce(children_total, 0) + 1 AS size
             FROM {s}.operations
             WHERE payload IS NULL AND parent_id IS NULL
               AND completed_at < now() - ($3::timestamptz - $1)
               AND status IN ('completed', 'failed', 'cancelled')
             ORDER BY completed_at, id LIMIT $2
             FOR UPDATE SKIP LOCKED),
         sized AS (
             SELECT id, size, sum(size) OVER w AS upto, row_number() OVER w AS n
             FROM candidates WINDOW w AS (ORDER BY completed_at, id)),
         chosen AS (SELECT id, size FROM sized WHERE upto <= $2 OR n = 1),
         -- Whole trees: each chosen batch and every batch nested in it.
         tree(id) AS (
             SELECT id FROM chosen
             UNION ALL
             SELECT unnest(ARRAY(SELECT o.id FROM {s}.operations AS o
                                 WHERE o.parent_id = t.id AND o.payload IS NULL))
             FROM tree AS t),
         children AS (
             DELETE FROM {s}.operations
             WHERE parent_id = ANY(ARRAY(SELECT id FROM tree)) AND payload IS NOT NULL
             RETURNING 1),
         parents AS (
             DELETE FROM {s}.operations WHERE id = ANY(ARRAY(SELECT id FROM tree))
             RETURNING 1),
         standalone AS (
             DELETE FROM {s}.operations WHERE id IN (
                 SELECT id FROM {s}.operations
                 WHERE payload IS NOT NULL AND parent_id IS NULL
                   AND completed_at < now() - ($3::timestamptz - $1)
                   AND status IN ('completed', 'failed', 'cancelled')
                 ORDER BY completed_at
                 LIMIT greatest($2 - (SELECT coalesce(sum(size), 0) FROM chosen), 0)
                 FOR UPDATE SKIP LOCKED)
             RETURNING id),
         -- A pruned operation holds its unique key no more: its row goes with it.
         keys AS (
             DELETE FROM {s}.unique_keys WHERE operation IN (SELECT id FROM standalone))
         SELECT (SELECT count(*) FROM parents), (SELECT count(*) FROM children),
                (SELECT count(*) FROM standalone)",
    ))
    .persistent(sql.persistent())
    .bind(before)
    .bind(budget as i64)
    // One clock: the cut-off's distance from the caller's now ($3) is taken from the
    // server's now().
    .bind(chrono::Utc::now())
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
