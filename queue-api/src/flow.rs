//! Flow control per kind (issue #15): global concurrency limits and rate limits, the one
//! rule every driver applies inside its claim transaction.
//!
//! A [`KindLimit`] is stored per kind ([`Store::set_limit`](crate::Store::set_limit)) and
//! holds for every worker and process sharing the store:
//!
//! - `running: Some(n)` — at most `n` operations of the kind are `processing` at once. A
//!   claim counts the kind's `processing` operations under the kind's limit lock and hands
//!   out at most the difference.
//! - `rate: Some(RateLimit { starts, per })` — at most `starts` attempts of the kind begin
//!   in any window of length `per` (a sliding window: the store keeps the instants of the
//!   last starts). Operations over the limit stay `pending`, counted as ready, and are
//!   claimed when the window has room again (a worker finds them on its next poll).
//!
//! Ready work of other kinds is never held back by a limited kind: a claim skips the
//! limited kind's operations and fills its room with the others.
//!
//! ```
//! use std::time::Duration;
//! use fascicle::{KindLimit, RateLimit};
//!
//! let limit = KindLimit::running(4).with_rate(RateLimit::new(100, Duration::from_secs(60)));
//! assert_eq!(limit.to_string(), "running ≤ 4, 100 starts per 60s");
//! assert_eq!("100/1m".parse::<RateLimit>().unwrap(), RateLimit::new(100, Duration::from_secs(60)));
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The largest `running` limit accepted.
pub const MAX_RUNNING_LIMIT: u32 = 1_000_000;
/// The largest number of starts a [`RateLimit`] may allow per window (the store keeps one
/// instant per start in the window).
pub const MAX_RATE_STARTS: u32 = 100_000;
/// The shortest window of a [`RateLimit`].
pub const MIN_RATE_PERIOD: Duration = Duration::from_millis(1);
/// The longest window of a [`RateLimit`].
pub const MAX_RATE_PERIOD: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// At most `starts` attempts begin in any window of length `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Starts allowed per window.
    pub starts: u32,
    /// The window's length.
    #[serde(with = "duration_micros")]
    pub per: Duration,
}

impl RateLimit {
    /// `starts` attempts per `per`.
    pub fn new(starts: u32, per: Duration) -> Self {
        Self { starts, per }
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} starts per {:?}", self.starts, self.per)
    }
}

/// Parses `N/PERIOD`: `100/1m`, `5/s`, `10/500ms`, `1000/1h`, `50/2d` (units `ms`, `s`,
/// `m`, `h`, `d`; a period without a number is one unit). The result is validated like
/// [`Store::set_limit`](crate::Store::set_limit) validates it.
impl FromStr for RateLimit {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidInput(format!(
                "the rate {text:?} {why}; write starts/period, e.g. 100/1m, 5/s or 10/500ms"
            ))
        };
        let (starts, period) = text.split_once('/').ok_or_else(|| bad("has no '/'"))?;
        let starts: u32 = starts
            .trim()
            .parse()
            .map_err(|_| bad("does not start with a whole number of starts"))?;
        let period = period.trim();
        let digits = period
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(period.len());
        let (count, unit) = period.split_at(digits);
        let count: u64 = if count.is_empty() {
            1
        } else {
            count.parse().map_err(|_| bad("has a period too long"))?
        };
        let unit_ms: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad("has a period unit other than ms, s, m, h or d")),
        };
        let ms = count
            .checked_mul(unit_ms)
            .ok_or_else(|| bad("has a period too long"))?;
        let rate = RateLimit::new(starts, Duration::from_millis(ms));
        validate_rate(&rate)?;
        Ok(rate)
    }
}

/// The flow control of one kind. The default (no field set) is no limit: setting it
/// clears the kind's limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindLimit {
    /// At most this many operations of the kind `processing` at once.
    pub running: Option<u32>,
    /// At most this many starts per window.
    pub rate: Option<RateLimit>,
}

impl KindLimit {
    /// At most `n` operations of the kind `processing` at once.
    pub fn running(n: u32) -> Self {
        Self {
            running: Some(n),
            rate: None,
        }
    }

    /// A rate limit alone.
    pub fn rate(rate: RateLimit) -> Self {
        Self {
            running: None,
            rate: Some(rate),
        }
    }

    /// This limit with a rate limit too.
    pub fn with_rate(mut self, rate: RateLimit) -> Self {
        self.rate = Some(rate);
        self
    }

    /// For SQL drivers: a limit from its stored columns — the running limit, the rate's
    /// starts and its window in microseconds (a rate needs both).
    pub fn from_stored(running: Option<i64>, starts: Option<i64>, period_us: Option<i64>) -> Self {
        Self {
            running: running.map(|n| n as u32),
            rate: starts.zip(period_us).map(|(starts, us)| {
                RateLimit::new(starts as u32, Duration::from_micros(us as u64))
            }),
        }
    }

