//! Periodic operations (issue #15): a [`Schedule`] is stored in the database and every
//! worker sharing the store runs it — **no leader**. Each tick's operation id is derived
//! from the schedule's name and the tick's instant ([`tick_id`]), and submitted
//! idempotently: however many workers and processes run the same pass at once, and
//! however often they restart, a tick is one operation. A pass ([`run_due`]) reads only
//! the schedules whose next tick has come (`next_tick` is stored and indexed), submits
//! their ticks and advances each schedule with a compare-and-set of its version — a pass
//! that lost the race changes nothing, its submits having found the winner's operations.
//!
//! ```
//! use std::time::Duration;
//! use fascicle::{CatchUp, NewOperation, Schedule, json};
//!
//! let nightly = Schedule::cron("nightly-report", "0 2 * * *", NewOperation::new("report", json!({})))
//!     .in_zone("Europe/Paris")
//!     .catch_up(CatchUp::RunOnce);
//! let heartbeat = Schedule::every("heartbeat", Duration::from_secs(30), NewOperation::new("ping", json!(null)));
//! assert!(nightly.validate().is_ok() && heartbeat.validate().is_ok());
//! assert!(Schedule::cron("bad", "61 * * * *", NewOperation::new("x", json!(null))).validate().is_err());
//! ```

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::types::{NewOperation, OperationId, Unique};
use crate::{Limits, Queue};

/// How late a tick may be seen and still count as on time, by default: a tick older than
/// this when a pass first sees it is *missed*, and the schedule's [`CatchUp`] decides.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// The longest grace accepted.
pub const MAX_GRACE: Duration = Duration::from_secs(24 * 60 * 60);
/// The shortest interval of [`Schedule::every`].
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest interval of [`Schedule::every`].
pub const MAX_INTERVAL: Duration = Duration::from_secs(3650 * 24 * 60 * 60);
/// The most missed ticks [`CatchUp::RunAll`] runs in one pass.
pub const MAX_CATCH_UP: u32 = 10_000;

/// When a schedule ticks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Timing {
    /// A cron expression — five fields (minute hour day-of-month month day-of-week), six
    /// with seconds first, or seven with a year last ([`croner`]'s syntax) — read in the
    /// IANA time zone `zone` (`UTC` by default).
    Cron {
        /// The expression, e.g. `*/5 * * * *`.
        expression: String,
        /// The zone, e.g. `Europe/Paris`.
        zone: String,
    },
    /// Every `interval`, at the multiples of it since the Unix epoch (`every 5 min` ticks
    /// at :00, :05, …), the same instants on every worker.
    Every {
        /// The interval.
        #[serde(with = "crate::flow::duration_micros")]
        interval: Duration,
    },
}

/// What a pass does with ticks it sees late — older than the schedule's grace — after
/// downtime, a pause, or workers too busy to run the pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Nothing: only the ticks still within the grace run, the next ones as they come
    /// (the default).
    #[default]
    Skip,
    /// One operation for all the missed ticks (the latest of them), then the ticks within
    /// the grace.
    RunOnce,
    /// One operation per missed tick, the latest `max` of them, oldest first.
    RunAll {
        /// At most this many missed ticks run (1 to [`MAX_CATCH_UP`]).
        max: u32,
    },
}

/// The operation a schedule submits at each tick: a [`NewOperation`] without its own id
/// (each tick's is [`tick_id`]), `run_at` (the tick) or dependencies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledOperation {
    /// The operation's kind.
    pub kind: String,
    /// Its payload, the same at every tick.
    pub payload: Value,
    /// Its priority.
    pub priority: i32,
    /// Its serialization key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serialization_key: Option<String>,
    /// Its attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Its attempt timeout, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Its unique key: with one, a tick whose key is still held (the last run not
    /// finished) answers the holder instead of starting another run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<Unique>,
    /// What a schedule cannot carry (an id, a `run_at`, dependencies), kept to be refused
    /// by [`Schedule::validate`].
    #[serde(skip)]
    refused: Option<&'static str>,
}

