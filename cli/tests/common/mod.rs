//! Running the `fascicle` binary against a SQLite file.

use std::path::Path;
use std::process::{Command, Output};

/// `fascicle --database-url sqlite://<db> <args>`, ignoring any `FASCICLE_DATABASE_URL`.
pub(crate) fn fascicle(db: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fascicle"))
        .arg("--database-url")
        .arg(format!("sqlite://{}", db.display()))
        .args(args)
        .env_remove("FASCICLE_DATABASE_URL")
        .output()
        .expect("the fascicle binary runs")
}