    /// Whether this limits nothing (setting it clears a kind's limit).
    pub fn is_none(&self) -> bool {
        self.running.is_none() && self.rate.is_none()
    }

    /// How many operations of the kind a claim at `now` may start, with `running` of them
    /// `processing` and `recent_starts` the instants of the kind's last starts (any order;
    /// those older than the window are ignored). `usize::MAX` when nothing limits it.
    pub fn room(&self, running: u64, recent_starts: &[DateTime<Utc>], now: DateTime<Utc>) -> usize {
        let mut room = usize::MAX;
        if let Some(max) = self.running {
            room = room.min(u64::from(max).saturating_sub(running) as usize);
        }
        if let Some(rate) = self.rate {
            let since = window_start(&rate, now);
            let used = recent_starts.iter().filter(|at| **at > since).count();
            room = room.min((rate.starts as usize).saturating_sub(used));
        }
        room
    }

    /// The instants a store keeps after a claim at `now` started `started` operations of
    /// the kind: those of `recent_starts` still inside the window, then `started` times
    /// `now`, oldest first — at most [`RateLimit::starts`] of them. Empty without a rate
    /// limit.
    pub fn record_starts(
        &self,
        recent_starts: &[DateTime<Utc>],
        started: usize,
        now: DateTime<Utc>,
    ) -> Vec<DateTime<Utc>> {
        let Some(rate) = self.rate else {
            return Vec::new();
        };
        let since = window_start(&rate, now);
        let mut kept: Vec<DateTime<Utc>> = recent_starts
            .iter()
            .copied()
            .filter(|at| *at > since)
            .collect();
        kept.sort();
        kept.extend(std::iter::repeat_n(now, started));
        let excess = kept.len().saturating_sub(rate.starts as usize);
        kept.drain(..excess);
        kept
    }

    /// When the window next has room, given the kept `recent_starts` (from
    /// [`record_starts`](Self::record_starts)): `None` when it has room now or there is no
    /// rate limit.
    pub fn rate_opens_at(
        &self,
        recent_starts: &[DateTime<Utc>],
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let rate = self.rate?;
        let since = window_start(&rate, now);
        let mut inside: Vec<DateTime<Utc>> = recent_starts
            .iter()
            .copied()
            .filter(|at| *at > since)
            .collect();
        if inside.len() < rate.starts as usize {
            return None;
        }
        inside.sort();
        // The oldest start that must leave the window for one more to fit.
        let oldest = inside[inside.len() - rate.starts as usize];
        Some(oldest + chrono::Duration::from_std(rate.per).unwrap_or_default())
    }
}

fn window_start(rate: &RateLimit, now: DateTime<Utc>) -> DateTime<Utc> {
    now - chrono::Duration::from_std(rate.per).unwrap_or_default()
}

impl fmt::Display for KindLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.running, self.rate) {
            (None, None) => f.write_str("no limit"),
            (Some(n), None) => write!(f, "running ≤ {n}"),
            (None, Some(rate)) => write!(f, "{rate}"),
            (Some(n), Some(rate)) => write!(f, "running ≤ {n}, {rate}"),
        }
    }
}

fn validate_rate(rate: &RateLimit) -> Result<()> {
    if rate.starts == 0 || rate.starts > MAX_RATE_STARTS {
        return Err(Error::InvalidInput(format!(
            "a rate limit's starts is {}; it must be 1 to {MAX_RATE_STARTS} (to stop a kind \
             being claimed, pause it)",
            rate.starts
        )));
    }
    if rate.per < MIN_RATE_PERIOD || rate.per > MAX_RATE_PERIOD {
        return Err(Error::InvalidInput(format!(
            "a rate limit's period is {:?}; it must be {MIN_RATE_PERIOD:?} to {MAX_RATE_PERIOD:?}",
            rate.per
        )));
    }
    Ok(())
}

/// Checks a limit before a store keeps it: the kind a valid name
/// ([`validate_kind`](crate::validate_kind)), `running` 1 to [`MAX_RUNNING_LIMIT`] (a kind
/// never claimed is a paused one: [`Store::pause`](crate::Store::pause)), a rate of 1 to
/// [`MAX_RATE_STARTS`] starts per [`MIN_RATE_PERIOD`] to [`MAX_RATE_PERIOD`].
/// `Error::InvalidInput` naming the field otherwise. Every driver calls it first.
pub fn validate_limit(kind: &str, limit: &KindLimit) -> Result<()> {
    crate::validate_kind(kind)?;
    if let Some(n) = limit.running
        && (n == 0 || n > MAX_RUNNING_LIMIT)
    {
        return Err(Error::InvalidInput(format!(
            "the running limit of kind {kind:?} is {n}; it must be 1 to {MAX_RUNNING_LIMIT} \
             (to stop the kind being claimed, pause it)"
        )));
    }
    if let Some(rate) = &limit.rate {
        validate_rate(rate)?;
    }
    Ok(())
}