impl From<NewOperation> for ScheduledOperation {
    fn from(op: NewOperation) -> Self {
        let refused = if op.id.is_some() {
            Some("an id (each tick's id is derived from the schedule and the tick)")
        } else if op.run_at.is_some() {
            Some("a run_at (each tick's operation runs at the tick)")
        } else if !op.after.is_empty() {
            Some("dependencies (they live inside a batch)")
        } else {
            None
        };
        Self {
            kind: op.kind,
            payload: op.payload,
            priority: op.priority,
            serialization_key: op.serialization_key,
            max_attempts: op.max_attempts,
            timeout_ms: op.timeout.map(|t| t.as_millis() as u64),
            unique: op.unique,
            refused,
        }
    }
}

impl ScheduledOperation {
    /// The operation of the tick at `tick`.
    pub fn at_tick(&self, schedule: &str, tick: DateTime<Utc>) -> NewOperation {
        let mut op = NewOperation::new(self.kind.clone(), self.payload.clone())
            .with_id(tick_id(schedule, tick))
            .with_priority(self.priority)
            .with_run_at(tick);
        op.serialization_key = self.serialization_key.clone();
        op.max_attempts = self.max_attempts;
        op.timeout = self.timeout_ms.map(Duration::from_millis);
        op.unique = self.unique.clone();
        op
    }
}

/// A periodic operation: a name (unique in the store), when it ticks, what each tick
/// submits, and what happens to ticks seen late.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The schedule's name: any name (not blank, at most 255 bytes, no NUL).
    pub name: String,
    /// When it ticks.
    pub timing: Timing,
    /// What each tick submits.
    pub operation: ScheduledOperation,
    /// What happens to missed ticks.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// How late a tick may be seen and still run as on time.
    #[serde(with = "crate::flow::duration_micros", default = "default_grace")]
    pub grace: Duration,
    /// A zone given to a schedule that is not a cron one, kept to be refused.
    #[serde(skip)]
    misplaced_zone: bool,
}

fn default_grace() -> Duration {
    DEFAULT_GRACE
}

impl Schedule {
    /// Ticks at each instant `expression` matches (in UTC; see [`in_zone`](Self::in_zone)),
    /// submitting `operation`.
    pub fn cron(
        name: impl Into<String>,
        expression: impl Into<String>,
        operation: NewOperation,
    ) -> Self {
        Self {
            name: name.into(),
            timing: Timing::Cron {
                expression: expression.into(),
                zone: "UTC".into(),
            },
            operation: operation.into(),
            catch_up: CatchUp::Skip,
            grace: DEFAULT_GRACE,
            misplaced_zone: false,
        }
    }

    /// Ticks every `interval` (1 s to 10 years), at its multiples since the Unix epoch.
    pub fn every(name: impl Into<String>, interval: Duration, operation: NewOperation) -> Self {
        Self {
            name: name.into(),
            timing: Timing::Every { interval },
            operation: operation.into(),
            catch_up: CatchUp::Skip,
            grace: DEFAULT_GRACE,
            misplaced_zone: false,
        }
    }

    /// Reads a cron expression in the IANA zone `zone` (e.g. `America/New_York`), daylight
    /// saving included. Refused by [`validate`](Self::validate) on an `every` schedule.
    pub fn in_zone(mut self, zone: impl Into<String>) -> Self {
        match &mut self.timing {
            Timing::Cron { zone: z, .. } => *z = zone.into(),
            Timing::Every { .. } => self.misplaced_zone = true,
        }
        self
    }

    /// What happens to missed ticks ([`CatchUp::Skip`] by default).
    pub fn catch_up(mut self, catch_up: CatchUp) -> Self {
        self.catch_up = catch_up;
        self
    }

    /// How late a tick may be seen and still run as on time ([`DEFAULT_GRACE`]; 1 s to
    /// [`MAX_GRACE`]).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Checks everything a store is asked to keep, with the default [`Limits`]:
    /// `InvalidInput` naming the schedule and the field — the name, the cron expression
    /// (with the parser's reason), the zone, the interval, the grace, the catch-up, the
    /// operation (as a submit would check it, and nothing it cannot carry).
    pub fn validate(&self) -> Result<()> {
        self.validate_with(&Limits::default())
    }

