//! The worker-side `Store` operations, each one `BEGIN IMMEDIATE` transaction. Every
//! state change names the state (and lease token) it expects.

use chrono::{DateTime, Utc};
use fascicle_api::{
    Applied, CancelReport, ChildCounters, ClaimRequest, ClaimedOperation, Completion, Error,
    KindLimit, Lease, LeaseStatus, LeaseToken, Operation, OperationId, Outcome, PruneReport,
    ReconcileReport, RescueReport, Result, Status, ZERO_CHILDREN_REASON, parent_outcome,
    parent_summary, representative_error,
};
use fascicle_api::{BatchPlan, FailurePolicy, messages, table, workflow};
use rusqlite::{OptionalExtension, Transaction, params};

use crate::error;
use crate::store::{COLUMN_COUNT, COLUMNS, instant, micros, operation_from_row};

/// `?` for rusqlite results inside fascicle-returning code.
pub(crate) trait Db<T> {
    fn db(self) -> Result<T>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T> {
        self.map_err(error::map)
    }
}

pub(crate) fn claim(
    tx: &Transaction<'_>,
    request: &ClaimRequest,
    now: DateTime<Utc>,
) -> Result<Vec<ClaimedOperation>> {
    let now_us = micros(now);
    let lease_until = now_us + request.lease.as_micros() as i64;
    // Read the picked rows in the scan, then change each by its rowid: a statement with
    // `RETURNING` builds a temporary table per execution, which cost a quarter of each
    // claimed row's time.
    let mut picked: Vec<(i64, Operation)> = Vec::with_capacity(request.limit);
    // Limited kinds (`fascicle_api::flow`): their room, counted in this write transaction
    // (SQLite has one writer at a time, so no other claim moves the counts meanwhile).
    let mut limited = limited_kinds(tx, now)?;
    // A claim of named kinds (what a worker sends) walks each claimable kind's own index
    // and merges them: in the shared one, the other kinds' backlog ahead of them would be
    // read past on every claim (tests/plans.rs: 600,000 steps to claim 128 behind 50,000
    // of another kind), and so would a held-back kind's.
    let by_kind = match &request.kinds {
        Some(kinds) => {
            let paused = paused_kinds(tx)?;
            Some(
                kinds
                    .iter()
                    .filter(|k| !paused.contains(*k))
                    .filter(|k| limited.get(*k).is_none_or(|l| l.room > 0))
                    .cloned()
                    .collect::<std::collections::BTreeSet<String>>(),
            )
        }
        None => None,
    };
    if let Some(kinds) = by_kind {
        pick_by_kind(tx, &kinds, now_us, request.limit, &mut limited, &mut picked)?;
    } else {
        let mut stmt = tx
            .prepare_cached(&format!(
                "SELECT {COLUMNS}, seq FROM fascicle_operations AS o
                 WHERE status = 'pending' AND payload IS NOT NULL AND waiting_on = 0
                   AND run_at <= ?1
                   AND NOT EXISTS (SELECT 1 FROM fascicle_paused_kinds AS pk
                                   WHERE pk.kind = o.kind)
                   AND (serialization_key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM fascicle_operations AS h
                        WHERE h.serialization_key = o.serialization_key
                          AND h.status = 'processing'))
                 ORDER BY priority DESC, run_at, seq"
            ))
            .db()?;
        let mut rows = stmt.query(params![now_us]).db()?;
        let mut keys = std::collections::HashSet::new();
        while picked.len() < request.limit {
            let Some(row) = rows.next().db()? else { break };
            // Column 7 of COLUMNS is serialization_key; `seq` follows the last of them.
            let key: Option<String> = row.get(7).db()?;
            if let Some(key) = &key
                && keys.contains(key)
            {
                continue;
            }
            if !limited.is_empty() {
                // Column 1 of COLUMNS is the kind.
                let kind = row
                    .get_ref(1)
                    .db()?
                    .as_str()
                    .map_err(rusqlite::Error::from)
                    .db()?;
                if let Some(kind) = limited.get_mut(kind) {
                    if kind.room == 0 {
                        continue;
                    }
                    kind.room -= 1;
                    kind.started += 1;
                }
            }
            let operation = operation_from_row(row).db()?;
            if let Some(key) = key {
                keys.insert(key);
            }
            picked.push((row.get(COLUMN_COUNT).db()?, operation));
        }
    }
    record_starts(tx, &limited, now)?;
    let mut stmt = tx
        .prepare_cached(
            "UPDATE fascicle_operations SET status = 'processing', attempts = attempts + 1,
                 worker_id = ?2, lease_token = ?3, lease_expires_at = ?4, updated_at = ?5
             WHERE seq = ?1 AND status = 'pending'",
        )
        .db()?;
    let (lease_expires_at, updated_at) = (instant(lease_until).db()?, instant(now_us).db()?);
    let mut claimed = Vec::with_capacity(picked.len());
    for (seq, mut operation) in picked {
        let token = LeaseToken::new();
        let changed = stmt
            .execute(params![
                seq,
                request.worker_id,
                token.as_uuid().as_bytes(),
                lease_until,
                now_us
            ])
            .db()?;
        if changed != 1 {
            // Read as pending in this same transaction: cannot happen, but a row that did
            // not change is not claimed.
            continue;
        }
        operation.status = Status::Processing;
        operation.attempts += 1;
        operation.worker_id = Some(request.worker_id.clone());
        operation.lease_expires_at = Some(lease_expires_at);
        operation.updated_at = updated_at;
        claimed.push(ClaimedOperation {
            operation,
            lease_token: token,
        });
    }
    Ok(claimed)
}

/// The paused kinds.
fn paused_kinds(tx: &Transaction<'_>) -> Result<std::collections::HashSet<String>> {
    let mut stmt = tx
        .prepare_cached("SELECT kind FROM fascicle_paused_kinds")
        .db()?;
    let kinds = stmt
        .query_map([], |row| row.get(0))
        .db()?
        .collect::<rusqlite::Result<_>>()
        .db()?;
    Ok(kinds)
}

