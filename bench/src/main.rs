//! `fascicle-bench`: the headline benchmark table. Every figure is printed next to a
//! baseline measured in the same run, because only ratios compare on a shared machine.
//!
//! ```text
//! cargo run --release -p fascicle-bench -- [--driver memory|sqlite|postgres|all] [--only submit|drain|latency|aggregation|limits|schedules|backlog|many|status|huge|processes|growth]... [--quick] [--json] [--runs N] [--peer-gw PATH] [--raw-bound PATH]
//! ```
//!
//! PostgreSQL is reached through `DATABASE_URL` (default
//! `postgres://root@127.0.0.1:5432/test`); the harness works in its own schema
//! `fascicle_bench_<random>` and drops it at the end. SQLite runs on temporary files.

mod aggregation;
mod backlog;
mod drain;
mod growth;
mod huge;
mod latency;
mod limits;
mod many;
mod processes;
mod schedules;
mod status;
mod submit;

use std::time::Duration;

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Driver {
    Memory,
    Sqlite,
    Postgres,
}

#[derive(Debug)]
struct Args {
    drivers: Vec<Driver>,
    quick: bool,
    json: bool,
    runs: usize,
    /// Only these scenarios (`--only`); empty: all of them.
    only: Vec<Scenario>,
    /// The graphile_worker peer's binary (`--peer-gw PATH`, or `FASCICLE_PEER_GW`), run
    /// beside fascicle where a scenario has a peer measurement.
    peer_gw: Option<std::path::PathBuf>,
    /// `../shared/peers/raw_bound.sh` (`--raw-bound PATH`; found there by default), run
    /// beside the PostgreSQL drain.
    raw_bound: Option<std::path::PathBuf>,
}

/// The benchmark's scenarios, each with its own baselines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Submit,
    Drain,
    Latency,
    Aggregation,
    Limits,
    Schedules,
    Backlog,
    Many,
    Status,
    Huge,
    Processes,
    Growth,
}

const USAGE: &str = "usage: fascicle-bench [--driver memory|sqlite|postgres|all] [--only submit|drain|latency|aggregation|limits|schedules|backlog|many|status|huge|processes|growth]... [--quick] [--json] [--runs N] [--peer-gw PATH] [--raw-bound PATH]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        drivers: vec![Driver::Memory, Driver::Sqlite, Driver::Postgres],
        quick: false,
        json: false,
        runs: 0,
        only: Vec::new(),
        peer_gw: std::env::var_os("FASCICLE_PEER_GW").map(Into::into),
        raw_bound: Some(std::path::PathBuf::from("../shared/peers/raw_bound.sh"))
            .filter(|p| p.exists()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--json" => args.json = true,
            "--driver" => {
                let value = it.next().ok_or("--driver needs a value")?;
                args.drivers = match value.as_str() {
                    "memory" => vec![Driver::Memory],
                    "sqlite" => vec![Driver::Sqlite],
                    "postgres" => vec![Driver::Postgres],
                    "all" => vec![Driver::Memory, Driver::Sqlite, Driver::Postgres],
                    other => return Err(format!("unknown driver `{other}`\n{USAGE}")),
                };
            }
            "--only" => {
                let value = it.next().ok_or("--only needs a scenario")?;
                args.only.push(match value.as_str() {
                    "submit" => Scenario::Submit,
                    "drain" => Scenario::Drain,
                    "latency" => Scenario::Latency,
                    "aggregation" => Scenario::Aggregation,
                    "limits" => Scenario::Limits,
                    "schedules" => Scenario::Schedules,
                    "backlog" => Scenario::Backlog,
                    "many" => Scenario::Many,
                    "status" => Scenario::Status,
                    "huge" => Scenario::Huge,
                    "processes" => Scenario::Processes,
                    "growth" => Scenario::Growth,
                    other => return Err(format!("unknown scenario `{other}`\n{USAGE}")),
                });
            }
            "--peer-gw" => {
                let value = it.next().ok_or("--peer-gw needs the peer binary's path")?;
                args.peer_gw = Some(value.into());
            }
            "--raw-bound" => {
                let value = it.next().ok_or("--raw-bound needs the script's path")?;
                args.raw_bound = Some(value.into());
            }
            "--runs" => {
                let value = it.next().ok_or("--runs needs a value")?;
                args.runs = value
                    .parse()
                    .map_err(|_| format!("--runs takes a whole number, got `{value}`"))?;
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if args.runs == 0 {
        args.runs = if args.quick { 5 } else { 9 };
    }
    Ok(args)
}

/// How a measurement is judged.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Target {
    /// The median must reach this many units per second.
    AtLeast { value: f64 },
    /// The median divided by the baseline median must reach this ratio.
    RatioAtLeast { value: f64 },
    /// The median divided by the baseline median must not exceed this ratio (sizes).
    RatioAtMost { value: f64 },
    /// The median must not exceed this value (latencies, cost ratios).
    AtMost { value: f64 },
}