    /// [`validate`](Self::validate) with the queue's `limits`.
    pub fn validate_with(&self, limits: &Limits) -> Result<()> {
        let name = &self.name;
        crate::queue::validate_schedule_name(name)?;
        let bad = |field: &str, why: String| {
            Error::InvalidInput(format!("schedule {name:?}: the {field} {why}"))
        };
        if self.misplaced_zone {
            return Err(bad(
                "zone",
                "applies to cron schedules only; an `every` schedule ticks at multiples of its \
                 interval since the Unix epoch"
                    .into(),
            ));
        }
        match &self.timing {
            Timing::Cron { expression, zone } => {
                // A list with an empty element (`,`, `1,`): the parser reads `,` alone as
                // a field no instant matches, and proving that it never fires searched
                // for most of a second (found by the fuzzer).
                if let Some(field) = expression
                    .split_whitespace()
                    .find(|field| field.split(',').any(str::is_empty))
                {
                    return Err(bad(
                        "cron expression",
                        format!(
                            "{expression:?} is not valid: the field {field:?} has an empty \
                             element in its list"
                        ),
                    ));
                }
                croner::Cron::from_str(expression).map_err(|e| {
                    bad(
                        "cron expression",
                        format!("{expression:?} is not valid: {e}"),
                    )
                })?;
                zone.parse::<chrono_tz::Tz>().map_err(|_| {
                    bad(
                        "zone",
                        format!("{zone:?} is not an IANA time zone name (e.g. Europe/Paris, UTC)"),
                    )
                })?;
            }
            Timing::Every { interval } => {
                if *interval < MIN_INTERVAL || *interval > MAX_INTERVAL {
                    return Err(bad(
                        "interval",
                        format!(
                            "is {interval:?}; it must be {MIN_INTERVAL:?} to {} days",
                            MAX_INTERVAL.as_secs() / 86_400
                        ),
                    ));
                }
            }
        }
        if self.grace < Duration::from_secs(1) || self.grace > MAX_GRACE {
            return Err(bad(
                "grace",
                format!("is {:?}; it must be 1s to {MAX_GRACE:?}", self.grace),
            ));
        }
        if let CatchUp::RunAll { max } = self.catch_up
            && (max == 0 || max > MAX_CATCH_UP)
        {
            return Err(bad(
                "catch-up",
                format!("runs up to {max} missed ticks; it must be 1 to {MAX_CATCH_UP}"),
            ));
        }
        if let Some(what) = self.operation.refused {
            return Err(bad("operation", format!("has {what}; remove it")));
        }
        if self.compiled()?.after(Utc::now())?.is_none() {
            return Err(bad(
                "cron expression",
                "never matches an instant from now on (a day a month does not have, a year past)"
                    .into(),
            ));
        }
        // The operation as its ticks will submit it.
        limits
            .prepare_operation(self.operation.at_tick(name, Utc::now()), None, Utc::now())
            .map_err(|e| match e {
                Error::InvalidInput(why) => bad("operation", format!("is refused: {why}")),
                other => other,
            })?;
        Ok(())
    }

    fn compiled(&self) -> Result<Ticks> {
        Ok(match &self.timing {
            Timing::Cron { expression, zone } => Ticks::Cron(
                Box::new(croner::Cron::from_str(expression).map_err(|e| {
                    Error::InvalidInput(format!(
                        "schedule {:?}: the cron expression {expression:?} is not valid: {e}",
                        self.name
                    ))
                })?),
                zone.parse().map_err(|_| {
                    Error::InvalidInput(format!(
                        "schedule {:?}: the zone {zone:?} is not an IANA time zone name",
                        self.name
                    ))
                })?,
            ),
            Timing::Every { interval } => {
                if *interval < MIN_INTERVAL || *interval > MAX_INTERVAL {
                    return Err(Error::InvalidInput(format!(
                        "schedule {:?}: the interval is {interval:?}; it must be {MIN_INTERVAL:?} \
                         to {} days",
                        self.name,
                        MAX_INTERVAL.as_secs() / 86_400
                    )));
                }
                Ticks::Every(TimeDelta::from_std(*interval).expect("at most ten years"))
            }
        })
    }

