//! `fascicle`: the operator CLI. Every command opens the store named by
//! `--database-url` (or `FASCICLE_DATABASE_URL`, default `sqlite://fascicle.db`), prints
//! a human table or, with `--json`, one JSON document, and exits with a meaningful code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fascicle::{
    CallbackOn, Driver, Error, KindLimit, Operation, OperationId, RateLimit, Status, Store, Worker,
};
use fascicle_retain::{BATCH_KIND, ConsolidateReport, MemoryBank, RetainOptions, read_documents};
use serde_json::json;

/// Exit codes, stable for scripts.
mod exit {
    /// The command failed against the store (backend, storage).
    pub(crate) const FAILURE: u8 = 1;
    /// The input was rejected (bad id, bad duration, bad URL).
    pub(crate) const INVALID: u8 = 2;
    /// The id does not exist.
    pub(crate) const NOT_FOUND: u8 = 3;
    /// The state does not allow it (e.g. nothing to retry).
    pub(crate) const CONFLICT: u8 = 4;
}

#[derive(Debug, Parser)]
#[command(name = "fascicle", version, about = "Operate a fascicle queue")]
struct Cli {
    /// Database URL: postgres://…, sqlite://path (or a bare path), sqlite::memory:, memory://
    #[arg(
        long,
        global = true,
        env = "FASCICLE_DATABASE_URL",
        default_value = "sqlite://fascicle.db",
        hide_env_values = true
    )]
    database_url: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade the schema (queue and memory bank), and report the store.
    Migrate,
    /// Retain documents into the memory bank: one `batch_retain` batch, submitted
    /// atomically. Unchanged documents are skipped; a changed one replaces its old units
    /// and invalidates the observations that cited them.
    Retain {
        /// A folder of UTF-8 text files (document id = relative path), or a .jsonl file
        /// of {"document_id", "text", "tags"} lines.
        path: PathBuf,
        /// Process the batch in this process, with a progress bar, until it and the
        /// consolidation after it are finished; then print the outcome.
        #[arg(long)]
        wait: bool,
        /// Documents per child operation.
        #[arg(long, default_value_t = 4)]
        documents_per_child: usize,
        /// Attempts per child before it fails.
        #[arg(long, default_value_t = 5)]
        max_attempts: u32,
        /// Handlers running at once with --wait.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// Run workers for `retain` and `consolidate` until Ctrl-C (or SIGTERM): running
    /// handlers finish, unfinished ones are released for other workers.
    Work {
        /// Handlers running at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Stop once no work is left (after consolidating what is unconsolidated).
        #[arg(long)]
        exit_when_idle: bool,
    },
    /// Queue depth by kind, and batches.
    Stats,
    /// One batch (with per-child states and progress) or one operation.
    Status {
        /// The operation or batch id.
        id: String,
        /// Children shown per batch, first ones first (the progress line counts them
        /// all; a batch's children are read by page, never all of a huge batch).
        #[arg(long, default_value_t = 100)]
        children: usize,
    },
    /// Cancel an operation, or every open child of a batch.
    Cancel {
        /// The operation or batch id.
        id: String,
    },
    /// Re-queue a batch's failed and cancelled children.
    Retry {
        /// The batch id.
        id: String,
    },
    /// Rescue expired leases and reconcile stranded parents now.
    Reap,
    /// Stop claiming operations of a kind, on every worker sharing the store, until
    /// `resume` (running attempts finish).
    Pause {
        /// The kind, e.g. `retain`.
        kind: String,
    },
    /// Claim operations of a paused kind again.
    Resume {
        /// The kind.
        kind: String,
    },
    /// Periodic operations: schedules stored in the database, run by every worker.
    Schedule {
        #[command(subcommand)]
        action: ScheduleAction,
    },
    /// Global concurrency and rate limits per kind, for every worker sharing the store.
    Limit {
        #[command(subcommand)]
        action: LimitAction,
    },
    /// Delete finished work older than a duration (a batch only whole).
    Prune {
        /// How old finished work must be, e.g. 30m, 12h, 7d, 2w.
        #[arg(long)]
        older_than: String,
    },
}