pub(crate) mod duration_micros {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros() as u64)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_000_000 + ms).unwrap()
    }

    #[test]
    fn running_room_is_the_difference_and_never_negative() {
        let limit = KindLimit::running(4);
        assert_eq!(limit.room(0, &[], at(0)), 4);
        assert_eq!(limit.room(3, &[], at(0)), 1);
        assert_eq!(limit.room(9, &[], at(0)), 0);
        assert_eq!(KindLimit::default().room(9, &[], at(0)), usize::MAX);
    }

    #[test]
    fn the_rate_window_slides() {
        let limit = KindLimit::rate(RateLimit::new(3, Duration::from_millis(1000)));
        let starts = limit.record_starts(&[], 2, at(0));
        assert_eq!(starts, vec![at(0), at(0)]);
        let starts = limit.record_starts(&starts, 1, at(400));
        assert_eq!(limit.room(0, &starts, at(500)), 0);
        assert_eq!(limit.rate_opens_at(&starts, at(500)), Some(at(1000)));
        // At 1000 the two starts of 0 are a whole window old: they left it.
        assert_eq!(limit.room(0, &starts, at(1000)), 2);
        assert_eq!(limit.rate_opens_at(&starts, at(1000)), None);
        let starts = limit.record_starts(&starts, 2, at(1000));
        assert_eq!(starts, vec![at(400), at(1000), at(1000)]);
        assert_eq!(limit.rate_opens_at(&starts, at(1000)), Some(at(1400)));
    }

    #[test]
    fn both_limits_take_the_smaller_room() {
        let limit = KindLimit::running(2).with_rate(RateLimit::new(5, Duration::from_secs(1)));
        assert_eq!(limit.room(0, &[], at(0)), 2);
        let starts = limit.record_starts(&[], 4, at(0));
        assert_eq!(limit.room(0, &starts, at(1)), 1);
    }

    #[test]
    fn record_starts_keeps_at_most_the_window_size() {
        let limit = KindLimit::rate(RateLimit::new(3, Duration::from_secs(60)));
        let starts = limit.record_starts(&[at(5), at(1), at(3)], 2, at(10));
        assert_eq!(starts, vec![at(5), at(10), at(10)]);
    }

    #[test]
    fn bad_limits_are_refused_naming_the_field() {
        let refused = |kind: &str, limit: KindLimit| match validate_limit(kind, &limit) {
            Err(Error::InvalidInput(message)) => message,
            other => panic!("{kind:?} {limit:?}: {other:?}"),
        };
        assert!(refused("a", KindLimit::running(0)).contains("running limit"));
        assert!(refused("a", KindLimit::running(MAX_RUNNING_LIMIT + 1)).contains("running"));
        let zero = KindLimit::rate(RateLimit::new(0, Duration::from_secs(1)));
        assert!(refused("a", zero).contains("starts"));
        let instant = KindLimit::rate(RateLimit::new(1, Duration::ZERO));
        assert!(refused("a", instant).contains("period"));
        let long = KindLimit::rate(RateLimit::new(1, MAX_RATE_PERIOD + Duration::from_secs(1)));
        assert!(refused("a", long).contains("period"));
        assert!(refused(" ", KindLimit::running(1)).contains("empty"));
        assert!(validate_limit("a", &KindLimit::default()).is_ok());
        assert!(validate_limit("a", &KindLimit::running(MAX_RUNNING_LIMIT)).is_ok());
    }

    #[test]
    fn rates_parse_from_text() {
        let parse = |t: &str| t.parse::<RateLimit>();
        assert_eq!(
            parse("100/1m").unwrap(),
            RateLimit::new(100, Duration::from_secs(60))
        );
        assert_eq!(
            parse("5/s").unwrap(),
            RateLimit::new(5, Duration::from_secs(1))
        );
        assert_eq!(
            parse("10/500ms").unwrap(),
            RateLimit::new(10, Duration::from_millis(500))
        );
        assert_eq!(
            parse("2/2d").unwrap(),
            RateLimit::new(2, Duration::from_secs(2 * 86_400))
        );
        for bad in [
            "",
            "100",
            "x/1m",
            "100/1y",
            "0/1s",
            "1/0s",
            "1/8d",
            "1/99999999999999999999d",
        ] {
            assert!(
                matches!(parse(bad), Err(Error::InvalidInput(_))),
                "{bad:?} parsed"
            );
        }
    }
}