    /// The first tick strictly after `after`.
    pub fn next_tick(&self, after: DateTime<Utc>) -> Result<DateTime<Utc>> {
        self.compiled()?.after(after)?.ok_or_else(|| {
            Error::InvalidInput(format!(
                "schedule {:?} never ticks after {after}",
                self.name
            ))
        })
    }

    /// What a pass at `now` does for this schedule, whose last handled tick (or anchor,
    /// when it never ticked) is `last`: the ticks to submit (oldest first), the newest
    /// tick handled and the next tick to wait for. Ticks in `(last, now]` older than the
    /// grace are missed and follow [`catch_up`](Self::catch_up); the others run.
    pub fn plan(&self, last: DateTime<Utc>, now: DateTime<Utc>) -> Result<TickPlan> {
        let ticks = self.compiled()?;
        let grace = TimeDelta::from_std(self.grace).unwrap_or(TimeDelta::MAX);
        let boundary = now
            .checked_sub_signed(grace)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let just_before = |at: DateTime<Utc>| {
            at.checked_sub_signed(TimeDelta::microseconds(1))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        };
        // On time: the ticks in (last, now] at or after the boundary, the newest
        // MAX_CATCH_UP of them (older ones, when there are more, count as missed: the
        // schedule always moves on).
        let cap = MAX_CATCH_UP as usize;
        let mut on_time = ticks.before(
            now + TimeDelta::microseconds(1),
            last.max(just_before(boundary)),
            cap,
        )?;
        let missed_before = match on_time.last() {
            Some(oldest) if on_time.len() == cap => *oldest,
            _ => boundary,
        };
        on_time.reverse();
        // Missed: (last, missed_before), newest first, as many as the catch-up may run.
        let wanted = match self.catch_up {
            CatchUp::Skip => 0,
            CatchUp::RunOnce => 1,
            CatchUp::RunAll { max } => max as usize,
        };
        let mut missed = ticks.before(missed_before, last, wanted.max(1))?;
        let newest_missed = missed.first().copied();
        missed.truncate(wanted);
        missed.reverse();
        let handled = on_time.last().copied().or(newest_missed).unwrap_or(last);
        let mut run = missed;
        run.extend(on_time);
        Ok(TickPlan {
            run,
            last_tick: handled.max(last),
            next_tick: ticks.after(now)?.unwrap_or(DateTime::<Utc>::MAX_UTC),
        })
    }
}

/// One pass's decision for one schedule ([`Schedule::plan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickPlan {
    /// The ticks to submit, oldest first.
    pub run: Vec<DateTime<Utc>>,
    /// The newest tick handled (run or skipped): the next pass starts after it.
    pub last_tick: DateTime<Utc>,
    /// The next tick to wait for.
    pub next_tick: DateTime<Utc>,
}

enum Ticks {
    Cron(Box<croner::Cron>, chrono_tz::Tz),
    Every(TimeDelta),
}

impl Ticks {
    /// The first tick strictly after `after`.
    fn after(&self, after: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
        match self {
            Self::Cron(cron, zone) => {
                // The parser counts whole seconds: start from the second `after` is in.
                let start = after
                    .duration_trunc(TimeDelta::seconds(1))
                    .unwrap_or(after)
                    .with_timezone(zone);
                match cron.find_next_occurrence(&start, false) {
                    Ok(next) => Ok(Some(next.with_timezone(&Utc))),
                    Err(_) => Ok(None),
                }
            }
            Self::Every(interval) => {
                let step = interval.num_microseconds().unwrap_or(i64::MAX);
                let at = after.timestamp_micros();
                let next = (at.div_euclid(step) + 1).checked_mul(step);
                Ok(next.and_then(DateTime::from_timestamp_micros))
            }
        }
    }