#[derive(Debug, Subcommand)]
enum ScheduleAction {
    /// Every schedule: its timing, operation, last and next tick, paused or not.
    List,
    /// Add a schedule, or replace the one with that name (keeping its pause and last
    /// tick): --cron EXPR [--zone ZONE] or --every DURATION, and the operation's --kind.
    Add {
        /// The schedule's name.
        name: String,
        /// A cron expression, 5 fields (minute hour day month weekday) or 6 with seconds
        /// first, e.g. "*/5 * * * *".
        #[arg(long, conflicts_with = "every")]
        cron: Option<String>,
        /// The IANA time zone of --cron, e.g. Europe/Paris (default UTC).
        #[arg(long, requires = "cron")]
        zone: Option<String>,
        /// An interval: 90s, 30m, 12h, 7d, 2w (ticks at its multiples since the epoch).
        #[arg(long)]
        every: Option<String>,
        /// The kind of the operation each tick submits.
        #[arg(long)]
        kind: String,
        /// Its payload, JSON (default null).
        #[arg(long)]
        payload: Option<String>,
        /// Its priority.
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Missed ticks: skip (default), run-once, or run-all=N.
        #[arg(long, default_value = "skip")]
        catch_up: String,
        /// How late a tick may be seen and still run as on time (default 60s).
        #[arg(long)]
        grace: Option<String>,
    },
    /// Remove a schedule (what it submitted stays).
    Remove {
        /// The schedule's name.
        name: String,
    },
    /// Stop running a schedule, on every worker, until `schedule resume`.
    Pause {
        /// The schedule's name.
        name: String,
    },
    /// Run a paused schedule again (missed ticks follow its catch-up).
    Resume {
        /// The schedule's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum LimitAction {
    /// Set a kind's limit (replacing the one it had): at most --running operations
    /// processing at once, at most --rate starts per period.
    Set {
        /// The kind, e.g. `retain`.
        kind: String,
        /// At most this many processing at once, across all workers and processes.
        #[arg(long)]
        running: Option<u32>,
        /// At most N starts per period: 100/1m, 5/s, 10/500ms, 1000/1h (units ms, s, m,
        /// h, d).
        #[arg(long)]
        rate: Option<String>,
    },
    /// Remove a kind's limit.
    Clear {
        /// The kind.
        kind: String,
    },
    /// Every kind's limit.
    List,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(match error {
                Error::InvalidInput(_) => exit::INVALID,
                Error::NotFound(_) => exit::NOT_FOUND,
                Error::Conflict(_) => exit::CONFLICT,
                _ => exit::FAILURE,
            })
        }
    }
}

async fn run(cli: Cli) -> fascicle::Result<()> {
    // Read the input before touching the database: a typo creates no database file.
    let documents = match &cli.command {
        Command::Retain { path, .. } => Some(read_documents(path)?),
        Command::Prune { older_than } => {
            prune_cutoff(older_than, fascicle::chrono::Utc::now())?;
            None
        }
        _ => None,
    };
    let driver = fascicle::open(&cli.database_url).await?;
    let store = driver.store();
    match cli.command {
        Command::Migrate => {
            MemoryBank::new(driver).await?;
            migrate(&store, cli.json)
        }
        Command::Retain {
            wait,
            documents_per_child,
            max_attempts,
            concurrency,
            ..
        } => {
            let options = RetainOptions {
                documents_per_child,
                max_attempts,
            };
            let documents = documents.expect("read above");
            retain(driver, documents, options, wait, concurrency, cli.json).await
        }
        Command::Work {
            concurrency,
            exit_when_idle,
        } => work(driver, concurrency, exit_when_idle, cli.json).await,
        Command::Stats => stats(&store, cli.json).await,
        Command::Status { id, children } => {
            status(&store, parse_id(&id)?, children, cli.json).await
        }
        Command::Cancel { id } => {
            let id = parse_id(&id)?;
            let report = store.cancel(id).await?;
            // A retain batch this cancel finished is consolidated like one whose last child
            // finished: no handler runs after a cancel of pending children.
            let target = store.get(id).await?;
            let batch = target.and_then(|op| {
                if op.is_parent() {
                    Some(op.id)
                } else {
                    op.parent_id
                }
            });
            if let Some(batch) = batch
                && store
                    .get(batch)
                    .await?
                    .is_some_and(|b| b.kind == BATCH_KIND && b.status.is_terminal())
            {
                MemoryBank::new(driver)
                    .await?
                    .consolidate_if_finished(batch)
                    .await?;
            }
            print(cli.json, &report, || {
                format!(
                    "cancelled {}, asked {} running to stop, {} already finished",
                    report.cancelled, report.signalled, report.already_terminal
                )
            });
            Ok(())
        }
        Command::Retry { id } => {
            let requeued = store.retry_batch(parse_id(&id)?).await?;
            print(cli.json, &json!({ "requeued": requeued }), || {
                format!("re-queued {requeued} children")
            });
            Ok(())
        }
        Command::Reap => {
            let rescued = store.rescue_expired_leases().await?;
            let reconciled = store.reconcile_orphan_parents().await?;
            let out = json!({ "rescue": rescued, "reconcile": reconciled });
            print(cli.json, &out, || {
                format!(
                    "rescued {} expired leases ({} failed after their last attempt); \
                     failed {} empty batches, finalized {} stranded batches",
                    rescued.requeued + rescued.failed,
                    rescued.failed,
                    reconciled.empty_parents_failed,
                    reconciled.parents_finalized
                )
            });
            Ok(())
        }
        Command::Pause { kind } => pause_or_resume(&store, &kind, true, cli.json).await,
        Command::Resume { kind } => pause_or_resume(&store, &kind, false, cli.json).await,
        Command::Limit { action } => limit(&store, action, cli.json).await,
        Command::Schedule { action } => schedule(&store, action, cli.json).await,
        Command::Prune { older_than } => {
            let cutoff = prune_cutoff(&older_than, fascicle::chrono::Utc::now())?;
            let report = store.prune(cutoff).await?;
            print(cli.json, &report, || {
                format!(
                    "deleted {} batches and {} operations finished before {cutoff}",
                    report.batches, report.operations
                )
            });
            Ok(())
        }
    }
}