/// One row of the table.
#[derive(Debug, Serialize)]
struct Measurement {
    scenario: String,
    driver: &'static str,
    unit: &'static str,
    samples: Vec<f64>,
    baseline_name: Option<String>,
    baseline_samples: Vec<f64>,
    target: Option<Target>,
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn min_max(samples: &[f64]) -> (f64, f64) {
    samples
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

impl Measurement {
    fn ratio(&self) -> Option<f64> {
        (!self.baseline_samples.is_empty())
            .then(|| median(&self.samples) / median(&self.baseline_samples))
    }

    fn verdict(&self) -> &'static str {
        match self.target {
            None => "",
            Some(Target::AtLeast { value }) if median(&self.samples) >= value => "PASS",
            Some(Target::RatioAtLeast { value }) if self.ratio().is_some_and(|r| r >= value) => {
                "PASS"
            }
            Some(Target::AtMost { value }) if median(&self.samples) <= value => "PASS",
            Some(Target::RatioAtMost { value }) if self.ratio().is_some_and(|r| r <= value) => {
                "PASS"
            }
            Some(_) => "MISS",
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            None => "-".into(),
            Some(Target::AtLeast { value }) => format!(">= {}", human(value)),
            Some(Target::RatioAtLeast { value }) => format!(">= {value}x baseline"),
            Some(Target::AtMost { value }) => format!("<= {value}"),
            Some(Target::RatioAtMost { value }) => format!("<= {value}x baseline"),
        }
    }
}

fn human(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    if x < 10.0 {
        return format!("{x:.2}");
    }
    if x >= 1_000_000.0 {
        format!("{:.2}M", x / 1_000_000.0)
    } else if x >= 1_000.0 {
        format!("{:.1}k", x / 1_000.0)
    } else {
        format!("{x:.1}")
    }
}

fn print_table(rows: &[Measurement]) {
    println!(
        "| scenario | driver | median | min–max | baseline | baseline median | ratio | target | verdict |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let (lo, hi) = min_max(&row.samples);
        println!(
            "| {} | {} | {} {} | {}–{} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.driver,
            human(median(&row.samples)),
            row.unit,
            human(lo),
            human(hi),
            row.baseline_name.as_deref().unwrap_or("-"),
            if row.baseline_samples.is_empty() {
                "-".to_string()
            } else {
                human(median(&row.baseline_samples))
            },
            row.ratio().map_or("-".into(), |r| format!("{r:.1}x")),
            row.target_text(),
            row.verdict(),
        );
    }
}

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(processes::CHILD_FLAG) {
        // A drain process of the `processes` scenario.
        let (Some(url), Some(schema)) = (argv.get(2), argv.get(3)) else {
            eprintln!("usage: fascicle-bench {} URL SCHEMA", processes::CHILD_FLAG);
            std::process::exit(2);
        };
        if let Err(error) = processes::child(url, schema).await {
            eprintln!("drain process: {error}");
            std::process::exit(1);
        }
        return;
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let mut rows = Vec::new();
    let mut failed = false;
    // `growth` changes the server's settings for its run (autovacuum): only when named.
    let wanted = |scenario| {
        args.only.contains(&scenario) || (args.only.is_empty() && scenario != Scenario::Growth)
    };
    for driver in &args.drivers {
        let mut results = Vec::new();
        for scenario in [
            Scenario::Submit,
            Scenario::Drain,
            Scenario::Latency,
            Scenario::Aggregation,
            Scenario::Limits,
            Scenario::Schedules,
            Scenario::Backlog,
            Scenario::Many,
            Scenario::Status,
            Scenario::Huge,
            Scenario::Processes,
            Scenario::Growth,
        ] {
            if !wanted(scenario) {
                continue;
            }
            let url = database_url();
            results.push(match (driver, scenario) {
                (Driver::Memory, Scenario::Submit) => submit::memory(&args).await,
                (Driver::Memory, Scenario::Drain) => drain::memory(&args).await,
                (Driver::Memory, Scenario::Latency) => latency::memory(&args).await,
                (Driver::Memory, Scenario::Aggregation) => aggregation::memory(&args).await,
                (Driver::Memory, Scenario::Limits) => limits::memory(&args).await,
                (Driver::Sqlite, Scenario::Limits) => limits::sqlite(&args).await,
                (Driver::Postgres, Scenario::Limits) => limits::postgres(&args, &url).await,
                (Driver::Memory, Scenario::Schedules) => schedules::memory(&args).await,
                (Driver::Memory, Scenario::Backlog) => backlog::memory(&args).await,
                (Driver::Memory, Scenario::Many) => many::memory(&args).await,
                (Driver::Sqlite, Scenario::Many) => many::sqlite(&args).await,
                (Driver::Postgres, Scenario::Many) => many::postgres(&args, &url).await,
                (
                    Driver::Memory,
                    Scenario::Status | Scenario::Huge | Scenario::Processes | Scenario::Growth,
                )
                | (Driver::Sqlite, Scenario::Growth) => Ok(Vec::new()),
                (Driver::Postgres, Scenario::Growth) => growth::postgres(&args, &url).await,
                (Driver::Sqlite, Scenario::Processes) => processes::sqlite(&args).await,
                (Driver::Postgres, Scenario::Processes) => processes::postgres(&args, &url).await,
                (Driver::Sqlite, Scenario::Huge) => huge::sqlite(&args).await,
                (Driver::Postgres, Scenario::Huge) => huge::postgres(&args, &url).await,
                (Driver::Sqlite, Scenario::Status) => status::sqlite(&args).await,
                (Driver::Postgres, Scenario::Status) => status::postgres(&args, &url).await,
                (Driver::Sqlite, Scenario::Backlog) => backlog::sqlite(&args).await,
                (Driver::Postgres, Scenario::Backlog) => backlog::postgres(&args, &url).await,
                (Driver::Sqlite, Scenario::Schedules) => schedules::sqlite(&args).await,
                (Driver::Postgres, Scenario::Schedules) => schedules::postgres(&args, &url).await,
                (Driver::Sqlite, Scenario::Submit) => submit::sqlite(&args).await,
                (Driver::Sqlite, Scenario::Drain) => drain::sqlite(&args).await,
                (Driver::Sqlite, Scenario::Latency) => latency::sqlite(&args).await,
                (Driver::Sqlite, Scenario::Aggregation) => aggregation::sqlite(&args).await,
                (Driver::Postgres, Scenario::Submit) => submit::postgres(&args, &url).await,
                (Driver::Postgres, Scenario::Drain) => drain::postgres(&args, &url).await,
                (Driver::Postgres, Scenario::Latency) => latency::postgres(&args, &url).await,
                (Driver::Postgres, Scenario::Aggregation) => {
                    aggregation::postgres(&args, &url).await
                }
            });
        }
        for result in results {
            match result {
                Ok(mut measured) => rows.append(&mut measured),
                Err(e) => {
                    failed = true;
                    eprintln!("{driver:?}: benchmark failed: {e}");
                }
            }
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("measurements serialize")
        );
    } else {
        print_table(&rows);
    }
    if failed {
        std::process::exit(1);
    }
}