    /// Up to `n` ticks strictly after `floor` and strictly before `before`, newest first.
    fn before(
        &self,
        before: DateTime<Utc>,
        floor: DateTime<Utc>,
        n: usize,
    ) -> Result<Vec<DateTime<Utc>>> {
        let mut out = Vec::new();
        if before <= floor {
            return Ok(out);
        }
        match self {
            Self::Cron(cron, zone) => {
                // Whole seconds: start from the second after `before` and drop what is not
                // strictly before it.
                let start = (before + TimeDelta::seconds(1))
                    .duration_trunc(TimeDelta::seconds(1))
                    .unwrap_or(before)
                    .with_timezone(zone);
                for tick in cron.iter_before(start) {
                    let tick = tick.with_timezone(&Utc);
                    if tick <= floor || out.len() >= n {
                        break;
                    }
                    if tick < before {
                        out.push(tick);
                    }
                }
            }
            Self::Every(interval) => {
                let step = interval.num_microseconds().unwrap_or(i64::MAX);
                let mut k = (before.timestamp_micros() - 1).div_euclid(step);
                while out.len() < n {
                    let Some(tick) = k
                        .checked_mul(step)
                        .and_then(DateTime::from_timestamp_micros)
                    else {
                        break;
                    };
                    if tick <= floor {
                        break;
                    }
                    out.push(tick);
                    k -= 1;
                }
            }
        }
        Ok(out)
    }
}

/// The id of the operation a schedule submits at `tick`: a UUID (version 5) of the
/// schedule's name and the tick's instant, the same on every worker, so that the tick is
/// one operation however many passes submit it.
pub fn tick_id(schedule: &str, tick: DateTime<Utc>) -> OperationId {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6661_7363_6963_6c65_7363_6865_6475_6c65);
    let name = format!("{schedule}\u{0}{}", tick.timestamp_micros());
    OperationId::from_uuid(uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes()))
}

/// A schedule as a store keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredSchedule {
    /// The schedule.
    pub schedule: Schedule,
    /// Paused: no pass runs it ([`Store::pause_schedule`](crate::Store::pause_schedule)).
    pub paused: bool,
    /// The newest tick handled, or — before the first — when it was created: the next
    /// pass starts after it.
    pub last_tick: DateTime<Utc>,
    /// The next tick to wait for: a pass reads only schedules whose next tick has come.
    pub next_tick: DateTime<Utc>,
    /// Bumped by every change (a put, a pause, an advance): a pass advances the schedule
    /// only at the version it read.
    pub version: i64,
}

/// For driver authors: a stored schedule's definition read back from its JSON text.
/// `Error::Storage` naming the schedule (and how to replace it) when it cannot be read —
/// a definition written by a newer fascicle, or edited by hand.
pub fn decode_stored(name: &str, spec: &str) -> Result<Schedule> {
    serde_json::from_str(spec).map_err(|e| Error::Storage {
        location: format!("the schedule {name:?}"),
        reason: format!(
            "its stored definition cannot be read ({e}); add it again (`fascicle schedule add \
             {name} …`) or remove it (`fascicle schedule remove {name}`)"
        ),
    })
}

/// What one scheduler pass did ([`run_due`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassReport {
    /// Due schedules read.
    pub schedules: u64,
    /// Tick operations this pass inserted.
    pub submitted: u64,
    /// Tick operations another pass (or an earlier one) had inserted already.
    pub existing: u64,
    /// Schedules another pass advanced first.
    pub lost_races: u64,
    /// Schedules left where they were: their plan or a tick's submit failed (logged).
    pub failed: u64,
}

/// Truncates `at` to the microsecond every store keeps.
pub(crate) fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(at)
}

/// Validates `schedule` and stores it ([`Store::put_schedule`](crate::Store::put_schedule)):
/// `true` when it is new. A schedule declared again (a worker restarting) keeps its pause
/// and its last tick; a changed timing takes effect from the next pass.
pub async fn put(queue: &Queue, schedule: &Schedule) -> Result<bool> {
    schedule.validate_with(&queue.limits())?;
    let now = micros(Utc::now());
    queue.store().put_schedule(schedule, now).await
}

