//! `ratelimit`: the operator's command for the rate limiter.
//!
//! - `ratelimit check|remaining|reset --endpoint E --identifier I [--cost N] [--limit NAME]
//!   [--rules FILE] [--redis-url URL]` works on the buckets of one endpoint (one per limit)
//!   in the service's Redis;
//! - `ratelimit rules check FILE` validates a rules file.
//!
//! Output is human-readable by default and one JSON object with `--json`. Exit codes: 0
//! allowed or done, 1 denied, 2 usage or configuration error, 3 Redis error. See
//! `docs/cli.md` for examples.
//!
//! The modules: [`cli`] (arguments), [`commands`] (what each command does), [`output`]
//! (rendering), [`error`] (exit codes).

mod cli;
mod commands;
mod error;
mod output;

use std::io::{IsTerminal as _, Write};
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

    let (stdout, stderr, exit) = match outcome {
        Ok(report) => {
            let text = if cli.json {
                format!("{}\n", report.json())
            } else {
                report.human()
            };
            (text, String::new(), report.exit())
        }
        Err(err) => {
            let stdout = if cli.json {
                format!("{}\n", output::error_json(&err))
            } else {
                String::new()
            };
            (stdout, output::error_human(&err), err.exit())
        }
    };
    let stdout = output::scrub(&stdout, &secrets);
    let stderr = output::scrub(&stderr, &secrets);
    // Output written with error handling, never `print!` (which panics on a closed pipe):
    // a reader that went away (`ratelimit … | head -0`) is not an error of the command, so
    // the command's own exit code stands and nothing more is said. Any other failure to write
    // the result is reported on stderr and exits 2.
    let mut exit = exit;
    if let Err(err) = write_all(&mut std::io::stdout().lock(), &stdout)
        && err.kind() != std::io::ErrorKind::BrokenPipe
    {
        let _ = write_all(
            &mut std::io::stderr().lock(),
            &format!("ratelimit: error: cannot write the output: {err}\n"),
        );
        exit = error::Exit::Usage;
    }
    let _ = write_all(&mut std::io::stderr().lock(), &stderr);
    exit.into()
}

/// Writes `text` and flushes.
fn write_all(out: &mut impl Write, text: &str) -> std::io::Result<()> {
    out.write_all(text.as_bytes())?;
    out.flush()
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
