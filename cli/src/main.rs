//! `fascicle`: the operator CLI. Every command opens the store named by
//! `--database-url` (or `FASCICLE_DATABASE_URL`, default `sqlite://fascicle.db`), prints
//! a human table or, with `--json`, one JSON document, and exits with a meaningful code.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fascicle::{Error, Operation, OperationId, Status, Store};
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
    /// Create or upgrade the schema, and report the store.
    Migrate,
    /// Queue depth by kind, and batches.
    Stats,
    /// One batch (with per-child states and progress) or one operation.
    Status {
        /// The operation or batch id.
        id: String,
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
    /// Delete finished work older than a duration (a batch only whole).
    Prune {
        /// How old finished work must be, e.g. 30m, 12h, 7d, 2w.
        #[arg(long)]
        older_than: String,
    },
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
    let store = fascicle::connect(&cli.database_url).await?;
    match cli.command {
        Command::Migrate => migrate(&store, cli.json),
        Command::Stats => stats(&store, cli.json).await,
        Command::Status { id } => status(&store, parse_id(&id)?, cli.json).await,
        Command::Cancel { id } => {
            let report = store.cancel(parse_id(&id)?).await?;
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
        Command::Prune { older_than } => {
            let age = parse_duration(&older_than)?;
            let cutoff = fascicle::chrono::Utc::now()
                - fascicle::chrono::Duration::from_std(age).map_err(|_| {
                    Error::InvalidInput(format!("--older-than {older_than} is too long"))
                })?;
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
        "{:<24} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9}",
        "KIND", "READY", "SCHEDULED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"
    );
    for (kind, k) in &stats.kinds {
        println!(
            "{:<24} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9}",
            kind, k.ready, k.scheduled, k.processing, k.completed, k.failed, k.cancelled
        );
    }
    let b = stats.batches;
    println!(
        "batches: {} open, {} completed, {} failed, {} cancelled",
        b.open, b.completed, b.failed, b.cancelled
    );
    Ok(())
}

async fn status(store: &Arc<dyn Store>, id: OperationId, json: bool) -> fascicle::Result<()> {
    let op = store
        .get(id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no operation or batch has id {id}")))?;
    let children = if op.is_parent() {
        store.children_of(id).await?
    } else {
        Vec::new()
    };
    if json {
        print(
            true,
            &json!({ "operation": op, "children": children }),
            String::new,
        );
        return Ok(());
    }
    describe(&op);
    if let Some(c) = op.children {
        let done = c.terminal();
        let percent = (done * 100).checked_div(c.total).unwrap_or(100);
        println!(
            "progress: {done}/{} children finished ({percent}%): {} completed, {} failed, {} cancelled",
            c.total, c.completed, c.failed, c.cancelled
        );
        println!("{:<38} {:<11} {:>8}  ERROR", "CHILD", "STATUS", "ATTEMPTS");
        for child in &children {
            println!(
                "{:<38} {:<11} {:>8}  {}",
                child.id.to_string(),
                child.status,
                format!("{}/{}", child.attempts, child.max_attempts),
                child.error.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn describe(op: &Operation) {
    let what = if op.is_parent() { "batch" } else { "operation" };
    println!("{what} {} ({}): {}", op.id, op.kind, op.status);
    if op.status == Status::Processing
        && let Some(worker) = &op.worker_id
    {
        println!("held by {worker}");
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
}