fn at_least_one(option: &str, value: usize) -> fascicle::Result<()> {
    if value == 0 {
        return Err(Error::InvalidInput(format!("{option} must be at least 1")));
    }
    Ok(())
}

/// A batch that did not complete: reported, then a non-zero exit.
fn batch_error(batch: OperationId, status: Status, error: Option<&str>) -> Error {
    Error::Storage {
        location: format!("batch {batch}"),
        reason: format!(
            "{status}: {}",
            error.unwrap_or("see `fascicle status` for its children")
        ),
    }
}

async fn retain(
    driver: Driver,
    documents: Vec<fascicle_retain::Document>,
    options: RetainOptions,
    wait: bool,
    concurrency: usize,
    json: bool,
) -> fascicle::Result<()> {
    at_least_one("--concurrency", concurrency)?;
    let bank = MemoryBank::new(driver).await?;
    let count = documents.len();
    let receipt = bank.submit(documents, &options).await?;
    let batch = receipt.parent_id;
    if !wait {
        let out =
            json!({ "batch_id": batch, "documents": count, "children": receipt.child_ids.len() });
        print(json, &out, || {
            format!(
                "submitted batch {batch}: {count} documents in {} children; run `fascicle work` to process it",
                receipt.child_ids.len()
            )
        });
        return Ok(());
    }

    let bar = progress_bar(receipt.child_ids.len() as u64, json);
    bar.set_message("retaining");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(bank.store(), bank.registry())
        .concurrency(concurrency)
        .claim_batch(concurrency)
        .poll_interval(Duration::from_millis(250))
        .wake_on(bank.waker().subscribe());
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let summary = loop {
        let summary = bank.batch_summary(batch).await?;
        bar.set_position(summary.completed + summary.failed + summary.cancelled);
        if summary.status.is_terminal() {
            break summary;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The child that finished the batch (whatever its outcome) has submitted this round's
    // consolidation; submitting it again returns the same operation.
    bar.set_message("consolidating");
    let consolidation = bank.submit_consolidation(Some(batch)).await?.id;
    let consolidated = loop {
        let op = bank.store().get(consolidation).await?.ok_or_else(|| {
            Error::NotFound(format!("the consolidation {consolidation} disappeared"))
        })?;
        if op.status.is_terminal() {
            break op;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    bar.finish_and_clear();
    let _ = stop.send(());
    running.await.map_err(|e| Error::Storage {
        location: "worker".into(),
        reason: e.to_string(),
    })??;

    let consolidate: ConsolidateReport = consolidated
        .result
        .clone()
        .and_then(|r| serde_json::from_value(r).ok())
        .unwrap_or_default();
    let counts = bank.counts().await?;
    let r = summary.retained;
    print(
        json,
        &json!({ "batch": summary, "consolidation": consolidate, "bank": counts }),
        || {
            [
                format!(
                    "batch {batch} ({}): {} — {count} documents in {} children ({} completed, {} failed, {} cancelled)",
                    fascicle_retain::BATCH_KIND,
                    summary.status,
                    summary.children,
                    summary.completed,
                    summary.failed,
                    summary.cancelled
                ),
                format!(
                    "documents:    {} new, {} replaced, {} unchanged",
                    r.documents_new, r.documents_replaced, r.documents_unchanged
                ),
                format!(
                    "memory units: {} added, {} removed",
                    r.units_added, r.units_removed
                ),
                format!(
                    "observations: {} invalidated (they cited replaced units; {} other sources reset), {} written by consolidation ({} replacing older ones, {} spanning several documents)",
                    r.observations_invalidated,
                    r.sources_reset,
                    consolidate.observations_created,
                    consolidate.observations_replaced,
                    consolidate.cross_document_observations
                ),
                format!(
                    "memory bank:  {} documents, {} memory units, {} observations citing {} units",
                    counts.documents,
                    counts.memory_units,
                    counts.observations,
                    counts.observation_sources
                ),
            ]
            .join("\n")
        },
    );
    if summary.status != Status::Completed {
        return Err(batch_error(batch, summary.status, summary.error.as_deref()));
    }
    if consolidated.status != Status::Completed {
        return Err(batch_error(
            consolidation,
            consolidated.status,
            consolidated.error.as_deref(),
        ));
    }
    Ok(())
}

/// A bar on stderr when it is a terminal (hidden otherwise, and with --json).
fn progress_bar(len: u64, json: bool) -> indicatif::ProgressBar {
    if json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:<13} [{bar:30}] {pos}/{len} children ({elapsed})",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

async fn work(
    driver: Driver,
    concurrency: usize,
    exit_when_idle: bool,
    json: bool,
) -> fascicle::Result<()> {
    at_least_one("--concurrency", concurrency)?;
    let listener = match &driver {
        // Wake-ups from other processes' submits arrive by NOTIFY.
        Driver::Postgres(store) => Some(store.clone()),
        _ => None,
    };
    let bank = MemoryBank::new(driver).await?;
    let _listening = match listener {
        Some(store) => match store.listen(bank.waker().clone()).await {
            Ok(listening) => Some(listening),
            // Behind a transaction pooler without a direct URL for LISTEN.
            Err(e @ fascicle::Error::Unsupported { .. }) => {
                eprintln!("not listening for submits ({e}); polling for work instead");
                None
            }
            Err(e) => return Err(e),
        },
        None => None,
    };
    let worker = Worker::new(bank.store(), bank.registry())
        .concurrency(concurrency)
        .wake_on(bank.waker().subscribe());
    let termination = Termination::install();
    eprintln!(
        "working on `retain` and `consolidate` ({} store, concurrency {concurrency}); {}",
        bank.store().driver(),
        if exit_when_idle {
            "stopping when idle"
        } else {
            "Ctrl-C to stop"
        }
    );
    let idle_bank = bank.clone();
    let stop = async move {
        if exit_when_idle {
            tokio::select! {
                () = until_idle(&idle_bank) => {}
                () = termination.wait() => {}
            }
        } else {
            termination.wait().await;
        }
    };
    let report = worker.run(stop).await?;
    print(json, &report, || {
        format!(
            "stopped: {} claimed, {} completed, {} retried, {} failed, {} released for other workers",
            report.claimed, report.completed, report.retried, report.failed, report.released
        )
    });
    Ok(())
}

/// Resolves once no work is outstanding and nothing is left unconsolidated (submitting
/// a consolidation when units are).
async fn until_idle(bank: &MemoryBank) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(stats) = bank.store().stats().await else {
            continue;
        };
        if stats.work().outstanding() > 0 || stats.batches.open > 0 {
            continue;
        }
        match bank.counts().await {
            Ok(counts) if counts.unconsolidated_units == 0 => return,
            Ok(_) => {
                if let Err(error) = bank.submit_consolidation(None).await {
                    eprintln!("warning: submitting a consolidation failed: {error}");
                }
            }
            Err(error) => eprintln!("warning: reading the memory bank failed: {error}"),
        }
    }
}

/// Ctrl-C, or SIGTERM on Unix. The handlers are installed when this is created, so a
/// signal that arrives before anything awaits it is not lost (nor fatal).
struct Termination {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Termination {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                interrupt: signal(SignalKind::interrupt()).ok(),
                terminate: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    async fn wait(self) {
        #[cfg(unix)]
        {
            async fn next(signal: Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = next(self.interrupt) => {}
                () = next(self.terminate) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn print<T: serde::Serialize>(json: bool, value: &T, human: impl FnOnce() -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("output serializes")
        );
    } else {
        println!("{}", human());
    }
}

fn parse_id(text: &str) -> fascicle::Result<OperationId> {
    text.parse()
}

/// [`parse_duration`] of the value of `flag`, its error naming the flag.
fn flag_duration(flag: &str, text: &str) -> fascicle::Result<Duration> {
    parse_duration(text).map_err(|e| match e {
        Error::InvalidInput(why) => Error::InvalidInput(format!("{flag}: {why}")),
        other => other,
    })
}

/// `90s`, `30m`, `12h`, `7d`, `2w`.
fn parse_duration(text: &str) -> fascicle::Result<Duration> {
    let text = text.trim();
    let invalid = || {
        Error::InvalidInput(format!(
            "`{text}` is not a duration; use a number and a unit: 90s, 30m, 12h, 7d, 2w"
        ))
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(invalid)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(invalid()),
    };
    n.checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(invalid)
}

/// `fascicle pause` (`pause` true) or `resume`: one line, or `{kind, paused, changed}`.
async fn pause_or_resume(
    store: &Arc<dyn Store>,
    kind: &str,
    pause: bool,
    json: bool,
) -> fascicle::Result<()> {
    let changed = if pause {
        store.pause(kind).await?
    } else {
        store.resume(kind).await?
    };
    print(
        json,
        &json!({ "kind": kind, "paused": pause, "changed": changed }),
        || match (pause, changed) {
            (true, true) => {
                format!("paused {kind}: no worker claims it until `fascicle resume {kind}`")
            }
            (true, false) => format!("{kind} was paused already"),
            (false, true) => format!("resumed {kind}"),
            (false, false) => format!("{kind} was not paused"),
        },
    );
    Ok(())
}

/// `fascicle schedule list|add|remove|pause|resume`: a table for `list`, one line for the
/// others; JSON: the stored schedules, or `{name, created}`, `{name, removed}`,
/// `{name, paused, changed}`.
async fn schedule(
    store: &Arc<dyn Store>,
    action: ScheduleAction,
    json: bool,
) -> fascicle::Result<()> {
    match action {
        ScheduleAction::List => {
            let schedules = store.schedules().await?;
            print(json, &schedules, || {
                if schedules.is_empty() {
                    return "no schedule".to_string();
                }
                let mut out = format!(
                    "{:<24} {:<28} {:<16} {:<25} {:<25}",
                    "NAME", "TIMING", "KIND", "LAST TICK", "NEXT TICK"
                );
                for s in &schedules {
                    let timing = match &s.schedule.timing {
                        fascicle::Timing::Cron { expression, zone } => {
                            format!("cron {expression} {zone}")
                        }
                        fascicle::Timing::Every { interval } => format!("every {interval:?}"),
                    };
                    out.push_str(&format!(
                        "\n{:<24} {:<28} {:<16} {:<25} {:<25}{}",
                        s.schedule.name,
                        timing,
                        s.schedule.operation.kind,
                        s.last_tick.format("%Y-%m-%d %H:%M:%S UTC"),
                        s.next_tick.format("%Y-%m-%d %H:%M:%S UTC"),
                        if s.paused { "  paused" } else { "" }
                    ));
                }
                out
            });
        }
        ScheduleAction::Add {
            name,
            cron,
            zone,
            every,
            kind,
            payload,
            priority,
            catch_up,
            grace,
        } => {
            let payload = match payload {
                None => serde_json::Value::Null,
                Some(text) => serde_json::from_str(&text)
                    .map_err(|e| Error::InvalidInput(format!("--payload is not JSON: {e}")))?,
            };
            let op = fascicle::NewOperation::new(kind, payload).with_priority(priority);
            let mut schedule = match (cron, every) {
                (Some(expression), None) => {
                    let s = fascicle::Schedule::cron(&name, expression, op);
                    match zone {
                        Some(zone) => s.in_zone(zone),
                        None => s,
                    }
                }
                (None, Some(every)) => {
                    fascicle::Schedule::every(&name, flag_duration("--every", &every)?, op)
                }
                _ => {
                    return Err(Error::InvalidInput(format!(
                        "`fascicle schedule add {name}` needs --cron EXPR or --every DURATION"
                    )));
                }
            };
            schedule = schedule.catch_up(parse_catch_up(&catch_up)?);
            if let Some(grace) = grace {
                schedule = schedule.grace(flag_duration("--grace", &grace)?);
            }
            let created =
                fascicle::schedule::put(&fascicle::Queue::new(Arc::clone(store)), &schedule)
                    .await?;
            print(json, &json!({ "name": name, "created": created }), || {
                if created {
                    format!("added schedule {name}; workers run it from their next pass")
                } else {
                    format!("replaced schedule {name} (its pause and last tick are kept)")
                }
            });
        }
        ScheduleAction::Remove { name } => {
            let removed = store.remove_schedule(&name).await?;
            if !removed {
                return Err(Error::NotFound(format!("no schedule is named {name:?}")));
            }
            print(json, &json!({ "name": name, "removed": true }), || {
                format!("removed schedule {name}")
            });
        }
        ScheduleAction::Pause { name } => pause_schedule(store, &name, true, json).await?,
        ScheduleAction::Resume { name } => pause_schedule(store, &name, false, json).await?,
    }
    Ok(())
}

/// `fascicle schedule pause` (`pause` true) or `resume`.
async fn pause_schedule(
    store: &Arc<dyn Store>,
    name: &str,
    pause: bool,
    json: bool,
) -> fascicle::Result<()> {
    let changed = store.pause_schedule(name, pause).await?;
    print(
        json,
        &json!({ "name": name, "paused": pause, "changed": changed }),
        || match (pause, changed) {
            (true, true) => format!(
                "paused schedule {name}: passes that start from now on skip it until resumed"
            ),
            (true, false) => format!("schedule {name} was paused already"),
            (false, true) => format!("resumed schedule {name}"),
            (false, false) => format!("schedule {name} was not paused"),
        },
    );
    Ok(())
}

/// `skip`, `run-once`, `run-all=N`.
fn parse_catch_up(text: &str) -> fascicle::Result<fascicle::CatchUp> {
    match text {
        "skip" => Ok(fascicle::CatchUp::Skip),
        "run-once" => Ok(fascicle::CatchUp::RunOnce),
        _ => text
            .strip_prefix("run-all=")
            .and_then(|n| n.parse().ok())
            .map(|max| fascicle::CatchUp::RunAll { max })
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "--catch-up {text:?} is not one of skip, run-once, run-all=N"
                ))
            }),
    }
}

/// `fascicle limit set|clear|list`: one line (a table for `list`), or JSON — `{kind,
/// limit, previous}` for a change, `{kind: limit}` for `list`.
async fn limit(store: &Arc<dyn Store>, action: LimitAction, json: bool) -> fascicle::Result<()> {
    let (kind, limit) = match action {
        LimitAction::List => {
            let limits = store.limits().await?;
            print(json, &limits, || {
                if limits.is_empty() {
                    return "no kind is limited".to_string();
                }
                let mut out = format!("{:<24} {:>9}  {}", "KIND", "RUNNING", "RATE");
                for (kind, limit) in &limits {
                    let running = limit.running.map_or("-".to_string(), |n| n.to_string());
                    let rate = limit.rate.map_or("-".to_string(), |r| r.to_string());
                    out.push_str(&format!("\n{kind:<24} {running:>9}  {rate}"));
                }
                out
            });
            return Ok(());
        }
        LimitAction::Clear { kind } => (kind, KindLimit::default()),
        LimitAction::Set {
            kind,
            running,
            rate,
        } => {
            let rate = rate.map(|r| r.parse::<RateLimit>()).transpose()?;
            if running.is_none() && rate.is_none() {
                return Err(Error::InvalidInput(format!(
                    "`fascicle limit set {kind}` needs --running N, --rate N/PERIOD or both \
                     (`fascicle limit clear {kind}` removes a limit)"
                )));
            }
            (kind, KindLimit { running, rate })
        }
    };
    let previous = store.set_limit(&kind, limit).await?;
    print(
        json,
        &json!({ "kind": kind, "limit": limit, "previous": previous }),
        || match (limit.is_none(), previous.is_none()) {
            (true, true) => format!("{kind} had no limit"),
            (true, false) => format!("cleared the limit of {kind} (was {previous})"),
            (false, true) => format!("limited {kind}: {limit}"),
            (false, false) => format!("limited {kind}: {limit} (was {previous})"),
        },
    );
    Ok(())
}

/// The longest `--older-than`: 100 years (36500d).
const MAX_AGE: Duration = Duration::from_secs(36_500 * 86_400);

/// The instant `--older-than` names, counted back from `now`: refused with
/// `InvalidInput` (naming the argument and the range) when it is not a duration or
/// longer than [`MAX_AGE`] — never an overflow.
fn prune_cutoff(
    older_than: &str,
    now: fascicle::chrono::DateTime<fascicle::chrono::Utc>,
) -> fascicle::Result<fascicle::chrono::DateTime<fascicle::chrono::Utc>> {
    let age = parse_duration(older_than)?;
    let too_long = || {
        Error::InvalidInput(format!(
            "--older-than {}: at most 100 years (36500d)",
            older_than.trim()
        ))
    };
    if age > MAX_AGE {
        return Err(too_long());
    }
    fascicle::chrono::Duration::from_std(age)
        .ok()
        .and_then(|age| now.checked_sub_signed(age))
        .ok_or_else(too_long)
}

fn migrate(store: &Arc<dyn Store>, json: bool) -> fascicle::Result<()> {
    let out = json!({ "driver": store.driver(), "migrated": true });
    print(json, &out, || {
        format!("{} store is at the current schema version", store.driver())
    });
    Ok(())
}

async fn stats(store: &Arc<dyn Store>, json: bool) -> fascicle::Result<()> {
    let stats = store.stats().await?;
    if json {
        print(true, &stats, String::new);
        return Ok(());
    }
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9}",
        "KIND", "READY", "WAITING", "SCHEDULED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"
    );
    for (kind, k) in &stats.kinds {
        println!(
            "{:<24} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9}{}",
            kind,
            k.ready,
            k.waiting,
            k.scheduled,
            k.processing,
            k.completed,
            k.failed,
            k.cancelled,
            if stats.paused.contains(kind) {
                "  paused"
            } else {
                ""
            }
        );
    }
    if !stats.paused.is_empty() {
        let paused: Vec<&str> = stats.paused.iter().map(String::as_str).collect();
        println!("paused kinds (not claimed): {}", paused.join(", "));
    }
    let b = stats.batches;
    println!(
        "batches: {} open, {} completed, {} failed, {} cancelled",
        b.open, b.completed, b.failed, b.cancelled
    );
    match store.leader(fascicle::MAINTENANCE_ROLE).await {
        Ok(Some(holder)) => println!("maintenance: run by worker {holder}"),
        Ok(None) => println!("maintenance: no worker runs it now"),
        Err(Error::Unsupported { .. }) => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// A batch read with its children, and the batches nested in it read the same way.
struct Tree {
    operation: Operation,
    /// The first children (at most the `--children` limit).
    children: Vec<Operation>,
    /// How many children of the batch are not in `children`.
    more: u64,
    /// The trees of the children that are batches, in the order of `children`.
    nested: Vec<Tree>,
}

impl Tree {
    /// Reads `operation`'s tree (a plain operation has none).
    fn read<'a>(
        store: &'a Arc<dyn Store>,
        operation: Operation,
        depth: usize,
        limit: usize,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = fascicle::Result<Tree>> + Send + 'a>>
    {
        Box::pin(async move {
            let children = if operation.is_parent() {
                store.children_page(operation.id, None, limit).await?
            } else {
                Vec::new()
            };
            let total = operation.children.map_or(0, |c| c.total);
            let more = total.saturating_sub(children.len() as u64);
            let mut nested = Vec::new();
            // Batches nest at most MAX_BATCH_DEPTH levels; a deeper store is not followed.
            if depth < fascicle::MAX_BATCH_DEPTH {
                for child in children.iter().filter(|c| c.is_parent()) {
                    nested.push(Tree::read(store, child.clone(), depth + 1, limit).await?);
                }
            }
            Ok(Tree {
                operation,
                children,
                more,
                nested,
            })
        })
    }

    /// The structure `--json` prints: the operation, its children, and the nested
    /// batches' trees in the same shape.
    fn to_json(&self) -> serde_json::Value {
        json!({
            "operation": self.operation,
            "children": self.children,
            "more_children": self.more,
            "nested": self.nested.iter().map(Tree::to_json).collect::<Vec<_>>(),
        })
    }

    /// Every dependency of a waiting operation of the tree.
    fn dependencies(&self, into: &mut Vec<OperationId>) {
        for child in &self.children {
            if child.status == Status::Pending && child.waiting_on > 0 {
                into.extend(child.after.iter().map(|d| d.id));
            }
        }
        for tree in &self.nested {
            tree.dependencies(into);
        }
    }

    /// Every status in the tree, for what a waiting operation still waits for.
    fn statuses(&self, into: &mut std::collections::HashMap<OperationId, Status>) {
        into.insert(self.operation.id, self.operation.status);
        for child in &self.children {
            into.insert(child.id, child.status);
        }
        for tree in &self.nested {
            tree.statuses(into);
        }
    }

    /// The children as lines of a tree (left column, status, attempts or progress,
    /// note), each indented by `prefix`.
    fn lines(
        &self,
        prefix: &str,
        statuses: &std::collections::HashMap<OperationId, Status>,
        out: &mut Vec<[String; 4]>,
    ) {
        for (i, child) in self.children.iter().enumerate() {
            let last = i + 1 == self.children.len() && self.more == 0;
            let branch = if last { "└─" } else { "├─" };
            let note = match (&child.error, waiting_for(child, statuses)) {
                (_, Some(waiting)) => waiting,
                (Some(error), None) => error.clone(),
                (None, None) => String::new(),
            };
            let (label, progress) = match child.children {
                Some(c) => (
                    format!("{} (batch {})", child.id, child.kind),
                    format!("{}/{} done", c.terminal(), c.total),
                ),
                None => (
                    child.id.to_string(),
                    format!("{}/{}", child.attempts, child.max_attempts),
                ),
            };
            out.push([
                format!("{prefix}{branch} {label}"),
                child.status.to_string(),
                progress,
                note,
            ]);
            if let Some(tree) = self.nested.iter().find(|t| t.operation.id == child.id) {
                let inner = format!("{prefix}{}  ", if last { " " } else { "│" });
                tree.lines(&inner, statuses, out);
            }
        }
        if self.more > 0 {
            out.push([
                format!("{prefix}└─ … {} more (--children N shows more)", self.more),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
    }
}

async fn status(
    store: &Arc<dyn Store>,
    id: OperationId,
    children: usize,
    json: bool,
) -> fascicle::Result<()> {
    let op = store
        .get(id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no operation or batch has id {id}")))?;
    let tree = Tree::read(store, op, 1, children).await?;
    if json {
        print(true, &tree.to_json(), String::new);
        return Ok(());
    }
    describe(&tree.operation);
    if let Some(c) = tree.operation.children {
        let done = c.terminal();
        let percent = (done * 100).checked_div(c.total).unwrap_or(100);
        println!(
            "progress: {done}/{} children finished ({percent}%): {} completed, {} failed, {} cancelled",
            c.total, c.completed, c.failed, c.cancelled
        );
        let mut statuses = std::collections::HashMap::new();
        tree.statuses(&mut statuses);
        // What waiting operations wait for outside this tree (in an outer batch).
        let mut outside = Vec::new();
        tree.dependencies(&mut outside);
        for dependency in outside {
            if !statuses.contains_key(&dependency)
                && let Some(found) = store.get(dependency).await?
            {
                statuses.insert(dependency, found.status);
            }
        }
        let mut lines = Vec::new();
        tree.lines("", &statuses, &mut lines);
        let width = lines
            .iter()
            .map(|l| l[0].chars().count())
            .max()
            .unwrap_or(0)
            .max(41);
        println!(
            "{:<width$} {:<11} {:>9}  ERROR / WAITING FOR",
            "CHILD", "STATUS", "ATTEMPTS"
        );
        for [left, status, progress, note] in lines {
            let pad = width - left.chars().count();
            println!("{left}{:pad$} {status:<11} {progress:>9}  {note}", "");
        }
    }
    Ok(())
}

/// For a waiting operation, what it still waits for: its dependencies that have not
/// released it (not completed, or for `after_any` not ended).
fn waiting_for(
    op: &Operation,
    statuses: &std::collections::HashMap<OperationId, Status>,
) -> Option<String> {
    if op.status != Status::Pending || op.waiting_on == 0 {
        return None;
    }
    let open: Vec<String> = op
        .after
        .iter()
        .filter(|d| {
            let status = statuses.get(&d.id).copied().unwrap_or(Status::Completed);
            !d.released_by(status)
        })
        .map(|d| format!("{}{}", d.id, if d.any { " (to end)" } else { "" }))
        .collect();
    Some(format!(
        "waiting for {}: {}",
        op.waiting_on,
        open.join(", ")
    ))
}

fn describe(op: &Operation) {
    let what = if op.is_parent() { "batch" } else { "operation" };
    println!("{what} {} ({}): {}", op.id, op.kind, op.status);
    if op.is_parent()
        && let Some(outer) = op.parent_id
    {
        println!("nested in batch {outer}");
    }
    if op.status == Status::Processing
        && let Some(worker) = &op.worker_id
    {
        println!("held by {worker}");
    }
    if let Some(plan) = &op.plan {
        println!("failure policy: {}", plan.failure_policy);
        for callback in &plan.callbacks {
            println!(
                "callback {}: {} (inserted when the batch {})",
                callback.on,
                callback.kind,
                match callback.on {
                    CallbackOn::Success => "completes",
                    CallbackOn::Failure => "fails",
                    CallbackOn::Complete => "ends",
                }
            );
        }
    }
    if op.status == Status::Pending && op.waiting_on > 0 {
        let after: Vec<String> = op
            .after
            .iter()
            .map(|d| format!("{}{}", d.id, if d.any { " (to end)" } else { "" }))
            .collect();
        println!(
            "waiting for {} of its dependencies: {}",
            op.waiting_on,
            after.join(", ")
        );
    }
    if let Some(batch) = &op.callback_for {
        println!(
            "callback {} of batch {} ({}), which ended {}: {} completed, {} failed, {} cancelled",
            batch.on,
            batch.id,
            batch.kind,
            batch.outcome,
            batch.children.completed,
            batch.children.failed,
            batch.children.cancelled
        );
    }
    if let Some(error) = &op.error {
        println!("error: {error}");
    }
    if let Some(result) = &op.result {
        println!("result: {result}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_reject_the_rest() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        for bad in ["", "7", "d", "7y", "-1d", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_age_too_long_for_the_calendar_is_refused_not_a_panic() {
        let now = fascicle::chrono::Utc::now();
        for long in ["99999999999d", "36501d", "18446744073709551615s", "5300w"] {
            match prune_cutoff(long, now) {
                Err(Error::InvalidInput(message)) => {
                    assert!(message.contains("--older-than") && message.contains("36500d"))
                }
                other => panic!("{long}: expected InvalidInput, got {other:?}"),
            }
        }
        assert_eq!(
            prune_cutoff("36500d", now).unwrap(),
            now - fascicle::chrono::Duration::days(36_500)
        );
    }

    proptest::proptest! {
        /// Any text at all: a duration or `InvalidInput`, never a panic; a cut-off that
        /// exists is at most 100 years back.
        #[test]
        fn any_older_than_is_a_cutoff_or_a_typed_error(text in ".{0,40}") {
            let now = fascicle::chrono::Utc::now();
            match prune_cutoff(&text, now) {
                Ok(cutoff) => {
                    proptest::prop_assert!(cutoff <= now);
                    proptest::prop_assert!(now - cutoff <= fascicle::chrono::Duration::days(36_500));
                }
                Err(Error::InvalidInput(_)) => {}
                Err(other) => proptest::prop_assert!(false, "{other:?}"),
            }
        }

        /// Numbers of any size with every unit: the same.
        #[test]
        fn any_number_with_a_unit_is_a_cutoff_or_a_typed_error(
            n in proptest::num::u64::ANY,
            unit in "[smhdwy]",
        ) {
            let now = fascicle::chrono::Utc::now();
            let text = format!("{n}{unit}");
            match prune_cutoff(&text, now) {
                Ok(cutoff) => proptest::prop_assert!(cutoff <= now),
                Err(Error::InvalidInput(_)) => {}
                Err(other) => proptest::prop_assert!(false, "{other:?}"),
            }
        }
    }
}