/// A kind's next ready row in a claim by kind: its claim order, key and row.
struct Head {
    order: (std::cmp::Reverse<i64>, i64, i64),
    key: Option<String>,
    operation: Operation,
}

/// Picks up to `limit` ready operations of `kinds` (none paused, none without room) in
/// claim order, merging each kind's own ordered scan: one per serialization key, at most
/// a limited kind's room of it.
fn pick_by_kind(
    tx: &Transaction<'_>,
    kinds: &std::collections::BTreeSet<String>,
    now_us: i64,
    limit: usize,
    limited: &mut std::collections::HashMap<String, LimitedKind>,
    picked: &mut Vec<(i64, Operation)>,
) -> Result<()> {
    let sql = format!(
        "SELECT {COLUMNS}, seq FROM fascicle_operations AS o INDEXED BY fascicle_operations_ready_by_kind
         WHERE kind = ?2 AND status = 'pending' AND payload IS NOT NULL AND waiting_on = 0
           AND run_at <= ?1
           AND (serialization_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM fascicle_operations AS h
                WHERE h.serialization_key = o.serialization_key
                  AND h.status = 'processing'))
         ORDER BY priority DESC, run_at, seq"
    );
    let mut statements = Vec::with_capacity(kinds.len());
    for _ in kinds {
        statements.push(tx.prepare_cached(&sql).db()?);
    }
    let mut cursors = Vec::with_capacity(kinds.len());
    for (stmt, kind) in statements.iter_mut().zip(kinds) {
        cursors.push((kind.as_str(), stmt.query(params![now_us, kind]).db()?));
    }
    fn head(row: Option<&rusqlite::Row<'_>>) -> Result<Option<Head>> {
        let Some(row) = row else { return Ok(None) };
        // Columns 6, 7 and 10 of COLUMNS: priority, serialization_key, run_at.
        Ok(Some(Head {
            order: (
                std::cmp::Reverse(row.get(6).db()?),
                row.get(10).db()?,
                row.get(COLUMN_COUNT).db()?,
            ),
            key: row.get(7).db()?,
            operation: operation_from_row(row).db()?,
        }))
    }
    let mut heads = Vec::with_capacity(cursors.len());
    for (_, rows) in &mut cursors {
        heads.push(head(rows.next().db()?)?);
    }
    let mut keys = std::collections::HashSet::new();
    while picked.len() < limit {
        let Some(lane) = heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|h| (i, h.order)))
            .min_by_key(|(_, order)| *order)
            .map(|(i, _)| i)
        else {
            break;
        };
        let head_row = heads[lane].take().expect("a head");
        let (kind, rows) = &mut cursors[lane];
        if limited.get(*kind).is_none_or(|l| l.room > 0) {
            heads[lane] = head(rows.next().db()?)?;
        }
        if let Some(key) = &head_row.key
            && !keys.insert(key.clone())
        {
            continue;
        }
        if let Some(l) = limited.get_mut(*kind) {
            if l.room == 0 {
                continue;
            }
            l.room -= 1;
            l.started += 1;
            if l.room == 0 {
                heads[lane] = None;
            }
        }
        picked.push((head_row.order.2, head_row.operation));
    }
    Ok(())
}

/// A limited kind as a claim sees it.
struct LimitedKind {
    limit: KindLimit,
    recent_starts: Vec<DateTime<Utc>>,
    /// How many more of the kind this claim may start.
    room: usize,
    /// How many it started.
    started: usize,
}

/// The limited kinds with their room at `now`: each one's limit, less its `processing`
/// operations and its starts inside the rate window.
fn limited_kinds(
    tx: &Transaction<'_>,
    now: DateTime<Utc>,
) -> Result<std::collections::HashMap<String, LimitedKind>> {
    let mut stmt = tx
        .prepare_cached(
            "SELECT kind, max_running, rate_starts, rate_period_us, recent_starts,
                    (SELECT count(*) FROM fascicle_operations AS o
                         INDEXED BY fascicle_operations_running_by_kind
                     WHERE o.status = 'processing' AND o.kind = l.kind)
             FROM fascicle_kind_limits AS l",
        )
        .db()?;
    let mut rows = stmt.query([]).db()?;
    let mut limited = std::collections::HashMap::new();
    while let Some(row) = rows.next().db()? {
        let kind: String = row.get(0).db()?;
        let limit = KindLimit::from_stored(row.get(1).db()?, row.get(2).db()?, row.get(3).db()?);
        let recent: String = row.get(4).db()?;
        let recent_starts = parse_starts(&recent)?;
        let running: i64 = row.get(5).db()?;
        let room = limit.room(running as u64, &recent_starts, now);
        limited.insert(
            kind,
            LimitedKind {
                limit,
                recent_starts,
                room,
                started: 0,
            },
        );
    }
    Ok(limited)
}

/// Writes the rate windows of the kinds a claim started operations of.
fn record_starts(
    tx: &Transaction<'_>,
    limited: &std::collections::HashMap<String, LimitedKind>,
    now: DateTime<Utc>,
) -> Result<()> {
    for (kind, limited) in limited {
        if limited.started == 0 || limited.limit.rate.is_none() {
            continue;
        }
        let kept = limited
            .limit
            .record_starts(&limited.recent_starts, limited.started, now);
        let kept: Vec<i64> = kept.into_iter().map(micros).collect();
        tx.prepare_cached("UPDATE fascicle_kind_limits SET recent_starts = ?2 WHERE kind = ?1")
            .db()?
            .execute(params![
                kind,
                serde_json::to_string(&kept).expect("integers serialize")
            ])
            .db()?;
    }
    Ok(())
}

fn parse_starts(text: &str) -> Result<Vec<DateTime<Utc>>> {
    let micros: Vec<i64> =
        serde_json::from_str(text).map_err(|e| fascicle_api::Error::Storage {
            location: "fascicle_kind_limits".into(),
            reason: format!("a kind's recent starts are not a JSON array of integers: {e}"),
        })?;
    micros.into_iter().map(|us| instant(us).db()).collect()
}

/// Children's terminal outcomes to add to one parent's counters.
#[derive(Clone, Copy, Default)]
struct Delta {
    completed: i64,
    failed: i64,
    cancelled: i64,
}

