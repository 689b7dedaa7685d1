//! `microseg diff`: what a policy change would deny or allow, against the running
//! agent's policy or another set of files. Exit status as diff(1): 0 nothing allowed
//! changes, 1 it changes (see `--fail-on`), 2 an error.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, ValueEnum};

use super::review_input;
use crate::review::diff::{Side, diff};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailOn {
    /// Any change in what is allowed: a reachability pair or an observed flow.
    Changes,
    /// Only observed flows that the change would deny.
    NewlyDenied,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiffOutput {
    /// For people.
    Text,
    /// For tools.
    Json,
}

#[derive(Args)]
pub struct DiffArgs {
    /// The new policy (files or directories): its objects replace or add to the
    /// base's objects of the same kind, namespace and name, as `apply -f` would.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Compare with these files instead of the running agent's policy.
    #[arg(long = "base")]
    pub base: Vec<PathBuf>,
    /// The -f files are the whole new set: base objects they do not hold are
    /// removed (as `kubectl apply --prune`).
    #[arg(long)]
    pub prune: bool,
    /// Observed flows from this file of JSON lines (`microseg events -o json`,
    /// `hubble observe -o json`) instead of the agent's event history.
    #[arg(long)]
    pub flows: Option<PathBuf>,
    /// What makes the exit status 1.
    #[arg(long, value_enum, default_value_t = FailOn::Changes)]
    pub fail_on: FailOn,
    #[arg(short, long, value_enum, default_value_t = DiffOutput::Text)]
    pub output: DiffOutput,
}

pub fn run(socket: &std::path::Path, args: &DiffArgs) -> ExitCode {
    match compare(socket, args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn compare(socket: &std::path::Path, args: &DiffArgs) -> anyhow::Result<ExitCode> {
    let live = args.base.is_empty();
    let base_objects = if live {
        review_input::live_objects(socket)?
    } else {
        review_input::file_objects(&args.base)?
    };
    let incoming = review_input::file_objects(&args.files)?;
    let new_objects = if args.prune {
        incoming
    } else {
        let mut merged = base_objects.clone();
        merged.extend(incoming);
        merged
    };
    let base_name = if live {
        "the running agent's policy set"
    } else {
        "the base policy set (--base)"
    };
    let base = Side::build(base_objects, base_name)?;
    let new = Side::build(new_objects, "the new policy set (-f)")?;
    let flows = review_input::observed_flows(args.flows.as_deref(), socket, live)?;
    let report = diff(&base, &new, &flows);
    if args.output == DiffOutput::Json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_text());
    }
    let fails = match args.fail_on {
        FailOn::Changes => report.allows_differently(),
        FailOn::NewlyDenied => !report.newly_denied.is_empty(),
    };
    Ok(if fails {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