/// One scheduler pass at `now`: every due, unpaused schedule's ticks are submitted (each
/// idempotently, under [`tick_id`]) and the schedule advanced at the version read. Safe to
/// run from every worker at once: it is how fascicle runs schedules without a leader.
pub async fn run_due(queue: &Queue, now: DateTime<Utc>) -> Result<PassReport> {
    let now = micros(now);
    let store = queue.store();
    let mut report = PassReport::default();
    for stored in store.due_schedules(now).await? {
        report.schedules += 1;
        let schedule = &stored.schedule;
        let plan = match schedule.plan(stored.last_tick, now) {
            Ok(plan) => plan,
            Err(error) => {
                report.failed += 1;
                tracing::warn!(%error, schedule = %schedule.name, "a stored schedule cannot be planned; skipped");
                continue;
            }
        };
        // A schedule whose tick cannot be submitted is left where it is (the next pass
        // tries again) and the others run: one bad schedule never stops the rest.
        let mut failed = None;
        for tick in &plan.run {
            match queue
                .submit(schedule.operation.at_tick(&schedule.name, *tick))
                .await
            {
                Ok(receipt) if receipt.created => report.submitted += 1,
                Ok(_) => report.existing += 1,
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            }
        }
        if let Some(error) = failed {
            report.failed += 1;
            if error.is_transient() {
                return Err(error);
            }
            tracing::warn!(%error, schedule = %schedule.name, "a tick of this schedule cannot be submitted; the schedule waits");
            continue;
        }
        let advanced = store
            .advance_schedule(
                &schedule.name,
                stored.version,
                micros(plan.last_tick),
                micros(plan.next_tick),
            )
            .await?;
        if !advanced {
            report.lost_races += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn op() -> NewOperation {
        NewOperation::new("job", json!(null))
    }

    /// Found by the fuzzer: `,` alone as a field was read as one no instant matches, and
    /// proving it never fires took most of a second (ten under the fuzzer's checks).
    #[test]
    fn a_list_with_an_empty_element_is_refused_at_once() {
        for expression in ["5 , 2 * * *", "0 , * * *", "1,,2 * * * *", "1, * * * *"] {
            // Refused by the list check, before the parser and any search.
            match Schedule::cron("s", expression, op()).validate() {
                Err(Error::InvalidInput(why)) => assert!(why.contains("empty element"), "{why}"),
                other => panic!("{expression}: {other:?}"),
            }
        }
        Schedule::cron("s", "1,2 * * * *", op()).validate().unwrap();
    }

    #[test]
    fn every_ticks_at_multiples_of_its_interval() {
        let s = Schedule::every("s", Duration::from_secs(300), op());
        assert_eq!(
            s.next_tick(at("2026-12-01T10:02:30Z")).unwrap(),
            at("2026-12-01T10:05:00Z")
        );
        assert_eq!(
            s.next_tick(at("2026-12-01T10:05:00Z")).unwrap(),
            at("2026-12-01T10:10:00Z")
        );
    }

    #[test]
    fn cron_reads_five_or_six_fields_in_its_zone() {
        let five = Schedule::cron("s", "*/5 * * * *", op());
        assert_eq!(
            five.next_tick(at("2026-12-01T10:02:30Z")).unwrap(),
            at("2026-12-01T10:05:00Z")
        );
        let six = Schedule::cron("s", "*/10 * * * * *", op());
        assert_eq!(
            six.next_tick(at("2026-12-01T10:02:31.5Z")).unwrap(),
            at("2026-12-01T10:02:40Z")
        );
        // 09:00 in Paris is 08:00 UTC in winter, 07:00 in summer.
        let paris = Schedule::cron("s", "0 9 * * *", op()).in_zone("Europe/Paris");
        assert_eq!(
            paris.next_tick(at("2026-12-01T00:00:00Z")).unwrap(),
            at("2026-12-01T08:00:00Z")
        );
        assert_eq!(
            paris.next_tick(at("2026-07-01T00:00:00Z")).unwrap(),
            at("2026-07-01T07:00:00Z")
        );
        // Weekdays as Unix cron numbers them: 1-5 is Monday to Friday. 2026-12-05 is a
        // Saturday.
        let weekdays = Schedule::cron("s", "0 12 * * 1-5", op());
        assert_eq!(
            weekdays.next_tick(at("2026-12-04T13:00:00Z")).unwrap(),
            at("2026-12-07T12:00:00Z")
        );
    }

    #[test]
    fn a_plan_runs_the_ticks_within_the_grace() {
        let s = Schedule::every("s", Duration::from_secs(1), op());
        let plan = s
            .plan(at("2026-12-01T10:00:00.3Z"), at("2026-12-01T10:00:03.5Z"))
            .unwrap();
        assert_eq!(
            plan.run,
            [
                at("2026-12-01T10:00:01Z"),
                at("2026-12-01T10:00:02Z"),
                at("2026-12-01T10:00:03Z")
            ]
        );
        assert_eq!(plan.last_tick, at("2026-12-01T10:00:03Z"));
        assert_eq!(plan.next_tick, at("2026-12-01T10:00:04Z"));
        let again = s
            .plan(plan.last_tick, at("2026-12-01T10:00:03.9Z"))
            .unwrap();
        assert!(again.run.is_empty());
        assert_eq!(again.last_tick, plan.last_tick);
    }

    #[test]
    fn missed_ticks_follow_the_catch_up() {
        let every_minute = |c| {
            Schedule::every("s", Duration::from_secs(60), op())
                .catch_up(c)
                .grace(Duration::from_secs(90))
        };
        let last = at("2026-12-01T10:00:00Z");
        // Down for an hour: 10:01 … 10:59 are missed (older than 90 s at 11:00:30),
        // 10:59 and 11:00 are within the grace.
        let now = at("2026-12-01T11:00:30Z");
        let skip = every_minute(CatchUp::Skip).plan(last, now).unwrap();
        assert_eq!(
            skip.run,
            [at("2026-12-01T10:59:00Z"), at("2026-12-01T11:00:00Z")]
        );
        assert_eq!(skip.last_tick, at("2026-12-01T11:00:00Z"));
        let once = every_minute(CatchUp::RunOnce).plan(last, now).unwrap();
        assert_eq!(
            once.run,
            [
                at("2026-12-01T10:58:00Z"),
                at("2026-12-01T10:59:00Z"),
                at("2026-12-01T11:00:00Z")
            ]
        );
        let all = every_minute(CatchUp::RunAll { max: 3 })
            .plan(last, now)
            .unwrap();
        assert_eq!(
            all.run,
            [
                at("2026-12-01T10:56:00Z"),
                at("2026-12-01T10:57:00Z"),
                at("2026-12-01T10:58:00Z"),
                at("2026-12-01T10:59:00Z"),
                at("2026-12-01T11:00:00Z")
            ]
        );
        // Only missed ticks, none within the grace: the newest missed is handled.
        let cron = Schedule::cron("c", "0 * * * *", op()).catch_up(CatchUp::RunOnce);
        let plan = cron
            .plan(at("2026-12-01T07:30:00Z"), at("2026-12-01T10:30:00Z"))
            .unwrap();
        assert_eq!(plan.run, [at("2026-12-01T10:00:00Z")]);
        assert_eq!(plan.last_tick, at("2026-12-01T10:00:00Z"));
        assert_eq!(plan.next_tick, at("2026-12-01T11:00:00Z"));
        let skipped = Schedule::cron("c", "0 * * * *", op())
            .plan(at("2026-12-01T07:30:00Z"), at("2026-12-01T10:30:00Z"))
            .unwrap();
        assert!(skipped.run.is_empty());
        assert_eq!(skipped.last_tick, at("2026-12-01T10:00:00Z"));
    }

    #[test]
    fn a_plan_never_takes_more_than_the_cap_and_always_moves_on() {
        // A day of one-second ticks within the grace: the newest MAX_CATCH_UP run, the
        // older ones count as missed, and the schedule moves to the newest tick.
        let s = Schedule::every("s", Duration::from_secs(1), op()).grace(MAX_GRACE);
        let now = at("2026-12-02T00:00:00.5Z");
        let plan = s.plan(at("2026-12-01T00:00:00Z"), now).unwrap();
        assert_eq!(plan.run.len(), MAX_CATCH_UP as usize);
        assert_eq!(*plan.run.last().unwrap(), at("2026-12-02T00:00:00Z"));
        assert_eq!(plan.last_tick, at("2026-12-02T00:00:00Z"));
        assert!(plan.run.windows(2).all(|w| w[0] < w[1]), "oldest first");
        let again = s.plan(plan.last_tick, now).unwrap();
        assert!(again.run.is_empty());
    }

    #[test]
    fn daylight_saving_changes_tick_once() {
        // Europe/Paris: 2026-03-29 02:00 → 03:00 (02:30 does not exist), 2026-10-25
        // 03:00 → 02:00 (02:30 happens twice).
        let s = Schedule::cron("s", "30 2 * * *", op())
            .in_zone("Europe/Paris")
            .catch_up(CatchUp::RunAll { max: 10 });
        let spring = s
            .plan(at("2026-03-28T12:00:00Z"), at("2026-03-30T12:00:00Z"))
            .unwrap();
        // The 28th's tick is before `last`; the 29th's falls in the gap and runs at the
        // first instant after it; the 30th's at 02:30 CEST.
        assert_eq!(spring.run.len(), 2, "{:?}", spring.run);
        assert_eq!(spring.run[1], at("2026-03-30T00:30:00Z"));
        let autumn = s
            .plan(at("2026-10-24T12:00:00Z"), at("2026-10-25T12:00:00Z"))
            .unwrap();
        assert_eq!(
            autumn.run.len(),
            1,
            "02:30 twice is one tick: {:?}",
            autumn.run
        );
    }

    #[test]
    fn tick_ids_are_the_same_everywhere_and_differ_per_tick() {
        let t = at("2026-12-01T10:00:00Z");
        assert_eq!(tick_id("a", t), tick_id("a", t));
        assert_ne!(tick_id("a", t), tick_id("b", t));
        assert_ne!(tick_id("a", t), tick_id("a", t + TimeDelta::seconds(1)));
    }

    #[test]
    fn what_a_schedule_cannot_be_is_refused_naming_the_field() {
        let refused = |s: Schedule, field: &str| match s.validate() {
            Err(Error::InvalidInput(m)) => assert!(m.contains(field), "{m:?} should name {field}"),
            other => panic!("{field}: {other:?}"),
        };
        refused(Schedule::cron("s", "61 * * * *", op()), "cron expression");
        refused(Schedule::cron("s", "* * *", op()), "cron expression");
        refused(
            Schedule::cron("s", "* * * * *", op()).in_zone("Mars/Olympus"),
            "zone",
        );
        refused(
            Schedule::every("s", Duration::from_secs(5), op()).in_zone("UTC"),
            "zone",
        );
        refused(
            Schedule::every("s", Duration::from_millis(500), op()),
            "interval",
        );
        refused(Schedule::every("", Duration::from_secs(5), op()), "name");
        refused(
            Schedule::every("s", Duration::from_secs(5), op()).grace(Duration::ZERO),
            "grace",
        );
        refused(
            Schedule::every("s", Duration::from_secs(5), op()).catch_up(CatchUp::RunAll { max: 0 }),
            "catch-up",
        );
        refused(
            Schedule::every(
                "s",
                Duration::from_secs(5),
                op().with_id(OperationId::new()),
            ),
            "id",
        );
        refused(
            Schedule::every(
                "s",
                Duration::from_secs(5),
                NewOperation::new("", json!(null)),
            ),
            "operation",
        );
        refused(Schedule::cron("s", "0 0 30 2 *", op()), "never matches");
        assert!(Schedule::cron("s", "0 0 * * SUN", op()).validate().is_ok());
    }

    #[test]
    fn a_schedule_round_trips_through_json() {
        let s = Schedule::cron("s", "*/5 * * * *", op().with_priority(3).unique("k"))
            .in_zone("Asia/Tokyo")
            .catch_up(CatchUp::RunAll { max: 7 })
            .grace(Duration::from_secs(30));
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Schedule>(&text).unwrap(), s);
    }
}
