//! `ratelimit`: the operator's command for the rate limiter.
//!
//! - `ratelimit check|remaining|reset --endpoint E --identifier I [--cost N] [--rules FILE]
//!   [--redis-url URL]` works on one bucket in the service's Redis;
//! - `ratelimit rules check FILE` validates a rules file.
//!
//! Output is human-readable by default and one JSON object with `--json`. Exit codes: 0
//! allowed or done, 1 denied, 2 usage or configuration error, 3 Redis error. See
//! `docs/cli.md` for examples.
//!
//! The modules: [`cli`] (arguments), [`commands`] (what each command does), [`output`]
//! (rendering), [`error`] (exit codes), [`store`] (a store wrapper that keeps the last error).

// A command-line tool's job is to print its results on stdout.
#![allow(clippy::print_stdout)]

mod cli;
mod commands;
mod error;
mod output;
mod store;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;

use crate::cli::Cli;
use crate::error::CliError;

fn main() -> ExitCode {
    // Usage errors exit 2 (clap's code), --help and --version exit 0.
    let cli = Cli::try_parse().unwrap_or_else(|err| err.exit());
    init_logging();
    let secrets: Vec<String> = cli
        .redis_url()
        .and_then(output::url_password)
        .map(str::to_owned)
        .into_iter()
        .collect();

    let outcome = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(commands::run(&cli)),
        Err(err) => Err(CliError::configuration(format!(
            "cannot start the async runtime: {err}"
        ))),
    };

    let exit = match outcome {
        Ok(report) => {
            let text = if cli.json {
                format!("{}\n", report.json())
            } else {
                report.human()
            };
            print!("{}", output::scrub(&text, &secrets));
            report.exit()
        }
        Err(err) => {
            if cli.json {
                println!(
                    "{}",
                    output::scrub(&output::error_json(&err).to_string(), &secrets)
                );
            }
            eprint!("{}", output::scrub(&output::error_human(&err), &secrets));
            err.exit()
        }
    };
    exit.into()
}

/// Logs of the libraries (resets, fail-open warnings…) on stderr, only when `RUST_LOG` asks
/// for them: by default the CLI's own lines say everything.
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_none() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