impl Delta {
    fn of(status: Status) -> Self {
        match status {
            Status::Completed => Self {
                completed: 1,
                ..Self::default()
            },
            Status::Failed => Self {
                failed: 1,
                ..Self::default()
            },
            _ => Self {
                cancelled: 1,
                ..Self::default()
            },
        }
    }

    fn add(&mut self, other: Self) {
        self.completed += other.completed;
        self.failed += other.failed;
        self.cancelled += other.cancelled;
    }
}

/// Parents whose counters a transaction moves, with their children's outcomes.
type Moves = std::collections::BTreeMap<Vec<u8>, Delta>;

/// One operation's terminal transition: it is moved to `status` (from `pending` or
/// `processing`; under `token` when one is given), its outcome is added to `moves` (the
/// caller moves the parents), and its dependents are released (`ReleaseDependents`).
/// Returns whether it changed.
#[allow(clippy::too_many_arguments)]
fn end_one(
    tx: &Transaction<'_>,
    id: &OperationId,
    token: Option<&LeaseToken>,
    status: Status,
    error: Option<&str>,
    result: Option<String>,
    now: i64,
    moves: &mut Moves,
) -> Result<bool> {
    // Found first, then changed by rowid (no `RETURNING`: see `claim`).
    let found: Option<(i64, Option<Vec<u8>>, Option<String>)> = tx
        .prepare_cached(
            "SELECT seq, parent_id, dependents FROM fascicle_operations
             WHERE id = ?1 AND status IN ('pending', 'processing')
               AND (?2 IS NULL OR (status = 'processing' AND lease_token = ?2))",
        )
        .db()?
        .query_row(
            params![
                id.as_bytes(),
                token.map(|t| t.as_uuid().as_bytes().to_vec())
            ],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .optional()
        .db()?;
    let Some((seq, parent, dependents)) = found else {
        return Ok(false);
    };
    tx.prepare_cached(
        "UPDATE fascicle_operations SET status = ?2, error = ?3, result = ?4,
             worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
             waiting_on = 0, updated_at = ?5, completed_at = ?5
         WHERE seq = ?1",
    )
    .db()?
    .execute(params![seq, status.as_str(), error, result, now])
    .db()?;
    if let Some(parent) = parent {
        moves.entry(parent).or_default().add(Delta::of(status));
    }
    if dependents.is_some() {
        release_dependents(tx, id, status, dependents.as_deref(), now, moves)?;
    }
    Ok(true)
}

/// `ReleaseDependents` of `id`, which just ended `status`: each pending dependent waits
/// for one dependency fewer, or — when it needs `id` completed and `id` did not
/// complete — is cancelled (`dependency_failed`), releasing its own in turn.
fn release_dependents(
    tx: &Transaction<'_>,
    id: &OperationId,
    status: Status,
    dependents: Option<&str>,
    now: i64,
    moves: &mut Moves,
) -> Result<()> {
    for edge in fascicle_api::Dependency::list_from_json(dependents)? {
        if edge.released_by(status) {
            tx.prepare_cached(
                "UPDATE fascicle_operations SET waiting_on = waiting_on - 1, updated_at = ?2
                 WHERE id = ?1 AND status = 'pending' AND waiting_on > 0",
            )
            .db()?
            .execute(params![edge.id.as_bytes(), now])
            .db()?;
            continue;
        }
        let pending = tx
            .prepare_cached(
                "SELECT 1 FROM fascicle_operations WHERE id = ?1 AND status = 'pending'",
            )
            .db()?
            .query_row(params![edge.id.as_bytes()], |_| Ok(()))
            .optional()
            .db()?
            .is_some();
        if pending {
            let reason = messages::cancelled_by_dependency(id, status);
            end_one(
                tx,
                &edge.id,
                None,
                Status::Cancelled,
                Some(&reason),
                None,
                now,
                moves,
            )?;
        }
    }
    Ok(())
}

/// Adds children's outcomes to a parent's counters (O(1), whatever the batch size); when
/// a child failed for good under `FailFast`, cancels the siblings (`fail_fast_*`); and
/// finalizes the parent when no child is left open.
fn move_parent(tx: &Transaction<'_>, parent: &[u8], delta: Delta, now: i64) -> Result<()> {
    let moved = tx
        .prepare_cached(
            "UPDATE fascicle_operations SET children_completed = children_completed + ?2,
                 children_failed = children_failed + ?3,
                 children_cancelled = children_cancelled + ?4, updated_at = ?5
             WHERE id = ?1
             RETURNING children_total, children_completed, children_failed,
                       children_cancelled, status = 'pending', failure_policy",
        )
        .db()?
        .query_row(
            params![parent, delta.completed, delta.failed, delta.cancelled, now],
            |row| {
                Ok((
                    counters_at(row, 0)?,
                    row.get::<_, bool>(4)?,
                    row.get::<_, Option<String>>(5)?,
                ))
            },
        )
        .optional()
        .db()?;
    let Some((counters, true, policy)) = moved else {
        return Ok(());
    };
    let policy = FailurePolicy::from_stored(policy.as_deref())?;
    if delta.failed > 0 && policy == FailurePolicy::FailFast {
        fail_fast(tx, parent, now)?;
        return finalize_if_done(tx, parent, now);
    }
    if parent_outcome(&counters).is_some() {
        finalize_parent(tx, parent, &counters, policy, now)?;
    }
    Ok(())
}

/// A parent's four counters (total, completed, failed, cancelled) from the columns of
/// `row` starting at `first`.
fn counters_at(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<ChildCounters> {
    let get = |i: usize| -> rusqlite::Result<u64> { Ok(row.get::<_, i64>(first + i)? as u64) };
    Ok(ChildCounters {
        total: get(0)?,
        completed: get(1)?,
        failed: get(2)?,
        cancelled: get(3)?,
    })
}

/// Finalizes `parent` when it is still pending and its counters, as stored now, say no
/// child is left open.
fn finalize_if_done(tx: &Transaction<'_>, parent: &[u8], now: i64) -> Result<()> {
    let found = tx
        .prepare_cached(
            "SELECT children_total, children_completed, children_failed, children_cancelled,
                    failure_policy
             FROM fascicle_operations WHERE id = ?1 AND status = 'pending'",
        )
        .db()?
        .query_row(params![parent], |row| {
            Ok((counters_at(row, 0)?, row.get::<_, Option<String>>(4)?))
        })
        .optional()
        .db()?;
    if let Some((counters, policy)) = found
        && parent_outcome(&counters).is_some()
    {
        let policy = FailurePolicy::from_stored(policy.as_deref())?;
        finalize_parent(tx, parent, &counters, policy, now)?;
    }
    Ok(())
}

/// The batch `?1` and every batch nested in it, as the relation `tree(id)`.
const TREE: &str = "WITH RECURSIVE tree(id) AS (
         SELECT ?1 UNION ALL
         SELECT o.id FROM fascicle_operations AS o JOIN tree AS t ON o.parent_id = t.id
         WHERE o.payload IS NULL)";

/// One step over the tree of the batch `root`: every pending operation is cancelled with
/// `reason`, the dependents left pending are released, every processing one is asked to
/// stop (`request_cancel`), then the batches are moved (finalizing those with no child
/// left open). Returns (cancelled, signalled).
fn cancel_tree(tx: &Transaction<'_>, root: &[u8], reason: &str, now: i64) -> Result<(u64, u64)> {
    let ended: Vec<(Vec<u8>, Vec<u8>, Option<String>)> = tx
        .prepare_cached(&format!(
            "{TREE}
             UPDATE fascicle_operations SET status = 'cancelled', error = ?2,
                 waiting_on = 0, updated_at = ?3, completed_at = ?3
             WHERE parent_id IN tree AND status = 'pending' AND payload IS NOT NULL
             RETURNING id, parent_id, dependents"
        ))
        .db()?
        .query_map(params![root, reason, now], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .db()?
        .collect::<rusqlite::Result<_>>()
        .db()?;
    let mut moves = Moves::new();
    for (_, parent, _) in &ended {
        moves
            .entry(parent.clone())
            .or_default()
            .add(Delta::of(Status::Cancelled));
    }
    for (id, _, dependents) in &ended {
        if dependents.is_some() {
            let id = id_of(id.clone())?;
            release_dependents(
                tx,
                &id,
                Status::Cancelled,
                dependents.as_deref(),
                now,
                &mut moves,
            )?;
        }
    }
    let signalled = tx
        .prepare_cached(&format!(
            "{TREE}
             UPDATE fascicle_operations SET cancel_requested = 1, updated_at = ?2
             WHERE parent_id IN tree AND status = 'processing'"
        ))
        .db()?
        .execute(params![root, now])
        .db()? as u64;
    for (parent, delta) in moves {
        move_parent(tx, &parent, delta, now)?;
    }
    Ok((ended.len() as u64, signalled))
}

/// After the batch `id` ended in `status` (`finalize_parent`, `reconcile_*`): what waits
/// for it is released (`ReleaseDependents`), and a nested batch's outcome is counted into
/// the batch holding it (`CountIntoOuterBatch`).
fn batch_ended(
    tx: &Transaction<'_>,
    id: &[u8],
    status: Status,
    outer: Option<Vec<u8>>,
    dependents: Option<String>,
    now: i64,
) -> Result<()> {
    let mut moves = Moves::new();
    if let Some(outer) = outer {
        moves.entry(outer).or_default().add(Delta::of(status));
    }
    if dependents.is_some() {
        let id = id_of(id.to_vec())?;
        release_dependents(tx, &id, status, dependents.as_deref(), now, &mut moves)?;
    }
    for (parent, delta) in moves {
        move_parent(tx, &parent, delta, now)?;
    }
    Ok(())
}

/// The first failed child of a batch (earliest `completed_at`, then submission order):
/// the one a `FailFast` batch names and takes its error from.
fn first_failure(tx: &Transaction<'_>, parent: &[u8]) -> Result<Option<(Vec<u8>, Option<String>)>> {
    tx.prepare_cached(
        "SELECT id, error FROM fascicle_operations
         WHERE parent_id = ?1 AND status = 'failed' ORDER BY completed_at, seq LIMIT 1",
    )
    .db()?
    .query_row(params![parent], |row| Ok((row.get(0)?, row.get(1)?)))
    .optional()
    .db()
}

/// `fail_fast_cancel_pending` and `fail_fast_request_cancel`: a child of the `FailFast`
/// batch `parent` failed for good. The pending operations of its tree are cancelled
/// naming it and its running ones asked to stop, in one step.
fn fail_fast(tx: &Transaction<'_>, parent: &[u8], now: i64) -> Result<()> {
    let Some((failed, _)) = first_failure(tx, parent)? else {
        return Ok(());
    };
    let reason = messages::cancelled_by_fail_fast(id_of(failed)?);
    cancel_tree(tx, parent, &reason, now)?;
    Ok(())
}

/// [`end_one`] plus the parents' counters, for one operation. Returns whether the
/// operation changed.
fn finish(
    tx: &Transaction<'_>,
    id: &OperationId,
    token: Option<&LeaseToken>,
    status: Status,
    error: Option<&str>,
    result: Option<String>,
    now: i64,
) -> Result<bool> {
    let mut moves = Moves::new();
    let changed = end_one(tx, id, token, status, error, result, now, &mut moves)?;
    for (parent, delta) in moves {
        move_parent(tx, &parent, delta, now)?;
    }
    Ok(changed)
}

/// Finalizes a pending parent whose counters (as just written) say every child is
/// terminal, to the state its policy gives, and inserts the callbacks that outcome
/// selects; a parent that is no longer pending is left alone.
fn finalize_parent(
    tx: &Transaction<'_>,
    parent: &[u8],
    counters: &ChildCounters,
    policy: FailurePolicy,
    now: i64,
) -> Result<bool> {
    let Some(outcome) = policy.outcome(counters) else {
        return Ok(false);
    };
    let error = match outcome {
        Status::Failed if policy == FailurePolicy::FailFast => {
            first_failure(tx, parent)?.and_then(|(_, error)| error)
        }
        // A failed batch's representative error is chosen in the database: one row
        // comes back, whatever the number of failed children.
        Status::Failed => tx
            .prepare_cached(
                "SELECT error, count(*) FROM fascicle_operations
                 WHERE parent_id = ?1 AND status = 'failed' AND error IS NOT NULL
                 GROUP BY error ORDER BY count(*) DESC, error LIMIT 1",
            )
            .db()?
            .query_row(params![parent], |row| {
                Ok(representative_error(
                    &row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)? as u64,
                ))
            })
            .optional()
            .db()?,
        _ => None,
    };
    type Finalized = (String, Option<String>, Option<Vec<u8>>, Option<String>);
    let finalized: Option<Finalized> = tx
        .prepare_cached(
            "UPDATE fascicle_operations SET status = ?2, error = ?3, result = ?4,
                 updated_at = ?5, completed_at = ?5
             WHERE id = ?1 AND status = 'pending'
             RETURNING kind, callbacks, parent_id, dependents",
        )
        .db()?
        .query_row(
            params![
                parent,
                outcome.as_str(),
                error,
                parent_summary(counters).to_string(),
                now
            ],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .optional()
        .db()?;
    let Some((kind, callbacks, outer, dependents)) = finalized else {
        return Ok(false);
    };
    let finalized = workflow::Finalized {
        id: id_of(parent.to_vec())?,
        kind: &kind,
        outcome,
        children: counters,
        error: error.as_deref(),
    };
    fire_callbacks(tx, callbacks.as_deref(), finalized, now)?;
    batch_ended(tx, parent, outcome, outer, dependents, now)?;
    Ok(true)
}

/// Inserts the callbacks (a parent's stored `callbacks`) that `batch`'s outcome selects,
/// in the transaction that finalized it.
fn fire_callbacks(
    tx: &Transaction<'_>,
    callbacks: Option<&str>,
    batch: workflow::Finalized<'_>,
    now: i64,
) -> Result<()> {
    let Some(callbacks) = callbacks else {
        return Ok(());
    };
    let plan = BatchPlan::from_stored(None, Some(callbacks))?;
    let fired = workflow::fire(&plan.callbacks, batch, instant(now).db()?);
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO fascicle_operations
                 (id, kind, status, payload, parent_id, priority, serialization_key, attempts,
                  max_attempts, run_at, created_at, updated_at, timeout_ms, callback_for)
             VALUES (?1, ?2, 'pending', ?3, NULL, ?4, ?5, 0, ?6, ?7, ?7, ?7, ?8, ?9)",
        )
        .db()?;
    for (record, info) in fired {
        stmt.execute(params![
            record.id.as_bytes(),
            record.kind,
            record.payload_json,
            record.priority,
            record.serialization_key,
            record.max_attempts,
            now,
            record.timeout.map(|t| t.as_millis() as i64),
            info.to_json(),
        ])
        .db()?;
    }
    Ok(())
}

pub(crate) fn complete(
    tx: &Transaction<'_>,
    completions: &[Completion],
    now: DateTime<Utc>,
) -> Result<Vec<Applied>> {
    let now = micros(now);
    let mut applied = Vec::with_capacity(completions.len());
    // Children's outcomes are added to each parent once per call, not once per child.
    let mut parents = Moves::new();
    for c in completions {
        let token = Some(&c.lease_token);
        let mut terminal = |status: Status, error: Option<&str>, result: Option<String>| {
            end_one(tx, &c.id, token, status, error, result, now, &mut parents)
        };
        let changed = match &c.outcome {
            Outcome::Completed(result) => terminal(
                Status::Completed,
                None,
                Some(fascicle_api::to_stored_text(result)),
            )?,
            Outcome::Failed(error) => terminal(Status::Failed, Some(error), None)?,
            Outcome::Cancelled(reason) => terminal(Status::Cancelled, Some(reason), None)?,
            Outcome::Retry { error, run_at } => {
                if retry(tx, c, error, micros(*run_at), now)? {
                    true
                } else if cancel_requested(tx, &c.id, &c.lease_token)? {
                    // `retry_after_cancel`: a cancelled operation is not re-queued.
                    let error = messages::cancelled_instead_of_retry(error);
                    terminal(Status::Cancelled, Some(&error), None)?
                } else {
                    false
                }
            }
        };
        applied.push(if changed {
            Applied::Applied
        } else {
            Applied::LeaseLost
        });
    }
    for (parent, delta) in parents {
        move_parent(tx, &parent, delta, now)?;
    }
    Ok(applied)
}

/// The `retry` row: back to `pending` under the attempt's lease, unless a cancel was
/// requested. Returns whether it applied.
fn retry(tx: &Transaction<'_>, c: &Completion, error: &str, run_at: i64, now: i64) -> Result<bool> {
    Ok(tx
        .prepare_cached(
            "UPDATE fascicle_operations SET status = 'pending', error = ?3, run_at = ?4,
                 worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = ?5
             WHERE id = ?1 AND status = 'processing' AND lease_token = ?2
               AND cancel_requested = 0",
        )
        .db()?
        .execute(params![
            c.id.as_bytes(),
            c.lease_token.as_uuid().as_bytes(),
            error,
            run_at,
            now
        ])
        .db()?
        == 1)
}

/// Whether `id` is still held under `token` with a cancel request pending.
fn cancel_requested(tx: &Transaction<'_>, id: &OperationId, token: &LeaseToken) -> Result<bool> {
    Ok(tx
        .prepare_cached(
            "SELECT cancel_requested FROM fascicle_operations
             WHERE id = ?1 AND status = 'processing' AND lease_token = ?2",
        )
        .db()?
        .query_row(params![id.as_bytes(), token.as_uuid().as_bytes()], |row| {
            row.get::<_, bool>(0)
        })
        .optional()
        .db()?
        .unwrap_or(false))
}

pub(crate) fn heartbeat(
    tx: &Transaction<'_>,
    leases: &[Lease],
    until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Vec<LeaseStatus>> {
    let mut stmt = tx
        .prepare_cached(
            "UPDATE fascicle_operations SET lease_expires_at = ?3, updated_at = ?4
             WHERE id = ?1 AND status = 'processing' AND lease_token = ?2
             RETURNING cancel_requested",
        )
        .db()?;
    leases
        .iter()
        .map(|l| {
            let cancel: Option<bool> = stmt
                .query_row(
                    params![
                        l.id.as_bytes(),
                        l.token.as_uuid().as_bytes(),
                        micros(until),
                        micros(now)
                    ],
                    |row| row.get(0),
                )
                .optional()
                .db()?;
            Ok(LeaseStatus {
                held: cancel.is_some(),
                cancel_requested: cancel.unwrap_or(false),
            })
        })
        .collect()
}

pub(crate) fn release(tx: &Transaction<'_>, leases: &[Lease], now: DateTime<Utc>) -> Result<u64> {
    let now = micros(now);
    let mut released = 0;
    for l in leases {
        let changed = tx
            .prepare_cached(
                "UPDATE fascicle_operations SET status = 'pending',
                     attempts = max(attempts - 1, 0), worker_id = NULL, lease_token = NULL,
                     lease_expires_at = NULL, updated_at = ?3
                 WHERE id = ?1 AND status = 'processing' AND lease_token = ?2
                   AND cancel_requested = 0",
            )
            .db()?
            .execute(params![l.id.as_bytes(), l.token.as_uuid().as_bytes(), now])
            .db()?
            == 1;
        // `release_after_cancel`: a cancelled operation is not re-queued.
        let cancelled = !changed
            && cancel_requested(tx, &l.id, &l.token)?
            && finish(
                tx,
                &l.id,
                Some(&l.token),
                Status::Cancelled,
                Some(messages::CANCELLED_AT_RELEASE),
                None,
                now,
            )?;
        released += u64::from(changed || cancelled);
    }
    Ok(released)
}

fn id_of(bytes: Vec<u8>) -> Result<OperationId> {
    uuid::Uuid::from_slice(&bytes)
        .map(OperationId::from_uuid)
        .map_err(|e| Error::backend(error::DRIVER, fascicle_api::BackendErrorKind::Other, e))
}

pub(crate) fn rescue(tx: &Transaction<'_>, now: DateTime<Utc>) -> Result<RescueReport> {
    let now = micros(now);
    let expired: Vec<(Vec<u8>, u32, u32, bool)> = tx
        .prepare_cached(
            "SELECT id, attempts, max_attempts, cancel_requested FROM fascicle_operations
             WHERE status = 'processing' AND lease_expires_at < ?1",
        )
        .db()?
        .query_map(params![now], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .db()?
        .collect::<rusqlite::Result<_>>()
        .db()?;
    let mut report = RescueReport::default();
    // One step, as PostgreSQL takes it in one statement: every requeue first, then every
    // ending, then each touched parent moved once (fail-fast, finalization).
    let mut endings = Vec::new();
    for (id, attempts, max_attempts, cancel) in expired {
        let id = id_of(id)?;
        let rescue = table::rescue_of(cancel, attempts, max_attempts);
        if rescue == table::RESCUE {
            report.requeued += tx
                .prepare_cached(
                    "UPDATE fascicle_operations SET status = 'pending', error = ?3,
                         worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
                         run_at = ?2, updated_at = ?2
                     WHERE id = ?1 AND status = 'processing' AND lease_expires_at < ?2
                       AND cancel_requested = 0",
                )
                .db()?
                .execute(params![id.as_bytes(), now, messages::LEASE_EXPIRED])
                .db()? as u64;
        } else if rescue == table::RESCUE_AFTER_CANCEL {
            endings.push((
                id,
                Status::Cancelled,
                messages::CANCELLED_AT_RESCUE.to_owned(),
            ));
        } else {
            let error = messages::lease_expired_on_last_attempt(attempts);
            endings.push((id, Status::Failed, error));
        }
    }
    let mut moves = Moves::new();
    for (id, status, error) in endings {
        if end_one(tx, &id, None, status, Some(&error), None, now, &mut moves)? {
            if status == Status::Cancelled {
                report.cancelled += 1;
            } else {
                report.failed += 1;
            }
        }
    }
    for (parent, delta) in moves {
        move_parent(tx, &parent, delta, now)?;
    }
    Ok(report)
}

pub(crate) fn reconcile(tx: &Transaction<'_>, now: DateTime<Utc>) -> Result<ReconcileReport> {
    let now = micros(now);
    let stranded: Vec<(Vec<u8>, Option<String>)> = tx
        .prepare_cached(
            "SELECT id, failure_policy FROM fascicle_operations AS p
             WHERE payload IS NULL AND status = 'pending'
               AND NOT EXISTS (SELECT 1 FROM fascicle_operations AS c
                               WHERE c.parent_id = p.id AND c.status IN ('pending', 'processing'))",
        )
        .db()?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .db()?
        .collect::<rusqlite::Result<_>>()
        .db()?;
    let mut report = ReconcileReport::default();
    for (parent, policy) in stranded {
        let policy = FailurePolicy::from_stored(policy.as_deref())?;
        let mut counters = ChildCounters::default();
        {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT status, count(*) FROM fascicle_operations WHERE parent_id = ?1
                     GROUP BY status",
                )
                .db()?;
            let mut rows = stmt.query(params![parent]).db()?;
            while let Some(row) = rows.next().db()? {
                let status: String = row.get(0).db()?;
                let n = row.get::<_, i64>(1).db()? as u64;
                counters.total += n;
                match status.as_str() {
                    "completed" => counters.completed += n,
                    "failed" => counters.failed += n,
                    _ => counters.cancelled += n,
                }
            }
        }
        if counters.total == 0 {
            type Failed = (String, Option<String>, Option<Vec<u8>>, Option<String>);
            let failed: Option<Failed> = tx
                .prepare_cached(
                    "UPDATE fascicle_operations SET status = 'failed', error = ?2,
                         children_total = 0, updated_at = ?3, completed_at = ?3
                     WHERE id = ?1 AND status = 'pending'
                     RETURNING kind, callbacks, parent_id, dependents",
                )
                .db()?
                .query_row(params![parent, ZERO_CHILDREN_REASON, now], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })
                .optional()
                .db()?;
            if let Some((kind, callbacks, outer, dependents)) = failed {
                let batch = workflow::Finalized {
                    id: id_of(parent.clone())?,
                    kind: &kind,
                    outcome: Status::Failed,
                    children: &counters,
                    error: Some(ZERO_CHILDREN_REASON),
                };
                fire_callbacks(tx, callbacks.as_deref(), batch, now)?;
                batch_ended(tx, &parent, Status::Failed, outer, dependents, now)?;
                report.empty_parents_failed += 1;
            }
            continue;
        }
        tx.prepare_cached(
            "UPDATE fascicle_operations SET children_total = ?2, children_completed = ?3,
                 children_failed = ?4, children_cancelled = ?5
             WHERE id = ?1",
        )
        .db()?
        .execute(params![
            parent,
            counters.total as i64,
            counters.completed as i64,
            counters.failed as i64,
            counters.cancelled as i64
        ])
        .db()?;
        if finalize_parent(tx, &parent, &counters, policy, now)? {
            report.parents_finalized += 1;
        }
    }
    Ok(report)
}

fn cancel_one(
    tx: &Transaction<'_>,
    id: &OperationId,
    status: Status,
    now: i64,
    report: &mut CancelReport,
) -> Result<()> {
    match status {
        Status::Pending => {
            if finish(
                tx,
                id,
                None,
                Status::Cancelled,
                Some(messages::CANCELLED_BEFORE_RUN),
                None,
                now,
            )? {
                report.cancelled += 1;
            }
        }
        Status::Processing => {
            tx.prepare_cached(
                "UPDATE fascicle_operations SET cancel_requested = 1, updated_at = ?2
                 WHERE id = ?1 AND status = 'processing'",
            )
            .db()?
            .execute(params![id.as_bytes(), now])
            .db()?;
            report.signalled += 1;
        }
        _ => report.already_terminal += 1,
    }
    Ok(())
}

fn status_of(text: String) -> Result<Status> {
    text.parse()
}

pub(crate) fn cancel(
    tx: &Transaction<'_>,
    id: OperationId,
    now: DateTime<Utc>,
) -> Result<CancelReport> {
    let now = micros(now);
    let found: Option<(String, bool)> = tx
        .prepare_cached("SELECT status, payload IS NULL FROM fascicle_operations WHERE id = ?1")
        .db()?
        .query_row(params![id.as_bytes()], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .db()?;
    let Some((status, is_parent)) = found else {
        return Err(Error::NotFound(format!("operation {id} does not exist")));
    };
    let mut report = CancelReport::default();
    if is_parent {
        // `cancel_pending` for every pending operation of the tree at once, then
        // `request_cancel` for the running ones.
        let operations: i64 = tx
            .prepare_cached(&format!(
                "{TREE}
                 SELECT count(*) FROM fascicle_operations
                 WHERE parent_id IN tree AND payload IS NOT NULL"
            ))
            .db()?
            .query_row(params![id.as_bytes()], |row| row.get(0))
            .db()?;
        let (cancelled, signalled) =
            cancel_tree(tx, id.as_bytes(), messages::CANCELLED_BEFORE_RUN, now)?;
        report.cancelled = cancelled;
        report.signalled = signalled;
        report.already_terminal = (operations as u64).saturating_sub(cancelled + signalled);
    } else {
        cancel_one(tx, &id, status_of(status)?, now, &mut report)?;
    }
    Ok(report)
}

pub(crate) fn retry_batch(
    tx: &Transaction<'_>,
    parent: OperationId,
    now: DateTime<Utc>,
) -> Result<u64> {
    let now = micros(now);
    let is_parent: Option<bool> = tx
        .prepare_cached("SELECT payload IS NULL FROM fascicle_operations WHERE id = ?1")
        .db()?
        .query_row(params![parent.as_bytes()], |row| row.get(0))
        .optional()
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
    // The failed and cancelled operations of the tree, with what they wait for.
    let retried: Vec<(Vec<u8>, Option<String>)> = tx
        .prepare_cached(&format!(
            "{TREE}
             SELECT o.id, d.list FROM fascicle_operations AS o
             LEFT JOIN fascicle_depends_on AS d ON d.operation = o.id
             WHERE o.parent_id IN tree AND o.payload IS NOT NULL
               AND o.status IN ('failed', 'cancelled')"
        ))
        .db()?
        .query_map(params![parent.as_bytes()], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .db()?
        .collect::<rusqlite::Result<_>>()
        .db()?;
    if retried.is_empty() {
        return Err(Error::Conflict(format!(
            "batch {parent} has no failed or cancelled children to retry"
        )));
    }
    // A re-queued operation must not need completed what ended otherwise outside the
    // tree (it would wait for ever); what is inside is re-queued or reopens.
    let tree: std::collections::HashSet<Vec<u8>> = tx
        .prepare_cached(&format!("{TREE} SELECT id FROM tree"))
        .db()?
        .query_map(params![parent.as_bytes()], |row| row.get(0))
        .db()?
        .collect::<rusqlite::Result<_>>()
        .db()?;
    for (id, after) in &retried {
        for dependency in fascicle_api::Dependency::list_from_json(after.as_deref())? {
            if dependency.any {
                continue;
            }
            let found: Option<(String, Option<Vec<u8>>)> = tx
                .prepare_cached("SELECT status, parent_id FROM fascicle_operations WHERE id = ?1")
                .db()?
                .query_row(params![dependency.id.as_bytes()], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()
                .db()?;
            let Some((status, holder)) = found else {
                continue;
            };
            if holder.is_some_and(|h| tree.contains(&h)) {
                continue;
            }
            if let ended @ (Status::Failed | Status::Cancelled) = status_of(status)? {
                return Err(Error::Conflict(messages::retry_strands_a_dependent(
                    parent,
                    id_of(id.clone())?,
                    dependency.id,
                    ended,
                )));
            }
        }
    }
    let mut requeue = tx
        .prepare_cached(
            "UPDATE fascicle_operations SET status = 'pending', attempts = 0, error = NULL,
                 result = NULL, cancel_requested = 0, run_at = ?2, updated_at = ?2,
                 completed_at = NULL
             WHERE id = ?1 RETURNING parent_id",
        )
        .db()?;
    // The batches that reopen: each holding a re-queued operation, up to the tree's root
    // (the batch retried and the batches holding it).
    let mut reopen: Vec<Vec<u8>> = Vec::new();
    for (id, _) in &retried {
        let mut at: Option<Vec<u8>> = requeue.query_row(params![id, now], |row| row.get(0)).db()?;
        while let Some(batch) = at {
            if reopen.contains(&batch) {
                break;
            }
            at = tx
                .prepare_cached("SELECT parent_id FROM fascicle_operations WHERE id = ?1")
                .db()?
                .query_row(params![batch], |row| row.get(0))
                .db()?;
            reopen.push(batch);
        }
    }
    for batch in &reopen {
        tx.prepare_cached(
            "UPDATE fascicle_operations SET status = 'pending', error = NULL, result = NULL,
                 updated_at = ?2, completed_at = NULL
             WHERE id = ?1",
        )
        .db()?
        .execute(params![batch, now])
        .db()?;
    }
    for batch in &reopen {
        // Recounted from its children, the reopened batches among them now pending.
        tx.prepare_cached(
            "UPDATE fascicle_operations SET
                 children_total = (SELECT count(*) FROM fascicle_operations AS c
                                   WHERE c.parent_id = ?1),
                 children_completed = (SELECT count(*) FROM fascicle_operations AS c
                                       WHERE c.parent_id = ?1 AND c.status = 'completed'),
                 children_failed = (SELECT count(*) FROM fascicle_operations AS c
                                    WHERE c.parent_id = ?1 AND c.status = 'failed'),
                 children_cancelled = (SELECT count(*) FROM fascicle_operations AS c
                                       WHERE c.parent_id = ?1 AND c.status = 'cancelled')
             WHERE id = ?1",
        )
        .db()?
        .execute(params![batch])
        .db()?;
    }
    for (id, after) in &retried {
        let Some(after) = after else { continue };
        // What has not released it: a dependency it needs completed that is not, or one
        // it waits to end that is open again.
        let mut count = 0i64;
        for dependency in fascicle_api::Dependency::list_from_json(Some(after))? {
            let status: Option<String> = tx
                .prepare_cached("SELECT status FROM fascicle_operations WHERE id = ?1")
                .db()?
                .query_row(params![dependency.id.as_bytes()], |row| row.get(0))
                .optional()
                .db()?;
            let status = status.map_or(Ok(Status::Completed), status_of)?;
            if !dependency.released_by(status) {
                count += 1;
            }
        }
        tx.prepare_cached("UPDATE fascicle_operations SET waiting_on = ?2 WHERE id = ?1")
            .db()?
            .execute(params![id, count])
            .db()?;
    }
    Ok(retried.len() as u64)
}

/// One chunk of a prune: whole terminal batches, oldest first, until about `budget` rows
/// (at least one batch), then up to the rest of the budget in stand-alone operations.
pub(crate) fn prune(
    tx: &Transaction<'_>,
    before: DateTime<Utc>,
    budget: u64,
) -> Result<PruneReport> {
    let before = micros(before);
    let candidates: Vec<(Vec<u8>, i64)> = tx
        .prepare_cached(
            "SELECT id, coalesce(children_total, 0) FROM fascicle_operations
             WHERE payload IS NULL AND parent_id IS NULL AND completed_at < ?1
               AND status IN ('completed', 'failed', 'cancelled')
             ORDER BY completed_at LIMIT ?2",
        )
        .db()?
        .query_map(params![before, budget as i64], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .db()?
        .collect::<rusqlite::Result<_>>()
        .db()?;
    let mut report = PruneReport::default();
    let mut left = budget;
    for (root, _) in candidates {
        if left == 0 {
            break;
        }
        // The whole tree: the batch and every batch nested in it.
        let batches: Vec<Vec<u8>> = tx
            .prepare_cached(&format!("{TREE} SELECT id FROM tree"))
            .db()?
            .query_map(params![root], |row| row.get(0))
            .db()?
            .collect::<rusqlite::Result<_>>()
            .db()?;
        let mut rows = 0u64;
        for batch in batches.iter().rev() {
            tx.prepare_cached(
                "DELETE FROM fascicle_depends_on WHERE operation IN (
                     SELECT id FROM fascicle_operations WHERE parent_id = ?1)",
            )
            .db()?
            .execute(params![batch])
            .db()?;
            let operations = tx
                .prepare_cached(
                    "DELETE FROM fascicle_operations WHERE parent_id = ?1 AND payload IS NOT NULL",
                )
                .db()?
                .execute(params![batch])
                .db()? as u64;
            report.operations += operations;
            report.batches += tx
                .prepare_cached("DELETE FROM fascicle_operations WHERE id = ?1")
                .db()?
                .execute(params![batch])
                .db()? as u64;
            rows += operations + 1;
        }
        left = left.saturating_sub(rows);
    }
    if left > 0 {
        let pruned: Vec<Vec<u8>> = tx
            .prepare_cached(
                "DELETE FROM fascicle_operations WHERE rowid IN (
                     SELECT rowid FROM fascicle_operations
                     WHERE payload IS NOT NULL AND parent_id IS NULL AND completed_at < ?1
                       AND status IN ('completed', 'failed', 'cancelled')
                     LIMIT ?2)
                 RETURNING id",
            )
            .db()?
            .query_map(params![before, left as i64], |row| row.get(0))
            .db()?
            .collect::<rusqlite::Result<_>>()
            .db()?;
        report.operations += pruned.len() as u64;
        // A pruned operation holds its unique key no more: its row goes with it.
        let mut forget = tx
            .prepare_cached("DELETE FROM fascicle_unique_keys WHERE operation = ?1")
            .db()?;
        for id in &pruned {
            forget.execute(params![id]).db()?;
        }
    }
    Ok(report)
}
